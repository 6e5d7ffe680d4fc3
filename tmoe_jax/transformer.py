"""Encoder-decoder Transformer whose feed-forward blocks can be MoE layers.

Shapes: B batch, S source length, L target length, D d_model, V vocabulary.
Pre-LN residual blocks (x + f(LayerNorm(x))) with a final LayerNorm on each
stack, which trains stably without warm-up at the small sizes used here.

Token id 0 is padding everywhere. `encode` and `decode` are separate so that
decoding reuses the encoder output, and `init_decode_cache` / `decode_step`
decode one token at a time with a key-value cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from tmoe_jax.attention import KeyValueCache, MultiHeadAttention, causal_mask, padding_mask
from tmoe_jax.config import TransformerConfig
from tmoe_jax.embeddings import PositionEmbedding
from tmoe_jax.feedforward import FeedForward
from tmoe_jax.moe.layer import MoEFeedForward
from tmoe_jax.moe.smoe import SingleMixtureOfExperts
from tmoe_jax.moe.statistics import MoEAux

# FeedForwardBlock ids: encoder layer i is i, decoder layer i is DECODER_LAYER_ID_OFFSET + i.
DECODER_LAYER_ID_OFFSET = 1000

PAD_ID = 0


def build_moe_layer(config: TransformerConfig, layer_id: int, *, mesh=None, rngs: nnx.Rngs) -> nnx.Module:
  """The MoE feed-forward layer named by `config.moe_layer` (both return (y, MoEAux)).

  `mesh`: where sparse layers run expert-parallel; sMoE's "experts" are masks over one
  replicated FFN, with nothing to split over 'expert'.
  """
  if config.moe_layer == "smoe":
    # One mask set per layer, fixed by the layer's position: masks are data, not parameters.
    return SingleMixtureOfExperts(
      config.d_model,
      config.d_ff,
      num_masks=config.moe.num_experts,
      keep_rate=config.smoe_keep_rate,
      activation=config.activation,
      mask_seed=layer_id,
      dtype=config.dtype,
      rngs=rngs,
    )
  return MoEFeedForward(config.moe, mesh=mesh, rngs=rngs)


class FeedForwardBlock(nnx.Module):
  """Pre-LN residual feed-forward block, dense or MoE by `use_moe`."""

  def __init__(self, config: TransformerConfig, use_moe: bool, layer_id: int, *, mesh=None, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(config.d_model, rngs=rngs)
    self.use_moe = use_moe
    if use_moe:
      self.ffn = build_moe_layer(config, layer_id, mesh=mesh, rngs=rngs)
    else:
      self.ffn = FeedForward(
        config.d_model,
        config.d_ff,
        activation=config.activation,
        dropout_rate=config.dropout_rate,
        dtype=config.dtype,
        rngs=rngs,
      )
    self.dropout = nnx.Dropout(config.dropout_rate)

  def __call__(
    self, x_BxLxD, token_mask_BxL, *, deterministic: bool, rngs: nnx.Rngs | None, drop_tokens: bool = True
  ):
    normed = self.norm(x_BxLxD)
    aux = None
    if self.use_moe:
      y, aux = self.ffn(
        normed, token_mask_BxL, deterministic=deterministic, drop_tokens=drop_tokens, rngs=rngs
      )
    else:
      y = self.ffn(normed, deterministic=deterministic, rngs=rngs)
    return x_BxLxD + self.dropout(y, deterministic=deterministic, rngs=rngs), aux


class EncoderLayer(nnx.Module):
  def __init__(self, config: TransformerConfig, layer_index: int, *, mesh=None, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(config.d_model, rngs=rngs)
    self.attention = MultiHeadAttention(
      config.d_model,
      config.num_heads,
      dropout_rate=config.attention_dropout_rate,
      dtype=config.dtype,
      rngs=rngs,
    )
    self.dropout = nnx.Dropout(config.dropout_rate)
    self.feed_forward = FeedForwardBlock(
      config, config.is_moe_layer(layer_index), layer_index, mesh=mesh, rngs=rngs
    )

  def __call__(self, x_BxSxD, mask_Bx1xSxS, token_mask_BxS, *, deterministic, rngs):
    normed = self.norm(x_BxSxD)
    attended = self.attention(normed, normed, mask_Bx1xSxS, deterministic=deterministic, rngs=rngs)
    x_BxSxD = x_BxSxD + self.dropout(attended, deterministic=deterministic, rngs=rngs)
    return self.feed_forward(x_BxSxD, token_mask_BxS, deterministic=deterministic, rngs=rngs)


@struct.dataclass
class DecoderLayerCache:
  self_attention: KeyValueCache
  cross_attention: KeyValueCache


class DecoderLayer(nnx.Module):
  def __init__(self, config: TransformerConfig, layer_index: int, *, mesh=None, rngs: nnx.Rngs):
    def attention():
      return MultiHeadAttention(
        config.d_model,
        config.num_heads,
        dropout_rate=config.attention_dropout_rate,
        dtype=config.dtype,
        rngs=rngs,
      )

    self.self_norm = nnx.LayerNorm(config.d_model, rngs=rngs)
    self.self_attention = attention()
    self.cross_norm = nnx.LayerNorm(config.d_model, rngs=rngs)
    self.cross_attention = attention()
    self.dropout = nnx.Dropout(config.dropout_rate)
    self.feed_forward = FeedForwardBlock(
      config, config.is_moe_layer(layer_index), DECODER_LAYER_ID_OFFSET + layer_index, mesh=mesh, rngs=rngs
    )

  def __call__(
    self,
    y_BxLxD,
    encoded_BxSxD,
    self_mask_Bx1xLxL,
    cross_mask_Bx1xLxS,
    token_mask_BxL,
    *,
    deterministic,
    rngs,
  ):
    normed = self.self_norm(y_BxLxD)
    attended = self.self_attention(normed, normed, self_mask_Bx1xLxL, deterministic=deterministic, rngs=rngs)
    y_BxLxD = y_BxLxD + self.dropout(attended, deterministic=deterministic, rngs=rngs)
    normed = self.cross_norm(y_BxLxD)
    attended = self.cross_attention(
      normed, encoded_BxSxD, cross_mask_Bx1xLxS, deterministic=deterministic, rngs=rngs
    )
    y_BxLxD = y_BxLxD + self.dropout(attended, deterministic=deterministic, rngs=rngs)
    return self.feed_forward(y_BxLxD, token_mask_BxL, deterministic=deterministic, rngs=rngs)

  def init_cache(self, encoded_BxSxD, max_length: int) -> DecoderLayerCache:
    return DecoderLayerCache(
      self_attention=self.self_attention.empty_cache(encoded_BxSxD.shape[0], max_length, encoded_BxSxD.dtype),
      cross_attention=self.cross_attention.project_key_value(encoded_BxSxD),
    )

  def decode_step(self, y_Bx1xD, cache: DecoderLayerCache, cross_mask_Bx1x1xS, step):
    normed = self.self_norm(y_Bx1xD)
    attended, self_cache = self.self_attention.decode_step(normed, cache.self_attention, step)
    y_Bx1xD = y_Bx1xD + attended
    normed = self.cross_norm(y_Bx1xD)
    y_Bx1xD = y_Bx1xD + self.cross_attention.attend(
      normed, cache.cross_attention, cross_mask_Bx1x1xS, deterministic=True, rngs=None
    )
    y_Bx1xD, _ = self.feed_forward(y_Bx1xD, None, deterministic=True, rngs=None, drop_tokens=False)
    return y_Bx1xD, DecoderLayerCache(self_cache, cache.cross_attention)


@struct.dataclass
class DecodeCache:
  """Everything `decode_step` needs: per-layer caches and the source padding mask."""

  layers: tuple[DecoderLayerCache, ...]
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
      [EncoderLayer(config, i, mesh=mesh, rngs=rngs) for i in range(config.num_layers)]
    )
    self.encoder_norm = nnx.LayerNorm(config.d_model, rngs=rngs)
    self.decoder_layers = nnx.List(
      [DecoderLayer(config, i, mesh=mesh, rngs=rngs) for i in range(config.num_decoder_layers)]
    )
    self.decoder_norm = nnx.LayerNorm(config.d_model, rngs=rngs)
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

  def encode(self, source_BxS, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
    """Returns (encoded [B, S, D], MoEAux of each encoder MoE layer)."""
    source_valid_BxS = source_BxS != PAD_ID
    mask = padding_mask(source_valid_BxS, source_valid_BxS)
    x = self._embed(
      source_BxS, self.source_embedding, self.source_positions, deterministic=deterministic, rngs=rngs
    )
    auxes = []
    for layer in self.encoder_layers:
      x, aux = layer(x, mask, source_valid_BxS, deterministic=deterministic, rngs=rngs)
      if aux is not None:
        auxes.append(aux)
    return self.encoder_norm(x), tuple(auxes)

  def decode(
    self,
    target_input_BxL,
    encoded_BxSxD,
    source_BxS,
    *,
    deterministic: bool = True,
    rngs: nnx.Rngs | None = None,
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
    auxes = []
    for layer in self.decoder_layers:
      y, aux = layer(
        y, encoded_BxSxD, self_mask, cross_mask, target_valid_BxL, deterministic=deterministic, rngs=rngs
      )
      if aux is not None:
        auxes.append(aux)
    return self._logits(self.decoder_norm(y)), tuple(auxes)

  def __call__(
    self, source_BxS, target_input_BxL, *, deterministic: bool = True, rngs: nnx.Rngs | None = None
  ) -> tuple[jax.Array, tuple[MoEAux, ...]]:
    encoded, encoder_aux = self.encode(source_BxS, deterministic=deterministic, rngs=rngs)
    logits, decoder_aux = self.decode(
      target_input_BxL, encoded, source_BxS, deterministic=deterministic, rngs=rngs
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
      layers=tuple(layer.init_cache(encoded_BxSxD, max_length) for layer in self.decoder_layers),
      source_valid_BxS=source_BxS != PAD_ID,
    )

  def decode_step(self, tokens_B, cache: DecodeCache, step) -> tuple[jax.Array, DecodeCache]:
    """Feeds the token at position `step`; returns next-token logits [B, V] and the updated cache."""
    y = self._embed(tokens_B[:, None], self.target_embedding, self.target_positions, offset=step)
    cross_mask_Bx1x1xS = cache.source_valid_BxS[:, None, None, :]
    layer_caches = []
    for layer, layer_cache in zip(self.decoder_layers, cache.layers):
      y, layer_cache = layer.decode_step(y, layer_cache, cross_mask_Bx1x1xS, step)
      layer_caches.append(layer_cache)
    logits = self._logits(self.decoder_norm(y))[:, 0]
    return logits, DecodeCache(tuple(layer_caches), cache.source_valid_BxS)
