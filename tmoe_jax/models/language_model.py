"""Decoder-only Transformer language model whose feed-forward blocks are dense, top-k MoE or sMoE.

Shapes: B batch, L length, D d_model, V vocabulary, F hidden width, E experts
(sMoE: masks), K experts per token.

Each layer is the Transformer's `blocks.ResidualBlock` with a causal mask and,
as its feed-forward layer (`model.ffn`, one of `blocks.FEED_FORWARDS`), the
dense FFN, a top-k MoE or an sMoE.

Equal active parameters: `model.d_ff` is the number of hidden units each token
uses. The dense FFN has d_ff units; each of the E top-k experts has
d_ff / K, so a token's K experts hold d_ff units together; the sMoE's shared
FFN has d_ff / keep_rate units, of which a mask keeps d_ff on average
(`ffn_hidden_width`). The variants then differ in active parameters only by
their routers (D x E) and the K - 1 extra output biases of top-k
(`active_ffn_parameters`), while the MoE holds E / K times the dense FFN's
parameters and the sMoE 1 / keep_rate times.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from tmoe_jax.attention import causal_mask
from tmoe_jax.embeddings import PositionEmbedding
from tmoe_jax.models.blocks import (
  FEED_FORWARDS,
  build_block,
  check_causal_feed_forward,
  check_stack_settings,
  run_stack,
)
from tmoe_jax.moe.settings import HoldsMoESettings, MoEConfig, SMoEConfig
from tmoe_jax.moe.statistics import MoEAux
from tmoe_jax.validation import require

FFNS = FEED_FORWARDS


def ffn_hidden_width(ffn: str, d_ff: int, top_k: int, keep_rate: float) -> int:
  """Hidden units of one dense FFN, one top-k expert, or the sMoE's shared FFN, for d_ff active units."""
  if ffn == "dense":
    return d_ff
  if ffn == "moe":
    return d_ff // top_k
  return round(d_ff / keep_rate)


def active_ffn_parameters(
  ffn: str, d_model: int, d_ff: int, num_experts: int, top_k: int, keep_rate: float
) -> float:
  """Parameters one token uses in one feed-forward layer (the sMoE's: expected over its mask).

  dense: D F + F + F D + D. moe: the router D E plus K experts of width F / K.
  smoe: the router D M plus the kept share of the shared FFN's hidden units
  (their input weights, biases and output weights) and the output bias.
  """
  width = ffn_hidden_width(ffn, d_ff, top_k, keep_rate)
  mlp = 2 * d_model * width + width + d_model
  if ffn == "dense":
    return float(mlp)
  if ffn == "moe":
    return float(d_model * num_experts + top_k * mlp)
  return d_model * num_experts + keep_rate * (2 * d_model * width + width) + d_model


@dataclasses.dataclass(frozen=True)
class LanguageModelConfig(HoldsMoESettings):
  """Settings of the decoder-only LM, from the flat `model` config section.

  `moe` holds the top-k MoE settings (every feature of `MoEConfig`; None = the
  defaults); its shape is set from this model's, `d_ff / top_k` units per expert.
  Its `num_experts` is also the sMoE's number of masks. `remat` (`blocks.REMATS`) is what
  the backward pass recomputes of each block instead of keeping it ("none": nothing).
  """

  vocab_size: int
  d_model: int = 128
  num_heads: int = 4
  num_layers: int = 2
  d_ff: int = 256
  dropout_rate: float = 0.0
  position_embedding: str = "sinusoidal"
  max_length: int = 128
  activation: str = "relu"
  ffn: str = "smoe"
  dtype: Any = jnp.float32
  remat: str = "none"
  moe: MoEConfig | None = None
  smoe: SMoEConfig | None = None

  # This model's defaults (the Transformer's are the settings classes' own).
  MOE_DEFAULTS: ClassVar[dict[str, Any]] = {"num_experts": 10}
  SMOE_DEFAULTS: ClassVar[dict[str, Any]] = {"keep_rate": 0.8, "mask_scaling": "mask_mean"}

  def __post_init__(self):
    top_k = (self.moe or MoEConfig(**self.MOE_DEFAULTS)).top_k
    object.__setattr__(self, "smoe", self.smoe or SMoEConfig(**self.SMOE_DEFAULTS))
    # The MoE layers take their shape from this model (hidden_width units per expert).
    moe = dataclasses.replace(self.moe or MoEConfig(**self.MOE_DEFAULTS), **self._moe_shape(top_k))
    object.__setattr__(self, "moe", moe)
    require(self.ffn in FFNS, "model.ffn", f"must be one of {FFNS}, got {self.ffn!r}")
    for name in ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_length"):
      require(getattr(self, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
    require(
      0.0 <= self.dropout_rate < 1.0, "model.dropout_rate", f"must be in [0, 1), got {self.dropout_rate}"
    )
    check_stack_settings(self)
    require(
      self.d_ff % top_k == 0,
      "model.d_ff",
      f"must be a multiple of top_k={top_k} (each of the K experts has d_ff / K units), got {self.d_ff}",
    )
    check_causal_feed_forward(self)

  def _moe_shape(self, top_k: int) -> dict[str, Any]:
    width = ffn_hidden_width("moe", self.d_ff, top_k, self.smoe.keep_rate)
    return {"d_model": self.d_model, "d_ff": width, "activation": self.activation, "dtype": self.dtype}

  @property
  def hidden_width(self) -> int:
    return ffn_hidden_width(self.ffn, self.d_ff, self.moe.top_k, self.smoe.keep_rate)

  @property
  def active_ffn_parameters(self) -> float:
    """Per layer and token; see `active_ffn_parameters`."""
    return active_ffn_parameters(
      self.ffn, self.d_model, self.d_ff, self.moe.num_experts, self.moe.top_k, self.smoe.keep_rate
    )


class LanguageModel(nnx.Module):
  """`__call__(tokens [B, L])` -> (next-token logits [B, L, V] float32, MoEAux per MoE layer).

  Input and output embeddings are tied (as `Transformer` with shared embeddings).
  """

  def __init__(self, config: LanguageModelConfig, *, mesh=None, rngs: nnx.Rngs):
    """`mesh`: a ('data', 'expert') mesh for expert-parallel top-k MoE layers; None = one device."""
    self.config = config
    self.embedding = nnx.Embed(
      config.vocab_size,
      config.d_model,
      embedding_init=nnx.initializers.normal(config.d_model**-0.5),
      dtype=config.dtype,
      rngs=rngs,
    )
    self.positions = PositionEmbedding(
      config.position_embedding, config.max_length, config.d_model, rngs=rngs
    )
    self.embedding_dropout = nnx.Dropout(config.dropout_rate)
    # Each layer: causal self-attention, then the `config.ffn` layer, `hidden_width` units wide.
    self.layers = nnx.List(
      [
        build_block(config, i, kind=config.ffn, hidden_width=config.hidden_width, mesh=mesh, rngs=rngs)
        for i in range(config.num_layers)
      ]
    )
    self.final_norm = nnx.LayerNorm(config.d_model, dtype=config.dtype, rngs=rngs)

  def __call__(
    self,
    tokens_BxL: jax.Array,
    *,
    deterministic: bool = True,
    rngs: nnx.Rngs | None = None,
    step: jax.Array | int | None = None,
  ) -> tuple[jax.Array, tuple[MoEAux, ...]]:
    """`step` (the train step, possibly traced) drives the sMoE sampling schedule in training."""
    # sqrt(D) scaling as in `Transformer`, so embeddings and positions have similar scale.
    x = self.embedding(tokens_BxL) * jnp.sqrt(self.config.d_model).astype(self.config.dtype)
    x = self.embedding_dropout(self.positions(x), deterministic=deterministic, rngs=rngs)
    mask = causal_mask(tokens_BxL.shape[1])
    x, auxes = run_stack(self.layers, x, mask, deterministic=deterministic, rngs=rngs, step=step)
    return self.embedding.attend(self.final_norm(x)).astype(jnp.float32), auxes
