"""Decoder-only Transformer language model whose feed-forward blocks are dense, top-k MoE or sMoE.

Shapes: B batch, L length, D d_model, V vocabulary, F hidden width, E experts
(sMoE: masks), K experts per token.

Built from the library's pieces: `attention.MultiHeadAttention` with
`attention.causal_mask`, `embeddings.PositionEmbedding`, and as the
feed-forward layer (`model.ffn`, `FFNS`) one of `feedforward.FeedForward`,
`moe.layer.MoEFeedForward` or `moe.smoe.SingleMixtureOfExperts`. A block is
the pre-LN layer of `transformer.EncoderLayer` with a causal mask; it is its
own class because the sMoE's sampling schedule needs the train step, which
`transformer.FeedForwardBlock` does not pass on.

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
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tmoe_jax.attention import MultiHeadAttention, causal_mask
from tmoe_jax.config import ACTIVATIONS, POSITION_EMBEDDINGS
from tmoe_jax.embeddings import PositionEmbedding
from tmoe_jax.feedforward import FeedForward
from tmoe_jax.moe.layer import MoEFeedForward
from tmoe_jax.moe.settings import MoEConfig
from tmoe_jax.moe.smoe import MASK_SCALINGS, SELECTIONS, SingleMixtureOfExperts
from tmoe_jax.moe.statistics import MoEAux
from tmoe_jax.validation import require, settings_from_section

FFNS = ("dense", "moe", "smoe")


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
class LanguageModelConfig:
  """Settings of the decoder-only LM, from the flat `model` config section.

  `moe` holds the top-k MoE settings (every feature of `MoEConfig`; None = the
  defaults); its shape is set from this model's, `d_ff / top_k` units per expert.
  Its `num_experts` is also the sMoE's number of masks.
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
  smoe_keep_rate: float = 0.8
  smoe_selection: str = "gated_top1"
  smoe_sample_steps: int = 1000
  smoe_mask_scaling: str = "mask_mean"
  dtype: Any = jnp.float32
  moe: MoEConfig | None = None

  def __post_init__(self):
    top_k = (self.moe or MoEConfig(num_experts=10)).top_k
    # The MoE layers take their shape from this model (hidden_width units per expert).
    moe = dataclasses.replace(self.moe or MoEConfig(num_experts=10), **self._moe_shape(top_k))
    object.__setattr__(self, "moe", moe)
    require(self.ffn in FFNS, "model.ffn", f"must be one of {FFNS}, got {self.ffn!r}")
    for name in ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_length"):
      require(getattr(self, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
    require(
      self.d_model % self.num_heads == 0,
      "model.num_heads",
      f"must divide d_model={self.d_model}, got {self.num_heads}",
    )
    require(
      0.0 <= self.dropout_rate < 1.0, "model.dropout_rate", f"must be in [0, 1), got {self.dropout_rate}"
    )
    require(
      self.position_embedding in POSITION_EMBEDDINGS,
      "model.position_embedding",
      f"must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}",
    )
    require(self.activation in ACTIVATIONS, "model.activation", f"must be one of {ACTIVATIONS}")
    require(
      self.d_ff % top_k == 0,
      "model.d_ff",
      f"must be a multiple of top_k={top_k} (each of the K experts has d_ff / K units), got {self.d_ff}",
    )
    require(
      0.0 < self.smoe_keep_rate <= 1.0,
      "model.smoe_keep_rate",
      f"must be in (0, 1], got {self.smoe_keep_rate}",
    )
    require(
      self.smoe_selection in SELECTIONS,
      "model.smoe_selection",
      f"must be one of {SELECTIONS}, got {self.smoe_selection!r}",
    )
    require(
      self.smoe_sample_steps >= 0, "model.smoe_sample_steps", f"must be >= 0, got {self.smoe_sample_steps}"
    )
    require(
      self.smoe_mask_scaling in MASK_SCALINGS,
      "model.smoe_mask_scaling",
      f"must be one of {MASK_SCALINGS}, got {self.smoe_mask_scaling!r}",
    )
    require(
      self.ffn != "moe" or self.moe.router == "top_k",
      "model.router",
      f"{self.moe.router} is not causal (a token's experts depend on later tokens), so a language "
      "model cannot use it; use top_k",
    )

  def _moe_shape(self, top_k: int) -> dict[str, Any]:
    width = ffn_hidden_width("moe", self.d_ff, top_k, self.smoe_keep_rate)
    return {"d_model": self.d_model, "d_ff": width, "activation": self.activation, "dtype": self.dtype}

  @property
  def hidden_width(self) -> int:
    return ffn_hidden_width(self.ffn, self.d_ff, self.moe.top_k, self.smoe_keep_rate)

  @property
  def active_ffn_parameters(self) -> float:
    """Per layer and token; see `active_ffn_parameters`."""
    return active_ffn_parameters(
      self.ffn, self.d_model, self.d_ff, self.moe.num_experts, self.moe.top_k, self.smoe_keep_rate
    )

  @classmethod
  def from_flat(cls, **fields) -> LanguageModelConfig:
    """Built from flat keyword fields, as the `model.*` config keys are (`num_experts=4, top_k=1, ...`)."""
    moe = MoEConfig.pop_flat_fields(fields, num_experts=10)
    return cls(**fields, moe=moe)

  @classmethod
  def from_config(cls, model_config, *, vocab_size: int) -> LanguageModelConfig:
    """Builds from the `model` section, type-checking each field (ConfigError names the field)."""
    return settings_from_section(
      cls, model_config, vocab_size=vocab_size, moe=MoEConfig.from_section(model_config)
    )


def build_ffn(config: LanguageModelConfig, layer_index: int, *, mesh=None, rngs: nnx.Rngs) -> nnx.Module:
  """The feed-forward layer named by `config.ffn`, `config.hidden_width` units wide."""
  if config.ffn == "moe":
    return MoEFeedForward(config.moe, mesh=mesh, rngs=rngs)
  if config.ffn == "smoe":
    return SingleMixtureOfExperts(
      config.d_model,
      config.hidden_width,
      num_masks=config.moe.num_experts,
      keep_rate=config.smoe_keep_rate,
      activation=config.activation,
      # Per token: routing a whole sequence on its mean would leak later tokens into earlier
      # predictions of a causal LM (see `SingleMixtureOfExperts`).
      per_sequence=False,
      mask_seed=layer_index,
      selection=config.smoe_selection,
      sample_steps=config.smoe_sample_steps,
      mask_scaling=config.smoe_mask_scaling,
      dtype=config.dtype,
      rngs=rngs,
    )
  return FeedForward(
    config.d_model, config.hidden_width, activation=config.activation, dtype=config.dtype, rngs=rngs
  )


class DecoderBlock(nnx.Module):
  """Pre-LN causal self-attention, then the feed-forward layer, each with a residual and dropout."""

  def __init__(self, config: LanguageModelConfig, layer_index: int, *, mesh=None, rngs: nnx.Rngs):
    self.ffn_kind = config.ffn
    self.attention_norm = nnx.LayerNorm(config.d_model, rngs=rngs)
    self.attention = MultiHeadAttention(config.d_model, config.num_heads, dtype=config.dtype, rngs=rngs)
    self.ffn_norm = nnx.LayerNorm(config.d_model, rngs=rngs)
    self.ffn = build_ffn(config, layer_index, mesh=mesh, rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout_rate)

  def __call__(
    self, x_BxLxD, mask_1x1xLxL, *, deterministic: bool, rngs: nnx.Rngs | None, step
  ) -> tuple[jax.Array, MoEAux | None]:
    normed = self.attention_norm(x_BxLxD)
    attended = self.attention(normed, normed, mask_1x1xLxL, deterministic=deterministic, rngs=rngs)
    x_BxLxD = x_BxLxD + self.dropout(attended, deterministic=deterministic, rngs=rngs)
    normed = self.ffn_norm(x_BxLxD)
    aux = None
    if self.ffn_kind == "dense":
      y = self.ffn(normed, deterministic=deterministic, rngs=rngs)
    elif self.ffn_kind == "smoe":
      y, aux = self.ffn(normed, deterministic=deterministic, rngs=rngs, step=step)
    else:
      y, aux = self.ffn(normed, deterministic=deterministic, rngs=rngs)
    return x_BxLxD + self.dropout(y, deterministic=deterministic, rngs=rngs), aux


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
    self.layers = nnx.List([DecoderBlock(config, i, mesh=mesh, rngs=rngs) for i in range(config.num_layers)])
    self.final_norm = nnx.LayerNorm(config.d_model, rngs=rngs)

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
    auxes = []
    for layer in self.layers:
      x, aux = layer(x, mask, deterministic=deterministic, rngs=rngs, step=step)
      if aux is not None:
        auxes.append(aux)
    return self.embedding.attend(self.final_norm(x)).astype(jnp.float32), tuple(auxes)
