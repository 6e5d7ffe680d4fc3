"""Tests for config validation: typed model settings, run settings and the shipped configs.

Every rejection must be a `ConfigError` whose message names the offending
field (e.g. "model.num_heads"), because the command line prints that message
instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
import re

import chex
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import configs.tmoe
from tmoe_jax.data.seq2seq import load_seq2seq_data
from tmoe_jax.errors import ConfigError, TmoeError
from tmoe_jax.models.blocks import DenseFeedForward
from tmoe_jax.models.transformer import Transformer, TransformerConfig
from tmoe_jax.moe.settings import MoEConfig, SMoEConfig
from tmoe_jax.tasks.seq2seq import validate_run_config

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
CONFIG_MODULES = sorted(
  p.stem
  for p in CONFIG_DIR.glob("*.py")
  if p.stem not in ("__init__", "common")  # common: shared sections
)
# Configs whose get_config takes an argument (`--config configs/NAME.py:ARGUMENT`), with one for tests.
CONFIG_ARGUMENTS = {
  "hf_finetune": (str(pathlib.Path(__file__).resolve().parent / "fixtures" / "hf_moe" / "qwen3_moe"),)
}


def shipped_config(name: str) -> ml_collections.ConfigDict:
  return importlib.import_module(f"configs.{name}").get_config(*CONFIG_ARGUMENTS.get(name, ()))


# The Transformer seq2seq experiments; the other tasks' configs have smoke tests beside their tasks.
SEQ2SEQ_CONFIGS = [name for name in CONFIG_MODULES if shipped_config(name).task == "seq2seq"]


def _model_section(**overrides) -> ml_collections.ConfigDict:
  """configs/tmoe.py's model section with fields replaced or (value None) removed.

  Built afresh from a dict so that overrides may change a field's type, which a
  type-safe ConfigDict would refuse on assignment.
  """
  values = configs.tmoe.get_config().model.to_dict()
  for name, value in overrides.items():
    if value is None:
      del values[name]
    else:
      values[name] = value
  return ml_collections.ConfigDict(values)


def _run_config(section: str, **overrides) -> ml_collections.ConfigDict:
  values = configs.tmoe.get_config().to_dict()
  values[section].update(overrides)
  return ml_collections.ConfigDict(values)


# ---------------------------------------------------------------------------
# TransformerConfig / MoEConfig validation.


def test_config_error_is_a_value_error_and_tmoe_error():
  """Callers may catch ConfigError as ValueError or as the project's TmoeError."""
  assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, TmoeError)


@pytest.mark.parametrize(
  "overrides,field",
  [
    (dict(d_model=128, num_heads=3), "model.num_heads"),
    (dict(num_heads=0), "model.num_heads"),
    (dict(num_experts=4, top_k=5), "model.top_k"),
    (dict(top_k=0), "model.top_k"),
    (dict(num_experts=0), "model.num_experts"),
    (dict(dropout_rate=-0.1), "model.dropout_rate"),
    (dict(dropout_rate=1.0), "model.dropout_rate"),
    (dict(attention_dropout_rate=-0.5), "model.attention_dropout_rate"),
    (dict(position_embedding="rotary"), "model.position_embedding"),
    (dict(activation="tanh"), "model.activation"),
    (dict(d_model=0), "model.d_model"),
    (dict(max_length=0), "model.max_length"),
    (dict(num_layers=-1), "model.num_layers"),
    (dict(moe_every=-2), "model.moe_every"),
    (dict(capacity_factor=0.0), "model.capacity_factor"),
    (dict(eval_capacity_factor=-1.0), "model.eval_capacity_factor"),
  ],
)
def test_transformer_config_rejects_bad_values(overrides, field):
  """Each invalid setting raises ConfigError whose message starts with the field's name."""
  with pytest.raises(ConfigError, match=f"^{re.escape(field)}:"):
    TransformerConfig.from_flat(vocab_size=10, **overrides)


def test_transformer_config_defaults_are_valid_and_frozen():
  """The defaults build; the dataclass is immutable so modules cannot drift from it."""
  config = TransformerConfig.from_flat(vocab_size=10)
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.d_model = 64  # type: ignore[misc]


def test_the_nested_moe_settings_carry_the_moe_fields_and_the_models_shape():
  """Flat MoE fields land in the nested MoEConfig unchanged; its shape is the model's."""
  config = TransformerConfig.from_flat(
    vocab_size=10,
    d_model=32,
    d_ff=48,
    num_experts=6,
    top_k=3,
    capacity_factor=1.5,
    eval_capacity_factor=3.0,
    normalize_gates=False,
    activation="gelu",
    dtype=jnp.bfloat16,
  )
  assert config.moe == MoEConfig(
    num_experts=6,
    top_k=3,
    d_model=32,
    d_ff=48,
    capacity_factor=1.5,
    eval_capacity_factor=3.0,
    normalize_gates=False,
    activation="gelu",
    dtype=jnp.bfloat16,
  )


@pytest.mark.parametrize(
  "moe_every,expected",
  [
    (0, [False] * 6),
    (1, [True] * 6),
    (2, [False, True, False, True, False, True]),
    (3, [False, False, True, False, False, True]),
  ],
)
def test_is_moe_layer_pattern(moe_every, expected):
  """Every moe_every-th feed-forward block (1-based) is MoE; 0 means a dense model."""
  config = TransformerConfig.from_flat(vocab_size=10, moe_every=moe_every)
  assert [config.is_moe_layer(i) for i in range(6)] == expected


# ---------------------------------------------------------------------------
# TransformerConfig.from_config.


def test_from_config_builds_from_shipped_model_section():
  """The tmoe.py model section converts field by field, with dtype names mapped to dtypes."""
  model = configs.tmoe.get_config().model
  config = TransformerConfig.from_config(model, vocab_size=50)
  assert config.vocab_size == 50
  for field in dataclasses.fields(TransformerConfig):
    if field.name not in ("vocab_size", "dtype", "moe", "smoe"):
      assert getattr(config, field.name) == model[field.name], field.name
  # Every MoE setting lives in the nested MoEConfig, read from the same flat keys.
  for field in dataclasses.fields(MoEConfig):
    if field.name != "dtype":
      assert getattr(config.moe, field.name) == model[field.name], field.name
  # The sMoE's settings live in the nested SMoEConfig, read from the `smoe_` keys.
  for field in dataclasses.fields(SMoEConfig):
    assert getattr(config.smoe, field.name) == model[f"smoe_{field.name}"], field.name
  assert config.dtype == config.moe.dtype == jnp.float32
  assert TransformerConfig.from_config(_model_section(dtype="bfloat16"), vocab_size=5).dtype == jnp.bfloat16


def test_from_config_accepts_int_for_float_fields():
  """An int where a float is expected (dropout_rate = 0) is converted to float."""
  config = TransformerConfig.from_config(_model_section(dropout_rate=0, capacity_factor=2), vocab_size=5)
  assert isinstance(config.dropout_rate, float) and config.dropout_rate == 0.0
  assert isinstance(config.moe.capacity_factor, float) and config.moe.capacity_factor == 2.0


@pytest.mark.parametrize(
  "overrides,field",
  [
    (dict(d_model="128"), "model.d_model"),
    (dict(d_model=1.5), "model.d_model"),
    (dict(num_heads=True), "model.num_heads"),
    (dict(share_embeddings=1), "model.share_embeddings"),
    (dict(normalize_gates="yes"), "model.normalize_gates"),
    (dict(dropout_rate="0.1"), "model.dropout_rate"),
    (dict(capacity_factor=True), "model.capacity_factor"),
    (dict(position_embedding=1), "model.position_embedding"),
    (dict(dtype="float16"), "model.dtype"),
    (dict(num_heads=None), "model.num_heads"),
    (dict(top_k=None), "model.top_k"),
    (dict(num_heads=5), "model.num_heads"),
  ],
)
def test_from_config_rejects_wrong_types_and_missing_fields(overrides, field):
  """Wrong types (str, float, bool for int; int for bool), unknown dtypes and missing fields name the field."""
  with pytest.raises(ConfigError, match=f"^{re.escape(field)}:"):
    TransformerConfig.from_config(_model_section(**overrides), vocab_size=50)


def test_the_moe_layers_take_their_shape_from_the_model():
  config = TransformerConfig(
    vocab_size=10, d_model=32, d_ff=64, moe=MoEConfig(num_experts=8, d_model=7, d_ff=5)
  )
  assert (config.moe.num_experts, config.moe.d_model, config.moe.d_ff) == (8, 32, 64)


def test_from_config_missing_dtype_names_the_field():
  """A missing dtype is reported like every other missing field: ConfigError naming model.dtype."""
  with pytest.raises(ConfigError, match=r"^model\.dtype:"):
    TransformerConfig.from_config(_model_section(dtype=None), vocab_size=50)


# ---------------------------------------------------------------------------
# validate_run_config.


def test_validate_run_config_accepts_shipped_config():
  """The shipped experiment config passes the run-settings checks."""
  validate_run_config(configs.tmoe.get_config())


@pytest.mark.parametrize(
  "section,overrides,field",
  [
    ("train", dict(learning_rate=-1e-3), "train.learning_rate"),
    ("train", dict(learning_rate=0.0), "train.learning_rate"),
    ("train", dict(learning_rate="1e-3"), "train.learning_rate"),
    ("train", dict(batch_size=0), "train.batch_size"),
    ("train", dict(batch_size=8.0), "train.batch_size"),
    ("train", dict(adam_b2=1.0), "train.adam_b2"),
    ("train", dict(label_smoothing=1.0), "train.label_smoothing"),
    ("train", dict(log_every=0), "train.log_every"),
    ("eval", dict(beam_size=0), "eval.beam_size"),
    ("model", dict(load_balancing_weight=-1.0), "model.load_balancing_weight"),
  ],
)
def test_validate_run_config_names_the_bad_field(section, overrides, field):
  """Out-of-range or wrongly typed run settings raise ConfigError naming the dotted field."""
  with pytest.raises(ConfigError, match=f"^{re.escape(field)}:"):
    validate_run_config(_run_config(section, **overrides))


@pytest.mark.parametrize(
  "overrides,field",
  [(dict(num_train=0), "data.num_train"), (dict(seed=-1), "data.seed"), (dict(dir="x"), "data.dir")],
)
def test_dates_data_settings_are_checked_by_its_loader(overrides, field):
  data_config = configs.tmoe.get_config().data
  data_config.update(overrides)
  with pytest.raises(ConfigError, match=f"^{re.escape(field)}:"):
    load_seq2seq_data(data_config)


def test_validate_run_config_names_a_missing_field():
  """A run setting that is absent altogether is reported by its dotted name."""
  values = configs.tmoe.get_config().to_dict()
  del values["train"]["seed"]
  with pytest.raises(ConfigError, match=r"^train\.seed: missing"):
    validate_run_config(ml_collections.ConfigDict(values))


# ---------------------------------------------------------------------------
# Every shipped config builds a working model.


def test_config_modules_were_found():
  """The glob below really sees the shipped configs (guards against a silently empty parametrize)."""
  assert "tmoe" in SEQ2SEQ_CONFIGS


@nnx.jit
def _forward(model, source, target_input):
  return model(source, target_input)


@pytest.mark.parametrize("name", SEQ2SEQ_CONFIGS)
def test_config_module_builds_and_runs(name):
  """configs/<name>.py loads, validates, builds its Transformer and runs one forward pass.

  The model is shrunk (width and length only, keeping the layer and expert
  structure) so that building and compiling it stays quick on CPU.
  """
  cfg = shipped_config(name)
  validate_run_config(cfg)
  cfg.model.d_model = 16
  cfg.model.num_heads = 2
  cfg.model.d_ff = 24
  config = TransformerConfig.from_config(cfg.model, vocab_size=50)
  model = Transformer(config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  source = jnp.asarray(rng.integers(1, 50, size=(2, 5)), jnp.int32).at[1, 3:].set(0)
  target = jnp.asarray(rng.integers(1, 50, size=(2, 4)), jnp.int32).at[0, 3:].set(0)
  logits, auxes = _forward(model, source, target)
  chex.assert_shape(logits, (2, 4, 50))
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  assert len(auxes) == model.num_moe_layers
  expected_moe = [config.is_moe_layer(i) for i in range(config.num_layers)]
  assert [not isinstance(layer.ffn, DenseFeedForward) for layer in model.encoder_layers] == expected_moe
  for aux in auxes:
    assert np.isfinite(float(aux.load_balancing_loss)) and np.isfinite(float(aux.router_z_loss))
