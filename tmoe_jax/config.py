"""Typed model settings, built once from an `ml_collections.ConfigDict`.

Modules never read a ConfigDict: `TransformerConfig.from_config` validates the
`model` section at the boundary (with the one typed builder,
`validation.settings_from_section`) and every later consumer gets a frozen
dataclass; the MoE settings inside it are a nested `moe.settings.MoEConfig`.
Every check raises `ConfigError` naming the offending field, so the command line
can print one clear message instead of a JAX traceback.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from tmoe_jax.moe.settings import (  # noqa: F401 (re-exported: the MoE settings are declared there)
  ACTIVATIONS,
  DISPATCHES,
  EXPERT_TYPES,
  MOE_SHAPE_FIELDS,
  ROUTERS,
  SOFTMAX_ORDERS,
  MoEConfig,
)
from tmoe_jax.validation import (  # noqa: F401 (require* re-exported for the model configs)
  DTYPES,
  FieldRule,
  require,
  require_type,
  settings_from_section,
  validate_fields,
)

POSITION_EMBEDDINGS = ("sinusoidal", "learned")
MOE_LAYERS = ("sparse", "smoe")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Settings of the encoder-decoder Transformer (pre-LN, Vaswani et al. 2017).

  `moe` holds the MoE layers' settings (None = the defaults); its shape fields
  (`LayerShape`) are set from this model's. Every `moe_every`-th feed-forward
  block is MoE, of the kind `moe_layer` names.
  """

  vocab_size: int
  d_model: int = 128
  num_heads: int = 4
  num_layers: int = 2
  num_decoder_layers: int = 2
  d_ff: int = 256
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  share_embeddings: bool = True
  position_embedding: str = "sinusoidal"
  max_length: int = 64
  activation: str = "relu"
  moe_every: int = 2
  moe_layer: str = "sparse"
  smoe_keep_rate: float = 0.5
  dtype: Any = jnp.float32
  moe: MoEConfig | None = None

  def __post_init__(self):
    # The MoE layers take their shape from this model, whatever `moe` was built with.
    object.__setattr__(self, "moe", dataclasses.replace(self.moe or MoEConfig(), **self._moe_shape()))
    require(
      self.moe_layer in MOE_LAYERS, "model.moe_layer", f"must be one of {MOE_LAYERS}, got {self.moe_layer!r}"
    )
    require(
      0.0 < self.smoe_keep_rate <= 1.0,
      "model.smoe_keep_rate",
      f"must be in (0, 1], got {self.smoe_keep_rate}",
    )
    for name in ("vocab_size", "d_model", "num_heads", "d_ff", "max_length"):
      require(getattr(self, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
    for name in ("num_layers", "num_decoder_layers", "moe_every"):
      require(getattr(self, name) >= 0, f"model.{name}", f"must be >= 0, got {getattr(self, name)}")
    require(
      self.d_model % self.num_heads == 0,
      "model.num_heads",
      f"must divide d_model={self.d_model}, got {self.num_heads}",
    )
    for name in ("dropout_rate", "attention_dropout_rate"):
      rate = getattr(self, name)
      require(0.0 <= rate < 1.0, f"model.{name}", f"must be in [0, 1), got {rate}")
    require(
      self.position_embedding in POSITION_EMBEDDINGS,
      "model.position_embedding",
      f"must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}",
    )
    require(self.activation in ACTIVATIONS, "model.activation", f"must be one of {ACTIVATIONS}")
    if self.moe_every:
      decoder_has_moe = any(self.is_moe_layer(i) for i in range(self.num_decoder_layers))
      require(
        not (self.moe.router == "expert_choice" and decoder_has_moe),
        "model.router",
        "expert_choice is not causal (a token's experts depend on later tokens), so it cannot be used "
        "in decoder layers; use top_k, or moe_every larger than num_decoder_layers",
      )

  def _moe_shape(self) -> dict[str, Any]:
    return {name: getattr(self, name) for name in MOE_SHAPE_FIELDS}

  def is_moe_layer(self, layer_index: int) -> bool:
    """Every `moe_every`-th feed-forward block is MoE (Switch/GShard); 0 = none."""
    return self.moe_every > 0 and (layer_index + 1) % self.moe_every == 0

  @classmethod
  def from_flat(cls, **fields) -> TransformerConfig:
    """Built from flat keyword fields, as the `model.*` config keys are: `num_experts=8, top_k=1, ...`

    Fields of `MoEConfig` (other than its shape) go into `moe`; the rest are this model's.
    """
    moe = MoEConfig.pop_flat_fields(fields)
    return cls(**fields, moe=moe)

  @classmethod
  def from_config(cls, model_config, *, vocab_size: int) -> TransformerConfig:
    """Builds from the `model` section of a ConfigDict, type-checking each field."""
    return settings_from_section(
      cls, model_config, vocab_size=vocab_size, moe=MoEConfig.from_section(model_config)
    )


# The run settings every experiment shares; the model section is checked by the task.
TRAIN_LOOP_FIELDS: tuple[FieldRule, ...] = (
  ("train.num_steps", int, lambda v: v >= 0, ">= 0"),
  ("train.batch_size", int, lambda v: v >= 1, ">= 1"),
  ("train.learning_rate", (int, float), lambda v: v > 0, "> 0"),
  ("train.warmup_steps", int, lambda v: v >= 0, ">= 0"),
  ("train.final_learning_rate_fraction", (int, float), lambda v: 0 <= v <= 1, "in [0, 1]"),
  ("train.adam_b1", (int, float), lambda v: 0 <= v < 1, "in [0, 1)"),
  ("train.adam_b2", (int, float), lambda v: 0 <= v < 1, "in [0, 1)"),
  ("train.weight_decay", (int, float), lambda v: v >= 0, ">= 0"),
  ("train.grad_clip_norm", (int, float), lambda v: v >= 0, ">= 0 (0 = off)"),
  ("train.seed", int, lambda v: v >= 0, ">= 0"),
  ("train.log_every", int, lambda v: v >= 1, ">= 1"),
  ("train.eval_every", int, lambda v: v >= 0, ">= 0 (0 = only at the end)"),
  ("train.checkpoint_every", int, lambda v: v >= 0, ">= 0 (0 = only at the end)"),
  ("train.keep_checkpoints", int, lambda v: v >= 1, ">= 1"),
  ("eval.batch_size", int, lambda v: v >= 1, ">= 1"),
  ("eval.num_examples_during_training", int, lambda v: v >= 1, ">= 1"),
  ("mesh.data", int, lambda v: v == -1 or v >= 1, ">= 1, or -1 for the remaining devices"),
  ("mesh.expert", int, lambda v: v == -1 or v >= 1, ">= 1, or -1 for the remaining devices"),
)
# The MoE auxiliary-loss weights, for every task whose model has MoE layers.
MOE_LOSS_FIELDS: tuple[FieldRule, ...] = (
  ("model.load_balancing_weight", (int, float), lambda v: v >= 0, ">= 0"),
  ("model.router_z_weight", (int, float), lambda v: v >= 0, ">= 0"),
)
SEQ2SEQ_FIELDS: tuple[FieldRule, ...] = (
  ("train.label_smoothing", (int, float), lambda v: 0 <= v < 1, "in [0, 1)"),
  ("eval.beam_size", int, lambda v: v >= 1, ">= 1 (1 = greedy)"),
)


def validate_run_config(config) -> None:
  """Checks the train/eval/data settings of a seq2seq run; raises ConfigError naming the first bad field."""
  validate_fields(config, TRAIN_LOOP_FIELDS + MOE_LOSS_FIELDS + SEQ2SEQ_FIELDS)
