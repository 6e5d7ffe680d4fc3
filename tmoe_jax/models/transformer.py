"""Encoder-decoder Transformer whose feed-forward blocks can be MoE layers.

Shapes: B batch, S source length, L target length, D d_model, V vocabulary.
Both stacks are `blocks.ResidualBlock`s (pre-LN, x + f(LayerNorm(x))) with a
final LayerNorm each, which trains stably without warm-up at the small sizes
used here; every `moe_every`-th block's feed-forward layer is `moe_layer`
("moe" or "smoe"), the others dense.

Token id 0 is padding everywhere. `encode` and `decode` are separate so that
decoding reuses the encoder output, and `init_decode_cache` / `decode_step`
decode one token at a time with a key-value cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from tmoe_jax.attention import causal_mask, padding_mask
from tmoe_jax.embeddings import PAD_ID, PositionEmbedding
from tmoe_jax.models.blocks import BlockCache, build_block, check_stack_settings, run_stack
from tmoe_jax.moe.routers import CAUSAL_ROUTERS
from tmoe_jax.moe.settings import MOE_SHAPE_FIELDS, HoldsMoESettings, MoEConfig, SMoEConfig
from tmoe_jax.moe.statistics import MoEAux
from tmoe_jax.validation import require

# Feed-forward layer ids (they seed the sMoE's masks): encoder layer i is i, decoder layer i
# is DECODER_LAYER_ID_OFFSET + i.
DECODER_LAYER_ID_OFFSET = 1000
# The MoE layer kinds (`blocks.FEED_FORWARDS` less "dense"); "sparse" is the name "moe" had
# before the feed-forward kinds were one table, kept so that old configs and runs load.
MOE_LAYERS = ("moe", "smoe")
MOE_LAYER_ALIASES = {"sparse": "moe"}
# Parameter paths before the encoder, decoder and language model shared `ResidualBlock`
# (regex over dotted checkpoint names -> replacement), so that runs saved then restore.
PARAMETER_RENAMES: tuple[tuple[str, str], ...] = (
  (r"(encoder_layers\.\d+)\.norm\b", r"\1.attention_norm"),
  (r"(decoder_layers\.\d+)\.self_norm\b", r"\1.attention_norm"),
  (r"(decoder_layers\.\d+)\.self_attention\b", r"\1.attention"),
  (r"(decoder_layers\.\d+)\.cross_norm\b", r"\1.cross_attention_norm"),
  (r"(_layers\.\d+)\.feed_forward\.norm\b", r"\1.ffn_norm"),
  (r"(_layers\.\d+)\.feed_forward\.ffn\b", r"\1.ffn"),
)


@dataclasses.dataclass(frozen=True)
class TransformerConfig(HoldsMoESettings):
  """Settings of the encoder-decoder Transformer (pre-LN, Vaswani et al. 2017).

  `moe` holds the MoE layers' settings and `smoe` the sMoE's (None = the
  defaults); the MoE shape fields (`LayerShape`) are set from this model's.
  Every `moe_every`-th feed-forward block is MoE, of the kind `moe_layer` names;
  an sMoE's shared FFN has d_ff units. `remat` (`blocks.REMATS`) is what the backward
  pass recomputes of each block instead of keeping it ("none": nothing).
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
  moe_layer: str = "moe"
  dtype: Any = jnp.float32
  remat: str = "none"
  moe: MoEConfig | None = None
  smoe: SMoEConfig | None = None

  def __post_init__(self):
    # The MoE layers take their shape from this model, whatever `moe` was built with.
    object.__setattr__(self, "moe", dataclasses.replace(self.moe or MoEConfig(), **self._moe_shape()))
    object.__setattr__(self, "smoe", self.smoe or SMoEConfig())
    object.__setattr__(self, "moe_layer", MOE_LAYER_ALIASES.get(self.moe_layer, self.moe_layer))
    require(
      self.moe_layer in MOE_LAYERS,
      "model.moe_layer",
      f"must be one of {MOE_LAYERS} ('sparse' = 'moe'), got {self.moe_layer!r}",
    )
    for name in ("vocab_size", "d_model", "num_heads", "d_ff", "max_length"):
      require(getattr(self, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
    for name in ("num_layers", "num_decoder_layers", "moe_every"):
      require(getattr(self, name) >= 0, f"model.{name}", f"must be >= 0, got {getattr(self, name)}")
    for name in ("dropout_rate", "attention_dropout_rate"):
      rate = getattr(self, name)
      require(0.0 <= rate < 1.0, f"model.{name}", f"must be in [0, 1), got {rate}")
    check_stack_settings(self)
    if self.moe_every and self.moe_layer == "moe":
      decoder_has_moe = any(self.is_moe_layer(i) for i in range(self.num_decoder_layers))
      require(
        self.moe.router in CAUSAL_ROUTERS or not decoder_has_moe,
        "model.router",
        f"{self.moe.router} is not causal (a token's experts depend on later tokens), so it cannot be "
        f"used in decoder layers; use one of {CAUSAL_ROUTERS}, or moe_every larger than num_decoder_layers",
      )

  def _moe_shape(self) -> dict[str, Any]:
    return {name: getattr(self, name) for name in MOE_SHAPE_FIELDS}

  def is_moe_layer(self, layer_index: int) -> bool:
    """Every `moe_every`-th feed-forward block is MoE (Switch/GShard); 0 = none."""
    return self.moe_every > 0 and (layer_index + 1) % self.moe_every == 0


def build_layer(config: TransformerConfig, layer_index: int, *, decoder: bool, mesh=None, rngs: nnx.Rngs):
  """Encoder or decoder layer `layer_index`: a `ResidualBlock`, with cross-attention in the decoder."""
  return build_block(
    config,
    DECODER_LAYER_ID_OFFSET + layer_index if decoder else layer_index,
    kind=config.moe_layer if config.is_moe_layer(layer_index) else "dense",
    hidden_width=config.d_ff,
    cross_attention=decoder,
    ffn_dropout_rate=config.dropout_rate,
    mesh=mesh,
    rngs=rngs,
  )


@struct.dataclass
class DecodeCache:
  """Everything `decode_step` needs: per-layer caches and the source padding mask."""

  layers: tuple[BlockCache, ...]
  source_valid_BxS: jax.Array


class Transformer(nnx.Module):
  """Seq2seq Transformer; `__call__` returns (logits [B, L, V], tuple of MoEAux per MoE layer)."""

  def __init__(self, config: TransformerConfig, *, mesh=None, rngs: nnx.Rngs):
    """`mesh`: a ('data', 'expert') mesh for the expert-parallel MoE layers; None = one device."""
    self.config = config
    embed_init = nnx.initializers.normal(config.d_model**-0.5)
    self.source_embedding = nnx.Embed(
      config.vocab_size, config.d_model, embedding_init=embed_init, dtype=config.dtype, rngs=rngs
    )
    if config.share_embeddings:
      self.target_embedding = self.source_embedding
    else:
      self.target_embedding = nnx.Embed(
        config.vocab_size, config.d_model, embedding_init=embed_init, dtype=config.dtype, rngs=rngs
      )
    self.source_positions = PositionEmbedding(
      config.position_embedding, config.max_length, config.d_model, rngs=rngs
    )
    self.target_positions = PositionEmbedding(
      config.position_embedding, config.max_length, config.d_model, rngs=rngs
    )
    self.embedding_dropout = nnx.Dropout(config.dropout_rate)
    self.encoder_layers = nnx.List(
      [build_layer(config, i, decoder=False, mesh=mesh, rngs=rngs) for i in range(config.num_layers)]
    )
    self.encoder_norm = nnx.LayerNorm(config.d_model, dtype=config.dtype, rngs=rngs)
    self.decoder_layers = nnx.List(
      [build_layer(config, i, decoder=True, mesh=mesh, rngs=rngs) for i in range(config.num_decoder_layers)]
    )
    self.decoder_norm = nnx.LayerNorm(config.d_model, dtype=config.dtype, rngs=rngs)
    if not config.share_embeddings:
      self.output_projection = nnx.Linear(config.d_model, config.vocab_size, dtype=config.dtype, rngs=rngs)

  def _embed(self, tokens_BxL, embedding, positions, offset=0, *, deterministic=True, rngs=None):
    # sqrt(D) scaling as in Vaswani et al., so embeddings and positions have similar scale.
    x_BxLxD = embedding(tokens_BxL) * jnp.sqrt(self.config.d_model).astype(self.config.dtype)
    x_BxLxD = positions(x_BxLxD, offset)
    return self.embedding_dropout(x_BxLxD, deterministic=deterministic, rngs=rngs)

  def _logits(self, y_BxLxD):
    if self.config.share_embeddings:
      logits = self.target_embedding.attend(y_BxLxD)
    else:
      logits = self.output_projection(y_BxLxD)
    return logits.astype(jnp.float32)

  def encode(self, source_BxS, *, deterministic: bool = True, rngs: nnx.Rngs | None = None, step=None):
    """Returns (encoded [B, S, D], MoEAux of each encoder MoE layer); `step` drives the sMoE schedule."""
    source_valid_BxS = source_BxS != PAD_ID
    mask = padding_mask(source_valid_BxS, source_valid_BxS)
    x = self._embed(
      source_BxS, self.source_embedding, self.source_positions, deterministic=deterministic, rngs=rngs
    )
    x, auxes = run_stack(
      self.encoder_layers, x, mask, source_valid_BxS, deterministic=deterministic, rngs=rngs, step=step
    )
    return self.encoder_norm(x), auxes

  def decode(
    self,
    target_input_BxL,
    encoded_BxSxD,
    source_BxS,
    *,
    deterministic: bool = True,
    rngs: nnx.Rngs | None = None,
    step=None,
  ):
    """Teacher-forced decoding; returns (logits [B, L, V] float32, MoEAux per decoder MoE layer).

    `target_input_BxL` is the target shifted right (BOS first); padding is 0.
    """
    target_valid_BxL = target_input_BxL != PAD_ID
    length = target_input_BxL.shape[1]
    self_mask = padding_mask(target_valid_BxL, target_valid_BxL) & causal_mask(length)
    cross_mask = padding_mask(target_valid_BxL, source_BxS != PAD_ID)
    y = self._embed(
      target_input_BxL, self.target_embedding, self.target_positions, deterministic=deterministic, rngs=rngs
    )
    y, auxes = run_stack(
      self.decoder_layers,
      y,
      self_mask,
      target_valid_BxL,
      memory_BxSxD=encoded_BxSxD,
      cross_mask_Bx1xLxS=cross_mask,
      deterministic=deterministic,
      rngs=rngs,
      step=step,
    )
    return self._logits(self.decoder_norm(y)), auxes

  def __call__(
    self,
    source_BxS,
    target_input_BxL,
    *,
    deterministic: bool = True,
    rngs: nnx.Rngs | None = None,
    step: jax.Array | int | None = None,
  ) -> tuple[jax.Array, tuple[MoEAux, ...]]:
    """`step` (the train step, possibly traced) drives the sMoE sampling schedule in training."""
    encoded, encoder_aux = self.encode(source_BxS, deterministic=deterministic, rngs=rngs, step=step)
    logits, decoder_aux = self.decode(
      target_input_BxL, encoded, source_BxS, deterministic=deterministic, rngs=rngs, step=step
    )
    return logits, encoder_aux + decoder_aux

  @property
  def num_moe_layers(self) -> int:
    config = self.config
    return sum(config.is_moe_layer(i) for i in range(config.num_layers)) + sum(
      config.is_moe_layer(i) for i in range(config.num_decoder_layers)
    )

  def init_decode_cache(self, encoded_BxSxD, source_BxS, max_length: int) -> DecodeCache:
    """Projects the encoder output for cross-attention once and allocates self-attention caches."""
    if max_length > self.config.max_length:
      raise ValueError(f"max decode length {max_length} exceeds model.max_length={self.config.max_length}")
    return DecodeCache(
      layers=tuple(
        layer.init_cache(encoded_BxSxD.shape[0], max_length, encoded_BxSxD.dtype, encoded_BxSxD)
        for layer in self.decoder_layers
      ),
      source_valid_BxS=source_BxS != PAD_ID,
    )

  def decode_step(self, tokens_B, cache: DecodeCache, step) -> tuple[jax.Array, DecodeCache]:
    """Feeds the token at position `step`; returns next-token logits [B, V] and the updated cache."""
    y = self._embed(tokens_B[:, None], self.target_embedding, self.target_positions, offset=step)
    cross_mask_Bx1x1xS = cache.source_valid_BxS[:, None, None, :]
    layer_caches = []
    for layer, layer_cache in zip(self.decoder_layers, cache.layers):
      y, layer_cache = layer.decode_step(y, layer_cache, step, cross_mask_Bx1x1xS)
      layer_caches.append(layer_cache)
    logits = self._logits(self.decoder_norm(y))[:, 0]
    return logits, DecodeCache(tuple(layer_caches), cache.source_valid_BxS)
