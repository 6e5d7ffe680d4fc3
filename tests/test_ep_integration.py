"""The Transformer-MoE train step on a ('data', 'expert') mesh equals the single-device step."""

import chex
import jax
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import configs.tmoe
from tmoe_jax.data import batching
from tmoe_jax.data.seq2seq import load_seq2seq_data, make_batch
from tmoe_jax.parallel.mesh import make_mesh
from tmoe_jax.tasks import seq2seq as seq2seq_task
from tmoe_jax.tasks import seq2seq as steps
from tmoe_jax.training import checkpointing
from tmoe_jax.training import steps as training_steps
from tmoe_jax.training.optimizer import make_optimizer, make_schedule
from tmoe_jax.training.state import create_train_state, train_state_shardings


def _config():
  config = configs.tmoe.get_config()
  config.model.d_model = 32
  config.model.num_heads = 2
  config.model.d_ff = 32
  config.model.num_layers = 1
  config.model.num_decoder_layers = 1
  config.model.moe_every = 1
  config.model.num_experts = 8
  config.model.dropout_rate = 0.0
  # E / K: every expert has room for every token, globally and per device.
  config.model.capacity_factor = 4.0
  config.model.eval_capacity_factor = 4.0
  config.data.num_train = 64
  config.data.num_test = 8
  config.train.batch_size = 16
  config.train.warmup_steps = 0
  config.train.schedule = "constant"
  return config


def _step(config, mesh, sgd=True):
  data = load_seq2seq_data(config.data)
  model = seq2seq_task.build_model(config, data.vocabulary.size, 0, mesh=mesh)
  # SGD: Adam would turn float noise in gradients that are 0 in exact arithmetic
  # (e.g. attention key biases) into full-size steps.
  optimizer = optax.sgd(1.0) if sgd else make_optimizer(config.train)
  graphdef, state = create_train_state(model, optimizer, 0)
  kwargs = {}
  if mesh is not None:
    shardings = train_state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    kwargs = {"state_shardings": shardings, "mesh": mesh}
  step = steps.jit_train_step(
    graphdef, optimizer, make_schedule(config.train), training_steps.LossWeights(), **kwargs
  )
  split = data.splits["train"]
  batch = make_batch(split, batching.example_indices(len(split), 16, 0, 0), data.vocabulary.BOS_ID)
  state, metrics = step(state, batch)
  state, metrics = step(state, batch)
  return state, metrics


@pytest.mark.parametrize(
  "data, expert, variants",
  [
    (2, 4, {}),
    (1, 8, {}),
    (4, 2, {"expert_bias_rate": 0.01, "router_jitter": 0.2, "batch_prioritized": True}),
    (2, 4, {"expert_type": "gated", "activation": "silu", "softmax_order": "after", "num_shared_experts": 1}),
    # Dropless MLP experts on (2, 4) and (1, 8): tests/test_mesh_equality_dropless.py (20 steps).
    (1, 8, {"dispatch": "dropless", "expert_type": "gated", "activation": "silu"}),
  ],
)
def test_train_step_on_a_mesh_equals_the_single_device_step(data, expert, variants):
  config = _config()
  for key, value in variants.items():
    config.model[key] = value
  ref_state, ref_metrics = _step(config, None)
  state, metrics = _step(config, make_mesh(data, expert))
  assert float(metrics["dropped_fraction"].max()) == 0.0
  chex.assert_trees_all_close(metrics, ref_metrics, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(
    nnx.to_pure_dict(state.params), nnx.to_pure_dict(ref_state.params), atol=1e-5, rtol=1e-4
  )
  for w in nnx.to_pure_dict(state.params)["decoder_layers"][0]["ffn"]["experts"].values():
    assert w.sharding.spec == P("expert") and w.addressable_shards[0].data.shape[0] == 8 // expert
  chex.assert_trees_all_close(
    nnx.to_pure_dict(state.model_state), nnx.to_pure_dict(ref_state.model_state), atol=1e-6
  )


def test_checkpoint_restores_into_the_sharded_layout(tmp_path):
  config = _config()
  mesh = make_mesh(2, 4)
  state, _ = _step(config, mesh, sgd=False)
  manager = checkpointing.make_manager(tmp_path / "ckpt", max_to_keep=1)
  checkpointing.save(manager, state)
  manager.wait_until_finished()
  restored = checkpointing.restore(manager, checkpointing.abstract_like(state))
  moments = [
    leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(restored.opt_state)
    if "w_in_ExDxF" in jax.tree_util.keystr(path) and ".mu" in jax.tree_util.keystr(path)
  ]
  assert moments and all(m.sharding.spec == P("expert") for m in moments)
  chex.assert_trees_all_equal(nnx.to_pure_dict(restored.params), nnx.to_pure_dict(state.params))


@pytest.mark.parametrize("data, expert", [(4, 2), (1, 1)])
def test_checkpoint_saved_on_one_mesh_restores_onto_another(tmp_path, data, expert):
  """Saved with experts split 4 ways; restored with 2-way expert parallelism or on one device."""
  config = _config()
  state, _ = _step(config, make_mesh(2, 4), sgd=False)
  with checkpointing.make_manager(tmp_path / "ckpt", max_to_keep=1) as manager:
    checkpointing.save(manager, state)
  target_mesh = make_mesh(data, expert)
  abstract = checkpointing.abstract_like(jax.device_put(state, train_state_shardings(state, target_mesh)))
  with checkpointing.make_manager(tmp_path / "ckpt", max_to_keep=1) as manager:
    restored = checkpointing.restore(manager, abstract)
  expert_weights = [
    leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(restored.params)
    if "w_in_ExDxF" in jax.tree_util.keystr(path)
  ]
  assert expert_weights
  for weight in expert_weights:
    assert weight.sharding.mesh.shape == target_mesh.shape
    assert len(weight.sharding.device_set) == data * expert
  chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
