"""Tests of the character LM experiment: the pydoc corpus, the decoder-only LM and its three FFN variants.

References are independent of the library: the corpus rebuilt from
`pydoc_data.topics` by hand, a float64 NumPy log-softmax cross-entropy,
per-position causality checks, and parameter counts read off built modules.
Shapes: B windows, L length, V vocabulary, D model, E experts.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import smoe_lm as smoe_lm_config
from tmoe_jax.data import pydoc_corpus
from tmoe_jax.errors import ConfigError, DataError, WorkdirError
from tmoe_jax.models.language_model import (
  LanguageModel,
  LanguageModelConfig,
  active_ffn_parameters,
  ffn_hidden_width,
)
from tmoe_jax.moe.smoe import SingleMixtureOfExperts
from tmoe_jax.tasks.language_model import LanguageModelTask, bits_per_char, language_model_loss
from tmoe_jax.training import loop
from tmoe_jax.training.optimizer import make_optimizer
from tmoe_jax.training.state import count_params, create_train_state

topics_module = pytest.importorskip("pydoc_data.topics", reason="this Python ships without pydoc_data")

FFNS = ("dense", "moe", "smoe")


@pytest.fixture(scope="module")
def corpus():
  return pydoc_corpus.load_corpus(0.1)


def _tiny_lm(ffn="dense", vocab_size=11, **kwargs) -> LanguageModel:
  fields = {"d_model": 16, "num_heads": 2, "num_layers": 2, "d_ff": 16, "max_length": 12, "num_experts": 4}
  fields.update(top_k=2, smoe_keep_rate=0.5)
  fields.update(kwargs)
  return LanguageModel(
    LanguageModelConfig.from_flat(vocab_size=vocab_size, ffn=ffn, **fields), rngs=nnx.Rngs(params=0)
  )


def _tokens(batch=3, length=12, vocab_size=11, seed=0):
  # Ids >= 1: 0 is padding for the loss.
  return jax.random.randint(jax.random.key(seed), (batch, length), 1, vocab_size)


# ---------------------------------------------------------------------------
# Corpus.


def test_corpus_is_the_sorted_topics_and_splits_at_ten_percent(corpus):
  topics = topics_module.topics
  text = "\n".join(topics[key] for key in sorted(topics))
  assert len(text) > 400_000  # ~465K characters in CPython 3.11
  assert corpus.fingerprint["characters"] == len(text)
  train, validation = corpus.splits["train"], corpus.splits["validation"]
  assert len(train) + len(validation) == len(text)
  assert len(validation) == round(0.1 * len(text))
  # Contiguous and disjoint: train is the text before the boundary, validation the rest.
  decoded = corpus.vocabulary.decode(np.concatenate([train, validation]).tolist() + [2])
  assert decoded == text
  assert corpus.vocabulary.decode(validation.tolist()) == text[len(train) :]
  assert corpus.vocabulary.size == 4 + len(set(text))


def test_split_point_rejects_bad_fractions():
  assert pydoc_corpus.split_point(1000, 0.1) == 900
  for fraction in (0.0, 1.0, -0.5):
    with pytest.raises(ValueError):
      pydoc_corpus.split_point(1000, fraction)


def test_training_windows_stay_inside_the_training_split(corpus):
  train = corpus.splits["train"]
  length = 128
  starts = np.concatenate(
    [pydoc_corpus.random_window_starts(len(train), length, 256, 0, step) for step in range(50)]
  )
  assert starts.min() >= 0 and starts.max() + length + 1 <= len(train)
  # The last possible start is reachable in principle: a uniform draw over all of them.
  assert starts.max() > len(train) - length - 5000
  windows = pydoc_corpus.windows_at(train, starts[:4], length)
  np.testing.assert_array_equal(windows["inputs"][:, 1:], windows["targets"][:, :-1])
  np.testing.assert_array_equal(windows["inputs"][0], train[starts[0] : starts[0] + length])
  with pytest.raises(DataError):
    pydoc_corpus.windows_at(train, np.array([len(train) - length]), length)


def test_consecutive_windows_predict_every_character_once():
  ids = np.arange(1000) + 4
  starts = pydoc_corpus.consecutive_window_starts(len(ids), 64)
  windows = pydoc_corpus.windows_at(ids, starts, 64)
  predicted = windows["targets"].reshape(-1)
  assert len(np.unique(predicted)) == len(predicted) == (len(ids) - 1) // 64 * 64
  np.testing.assert_array_equal(predicted, ids[1 : 1 + len(predicted)])


def test_train_batch_is_a_pure_function_of_seed_and_step():
  task = LanguageModelTask(_tiny_config())
  a, b = task.train_batch(7, slice(None)), task.train_batch(7, slice(None))
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert a["inputs"].shape == (8, 32) and a["inputs"].dtype == np.int32
  assert not np.array_equal(a["inputs"], task.train_batch(8, slice(None))["inputs"])
  halves = [task.train_batch(7, slice(0, 4)), task.train_batch(7, slice(4, 8))]
  np.testing.assert_array_equal(np.concatenate([h["targets"] for h in halves]), a["targets"])


# ---------------------------------------------------------------------------
# Loss and bits per character.


def _numpy_cross_entropy(logits_BxLxV, targets_BxL):
  logits = np.asarray(logits_BxLxV, np.float64)
  log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  picked = np.take_along_axis(logits, np.asarray(targets_BxL)[..., None], -1)[..., 0]
  return float(np.mean(log_z - picked))


@pytest.mark.parametrize("ffn", FFNS)
def test_loss_is_the_mean_cross_entropy_of_the_logits(ffn):
  model = _tiny_lm(ffn)
  tokens = _tokens(length=13)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  loss, metrics, auxes = language_model_loss(model, batch, None, 0, deterministic=True)
  logits, _ = model(batch["inputs"])
  expected = _numpy_cross_entropy(logits, batch["targets"])
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["bits_per_char"]), expected / math.log(2), rtol=1e-5)
  assert len(auxes) == (0 if ffn == "dense" else 2)


def test_bits_per_char_conversion():
  assert bits_per_char(math.log(2)) == pytest.approx(1.0)
  # A uniform guess over 256 symbols costs 8 bits.
  assert bits_per_char(math.log(256)) == pytest.approx(8.0)
  assert bits_per_char(0.0) == 0.0


# ---------------------------------------------------------------------------
# The model.


@pytest.mark.parametrize("ffn", FFNS)
def test_logits_are_causal(ffn):
  model = _tiny_lm(ffn)
  tokens = _tokens(batch=4)
  changed = tokens.at[:, 7:].set((tokens[:, 7:] % 10) + 1)
  logits, _ = model(tokens)
  logits_changed, _ = model(changed)
  assert logits.shape == (4, 12, 11) and logits.dtype == jnp.float32
  # Positions 0..6 see only tokens 0..6: unchanged.
  np.testing.assert_allclose(logits[:, :7], logits_changed[:, :7], rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits[:, 7:], logits_changed[:, 7:])


def test_widths_give_equal_active_parameters():
  assert ffn_hidden_width("dense", 256, 2, 0.8) == 256
  assert ffn_hidden_width("moe", 256, 2, 0.8) == 128
  assert ffn_hidden_width("smoe", 256, 2, 0.8) == 320
  d_model, d_ff, experts, top_k, keep = 16, 16, 4, 2, 0.5
  counts = {}
  for ffn in FFNS:
    model = _tiny_lm(ffn, num_layers=1)
    ffn_params = nnx.state(model.layers[0].ffn, nnx.Param)
    total = count_params(ffn_params)
    flat = {"/".join(map(str, path)): v[...].size for path, v in nnx.to_flat_state(ffn_params)}
    router = flat.get("router/kernel", 0)
    if ffn == "dense":
      active = total
    elif ffn == "moe":
      active = router + (total - router) * top_k / experts  # K of the E experts
    else:
      hidden = model.layers[0].ffn.hidden
      kept = keep * hidden.out_features  # expected kept units: their w_in column, bias and w_out row
      active = router + kept * (2 * d_model + 1) + d_model
    counts[ffn] = active
    assert active == pytest.approx(active_ffn_parameters(ffn, d_model, d_ff, experts, top_k, keep))
  # Equal up to the routers (D x E) and, for top-k, the K - 1 extra output biases.
  assert counts["moe"] - counts["dense"] == d_model * experts + (top_k - 1) * d_model
  assert counts["smoe"] - counts["dense"] == pytest.approx(d_model * experts)


def test_config_errors_name_the_field():
  with pytest.raises(ConfigError, match="model.ffn"):
    LanguageModelConfig.from_flat(vocab_size=10, ffn="sparse")
  with pytest.raises(ConfigError, match="model.d_ff"):
    LanguageModelConfig.from_flat(vocab_size=10, d_ff=15, top_k=2)
  with pytest.raises(ConfigError, match="model.smoe_selection"):
    LanguageModelConfig.from_flat(vocab_size=10, smoe_selection="sample")
  model_section = _tiny_config().model.to_dict()
  with pytest.raises(ConfigError, match="model.d_model: expected int"):
    LanguageModelConfig.from_config({**model_section, "d_model": "128"}, vocab_size=10)
  with pytest.raises(ConfigError, match="model.num_heads: missing"):
    LanguageModelConfig.from_config(
      {k: v for k, v in model_section.items() if k != "num_heads"}, vocab_size=10
    )


def test_smoe_sampling_schedule_follows_the_train_step_of_task_loss():
  config = _tiny_config(ffn="smoe", smoe_selection="sample_then_argmax", smoe_sample_steps=5)
  task = LanguageModelTask(config)
  model = task.build_model(None)
  assert isinstance(model.layers[0].ffn, SingleMixtureOfExperts)
  for layer in model.layers:
    # A confident router, so that sampled masks differ from the argmax.
    layer.ffn.router.kernel[...] = layer.ffn.router.kernel[...] * 300.0
  graphdef, state = create_train_state(model, make_optimizer(config.train), 0)
  batch = task.train_batch(0, slice(None))

  @jax.jit
  def loss_at(step, key):
    merged = nnx.merge(graphdef, state.params, state.model_state)
    return task.loss(merged, batch, nnx.Rngs(dropout=key), step)[0]

  argmax_loss, _, _ = language_model_loss(
    nnx.merge(graphdef, state.params, state.model_state), batch, None, None, deterministic=True
  )
  for step in (5, 6, 100):
    np.testing.assert_allclose(loss_at(jnp.int32(step), jax.random.key(step)), argmax_loss, rtol=1e-5)
  sampled = [float(loss_at(jnp.int32(step), jax.random.key(step))) for step in (0, 4)]
  assert not np.allclose(sampled, float(argmax_loss), rtol=1e-5)


# ---------------------------------------------------------------------------
# Through the training loop.


def _tiny_config(**model):
  config = smoe_lm_config.get_config()
  config.model.update(d_model=16, num_heads=2, num_layers=1, d_ff=16, max_length=32, num_experts=4)
  config.model.update(model)
  config.train.update(
    num_steps=3,
    batch_size=8,
    log_every=1,
    eval_every=2,
    checkpoint_every=0,
    warmup_steps=1,
    progress_bar=False,
  )
  config.eval.update(batch_size=512, num_examples_during_training=16)
  return config


@pytest.mark.parametrize(
  "model",
  [
    {"ffn": "dense"},
    {"ffn": "moe"},
    {"ffn": "smoe"},
    {"ffn": "smoe", "smoe_selection": "sample_then_argmax"},
  ],
)
def test_each_variant_trains_and_reports(tmp_path, model, corpus):
  config = _tiny_config(**model)
  loop.train_and_evaluate(config, tmp_path, LanguageModelTask(config))
  lines = dict(line.split(": ", 1) for line in (tmp_path / "results.txt").read_text().splitlines())
  for key in (
    "val_loss",
    "val_bits_per_char",
    "val_accuracy",
    "val_characters",
    "ffn",
    "steps",
    "parameters",
  ):
    assert key in lines, key
  assert float(lines["val_bits_per_char"]) == pytest.approx(float(lines["val_loss"]) / math.log(2))
  # Every validation character after the first of its window, over (n - 1) // 32 windows.
  assert int(lines["val_characters"]) == (len(corpus.splits["validation"]) - 1) // 32 * 32
  assert (tmp_path / "loss_curve.png").stat().st_size > 0
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
  assert all("bits_per_char" in r for r in rows)
  if model["ffn"] != "dense":
    assert len(rows[0]["expert_fraction"]) == 1  # one MoE layer
  saved = json.loads((tmp_path / "corpus.json").read_text())
  assert saved["sha256"] == corpus.fingerprint["sha256"]


def test_resume_refuses_another_corpus_text(tmp_path):
  task = LanguageModelTask(_tiny_config())
  task.write_files(tmp_path)
  task.read_files(tmp_path)  # the same corpus: fine
  saved = json.loads((tmp_path / "corpus.json").read_text())
  (tmp_path / "corpus.json").write_text(json.dumps({**saved, "sha256": "0" * 64}))
  with pytest.raises(WorkdirError, match="another corpus text"):
    task.read_files(tmp_path)
  (tmp_path / "vocabulary.json").unlink()
  with pytest.raises(WorkdirError, match="vocabulary.json: missing"):
    task.read_files(tmp_path)


def test_evaluator_accepts_both_splits_and_rejects_others():
  config = _tiny_config()
  task = LanguageModelTask(config)
  graphdef, state = create_train_state(task.build_model(None), make_optimizer(config.train), 0)
  evaluator = task.make_evaluator(graphdef)
  # 20 windows in eval batches of 512: one padded batch whose padding must count for nothing.
  result = evaluator(state, "train", 20)
  assert result["num_windows"] == 20 and result["num_characters"] == 20 * 32
  ids = task.corpus.splits["train"]
  batch = pydoc_corpus.windows_at(ids, pydoc_corpus.consecutive_window_starts(len(ids), 32)[:20], 32)
  logits, _ = nnx.merge(graphdef, state.params, state.model_state)(batch["inputs"])
  np.testing.assert_allclose(result["loss"], _numpy_cross_entropy(logits, batch["targets"]), rtol=1e-5)
  assert evaluator(state, "validation", 3)["num_characters"] == 3 * 32
  with pytest.raises(DataError, match="'test'"):
    evaluator(state, "test", None)
