"""The functional training loop: one step, checkpoint round trip, resume, preemption."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.tmoe
from tmoe_jax.data import batching
from tmoe_jax.data.seq2seq import decoder_inputs, load_seq2seq_data, make_batch
from tmoe_jax.errors import WorkdirError
from tmoe_jax.tasks import runner
from tmoe_jax.tasks import seq2seq as seq2seq_task
from tmoe_jax.tasks import seq2seq as steps
from tmoe_jax.training import checkpointing, reporting
from tmoe_jax.training import steps as training_steps
from tmoe_jax.training.optimizer import make_optimizer, make_schedule
from tmoe_jax.training.state import create_train_state


def tiny_config(**train_overrides):
  config = configs.tmoe.get_config()
  config.model.d_model = 32
  config.model.num_heads = 2
  config.model.d_ff = 32
  config.model.num_layers = 1
  config.model.num_decoder_layers = 2
  config.model.moe_every = 1
  config.data.num_train = 256
  config.data.num_test = 24
  config.train.num_steps = 6
  config.train.batch_size = 8
  config.train.warmup_steps = 2
  config.train.log_every = 1
  config.train.eval_every = 0
  config.train.checkpoint_every = 3
  config.train.progress_bar = False
  config.eval.batch_size = 16
  for key, value in train_overrides.items():
    config.train[key] = value
  return config


def _setup(config):
  data = load_seq2seq_data(config.data)
  model = seq2seq_task.build_model(config, data.vocabulary.size, config.train.seed)
  optimizer = make_optimizer(config.train)
  graphdef, state = create_train_state(model, optimizer, config.train.seed)
  train_step = steps.jit_train_step(
    graphdef, optimizer, make_schedule(config.train), training_steps.LossWeights()
  )
  return data, graphdef, state, train_step


def test_decoder_inputs_shift_right_behind_bos():
  targets = np.array([[5, 6, 2, 0], [7, 8, 9, 2]])
  np.testing.assert_array_equal(decoder_inputs(targets, bos_id=1), [[1, 5, 6, 2], [1, 7, 8, 9]])


def test_batches_are_a_pure_function_of_seed_and_step():
  first = [batching.example_indices(10, 4, seed=3, step=s) for s in range(5)]
  again = [batching.example_indices(10, 4, seed=3, step=s) for s in range(5)]
  chex.assert_trees_all_equal(first, again)
  # Two epochs of 10 examples = 5 batches of 4: each example exactly twice.
  np.testing.assert_array_equal(np.bincount(np.concatenate(first), minlength=10), np.full(10, 2))
  assert not np.array_equal(first[0], batching.example_indices(10, 4, seed=4, step=0))


def test_train_step_lowers_the_loss_on_a_fixed_batch():
  config = tiny_config(learning_rate=3e-3, warmup_steps=0, schedule="constant")
  config.model.dropout_rate = 0.0
  data, _, state, train_step = _setup(config)
  batch = make_batch(data.splits["train"], np.arange(8), data.vocabulary.BOS_ID)
  losses = []
  for _ in range(8):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 8
  assert losses[-1] < losses[0] * 0.8, losses
  chex.assert_shape(metrics["expert_fraction"], (3, config.model.num_experts))  # 1 encoder + 2 decoder MoE
  np.testing.assert_allclose(np.sum(metrics["expert_fraction"], axis=-1), 1.0, rtol=1e-6)
  assert float(metrics["aux_loss"]) > 0


def test_aux_loss_is_added_to_the_training_objective():
  """With huge balancing weight the gradient is dominated by the router, so the weights matter."""
  config = tiny_config()
  data, graphdef, state, _ = _setup(config)
  batch = make_batch(data.splits["train"], np.arange(8), data.vocabulary.BOS_ID)
  optimizer = make_optimizer(config.train)
  schedule = make_schedule(config.train)

  def metrics_with(loss_weights):
    step = jax.jit(
      functools.partial(
        training_steps.train_step,
        graphdef=graphdef,
        optimizer=optimizer,
        schedule=schedule,
        loss_weights=loss_weights,
        loss_fn=steps.seq2seq_loss,
      )
    )
    return step(state, batch)[1]

  with_aux = metrics_with(training_steps.LossWeights(load_balancing=1.0, router_z=0.0))
  without = metrics_with(training_steps.LossWeights(load_balancing=0.0, router_z=0.0))
  np.testing.assert_allclose(with_aux["aux_loss"], with_aux["load_balancing_loss"], rtol=1e-6)
  assert float(without["aux_loss"]) == 0.0
  assert float(with_aux["grad_norm"]) != float(without["grad_norm"])


def test_checkpoint_round_trip_restores_the_full_train_state(tmp_path):
  config = tiny_config()
  data, _, state, train_step = _setup(config)
  for step in range(2):
    state, _ = train_step(
      state, make_batch(data.splits["train"], np.arange(8) + step, data.vocabulary.BOS_ID)
    )
  manager = checkpointing.make_manager(tmp_path / "ckpt", max_to_keep=2)
  checkpointing.save(manager, state, wait=True)
  assert manager.latest_step() == 2
  restored = checkpointing.restore(manager, checkpointing.abstract_like(state))
  chex.assert_trees_all_equal(restored, state)  # params, Adam moments, step and rng, bit for bit


def test_restoring_into_a_different_model_shape_names_the_checkpoint(tmp_path):
  config = tiny_config()
  _, _, state, _ = _setup(config)
  manager = checkpointing.make_manager(tmp_path / "ckpt", max_to_keep=2)
  checkpointing.save(manager, state, wait=True)
  config.model.d_model = 16
  _, _, other_state, _ = _setup(config)
  with pytest.raises(WorkdirError, match="does not match the current model config"):
    checkpointing.restore(manager, checkpointing.abstract_like(other_state))


def test_a_run_without_a_validation_split_evaluates_nothing_before_the_end(tmp_path, capsys):
  config = tiny_config(num_steps=2, eval_every=1)
  config.data.num_validation = 0  # the test split is never looked at during training
  runner.train(config, tmp_path)
  rows = reporting.read_metrics(tmp_path)
  assert [(r["step"], r["split"]) for r in rows if r["split"] != "train"] == [(2, "test")]
  assert (
    "this run has no validation split, so nothing is evaluated during training" in capsys.readouterr().out
  )


def resumable_config(num_steps):
  # A constant schedule: cosine decay depends on num_steps, which differs between the legs.
  config = tiny_config(num_steps=num_steps, schedule="constant", eval_every=4)
  config.data.num_validation = 16
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An uninterrupted 10-step run, and one stopped after 6 steps and resumed to 10."""
  root = tmp_path_factory.mktemp("runs")
  straight = runner.train(resumable_config(10), root / "straight")
  runner.train(resumable_config(6), root / "resumed")
  resumed = runner.train(resumable_config(10), root / "resumed")
  return {"root": root, "straight": straight, "resumed": resumed}


def test_train_and_evaluate_writes_its_outputs(runs):
  workdir, results = runs["root"] / "straight", runs["straight"]
  for name in ("config.json", "vocabulary.json", "metrics.jsonl", "results.txt", "loss_curve.png"):
    assert (workdir / name).is_file(), name
  rows = reporting.read_metrics(workdir)
  train_rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train_rows] == list(range(1, 11))
  for key in ("loss", "aux_loss", "learning_rate", "tokens_per_second", "expert_fraction"):
    assert key in train_rows[0], key
  assert np.isfinite(train_rows[-1]["loss"])
  # During training only the validation split is evaluated; the test split once, at the end.
  evaluations = [(r["step"], r["split"]) for r in rows if r["split"] != "train"]
  assert evaluations == [(4, "validation"), (8, "validation"), (10, "test")]
  text = (workdir / "results.txt").read_text()
  assert f"exact_match: {results['exact_match']!r}" in text
  assert 0.0 <= results["exact_match"] <= 1.0
  # checkpoint_every=3 and the final step; keep_checkpoints=3 drops step 3.
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [6, 9, 10]
  assert json.loads((workdir / "config.json").read_text())["model"]["d_model"] == 32


def test_resume_continues_from_the_saved_step_and_matches_an_uninterrupted_run(runs):
  """6 steps, then 4 more from the checkpoint == 10 steps in one go, bit for bit."""
  resumed, straight = runs["resumed"], runs["straight"]
  assert resumed["steps"] == straight["steps"] == 10
  assert resumed["final_train_loss"] == straight["final_train_loss"]
  rows = reporting.read_metrics(runs["root"] / "resumed")
  assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 11))

  def final_state(workdir):
    _, _, state, _ = _setup(resumable_config(10))
    manager = checkpointing.make_manager(workdir / "checkpoints", max_to_keep=3)
    return checkpointing.restore(manager, checkpointing.abstract_like(state))

  chex.assert_trees_all_equal(final_state(runs["root"] / "resumed"), final_state(runs["root"] / "straight"))


def test_a_workdir_from_an_incompatible_config_is_refused(runs):
  config = resumable_config(12)
  config.model.num_experts = 8
  with pytest.raises(WorkdirError, match="model.num_experts: saved 4, now 8"):
    runner.train(config, runs["root"] / "straight")


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / "file"
  path.write_text("not a directory")
  with pytest.raises(WorkdirError, match="is a file"):
    runner.train(tiny_config(num_steps=1), path)


def test_learning_rate_schedule_warms_up_then_decays():
  config = tiny_config(num_steps=100, warmup_steps=10, schedule="cosine")
  schedule = make_schedule(config.train)
  peak = config.train.learning_rate
  np.testing.assert_allclose(schedule(0), 0.0)
  np.testing.assert_allclose(schedule(10), peak, rtol=1e-6)
  np.testing.assert_allclose(schedule(100), peak * config.train.final_learning_rate_fraction, rtol=1e-5)
  assert float(schedule(50)) < peak


def test_token_cross_entropy_ignores_padding():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5))
  targets = jnp.array([[1, 2, 0], [3, 0, 0]])
  loss_sum, count = steps.token_cross_entropy(logits, targets)
  log_probs = jax.nn.log_softmax(logits)
  expected = -(log_probs[0, 0, 1] + log_probs[0, 1, 2] + log_probs[1, 0, 3])
  np.testing.assert_allclose(loss_sum, expected, rtol=1e-6)
  assert float(count) == 3


def test_train_step_carries_the_expert_bias_state_and_checkpoints_it(tmp_path):
  """Non-parameter state updated in the forward pass comes back from the step and round-trips."""
  config = tiny_config()
  config.model.expert_bias_rate = 0.01
  data, _, state, train_step = _setup(config)
  before = jax.tree.leaves(state.model_state)
  assert before and all(np.all(np.asarray(b) == 0) for b in before)
  state, _ = train_step(state, make_batch(data.splits["train"], np.arange(8), data.vocabulary.BOS_ID))
  after = jax.tree.leaves(state.model_state)
  assert any(np.any(np.asarray(a) != 0) for a in after)
  manager = checkpointing.make_manager(tmp_path / "ckpt", max_to_keep=1)
  checkpointing.save(manager, state, wait=True)
  chex.assert_trees_all_equal(checkpointing.restore(manager, checkpointing.abstract_like(state)), state)


def test_greedy_decoding_agrees_with_teacher_forcing_on_its_own_output_and_beam_runs():
  """Feeding the greedy output back teacher-forced gives the same argmax at every position."""
  config = tiny_config()
  data, graphdef, state, _ = _setup(config)
  vocabulary = data.vocabulary
  source = data.splits["test"].source_ids_NxS[:4]
  max_length = data.max_target_length

  def decode(beam_size):
    fn = steps.jit_decode(
      graphdef, max_length=max_length, beam_size=beam_size, bos_id=vocabulary.BOS_ID, eos_id=vocabulary.EOS_ID
    )
    return np.asarray(fn(state.params, state.model_state, source))

  greedy = decode(1)
  model = nnx.merge(graphdef, state.params, state.model_state)
  logits, _ = model(jnp.asarray(source), jnp.asarray(decoder_inputs(greedy, vocabulary.BOS_ID)))
  forced = np.asarray(jnp.argmax(logits, -1))
  valid = (
    np.cumsum(greedy == vocabulary.EOS_ID, axis=1) - (greedy == vocabulary.EOS_ID) == 0
  )  # up to first EOS
  np.testing.assert_array_equal(forced[valid], greedy[valid])
  beam = decode(3)
  chex.assert_shape(beam, greedy.shape)
  assert beam.dtype == np.int32
