"""Multi-head attention with padding and causal masks and a decoding cache.

Shapes: B batch, Q query length, K key length, D d_model, H heads, Dh head size.
Masks are boolean [B, 1, Q, K] (True = may attend) so one mask serves all heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from tmoe_jax.rotary import apply_rotary

# How `MultiHeadAttention` normalises queries and keys: not at all, per head, or over the projection.
QK_NORMS = ("none", "heads", "projection")


def padding_mask(query_valid_BxQ: jax.Array, key_valid_BxK: jax.Array) -> jax.Array:
  """[B, 1, Q, K]: query i may attend key j iff both are real (non-padding) tokens."""
  return (query_valid_BxQ[:, None, :, None] & key_valid_BxK[:, None, None, :]).astype(bool)


def causal_mask(length: int) -> jax.Array:
  """[1, 1, L, L]: position i may attend positions j <= i."""
  return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


@struct.dataclass
class KeyValueCache:
  """Keys and values of one attention layer, for decoding without recomputing the prefix.

  For self-attention the arrays have room for `max_length` positions and are filled
  one step at a time; for cross-attention they hold the projected encoder output,
  computed once per source.
  """

  key_BxKxHxDh: jax.Array
  value_BxKxHxDh: jax.Array


class MultiHeadAttention(nnx.Module):
  """Scaled dot-product attention over `num_heads` heads, with output projection.

  The defaults are the original Transformer's. The options make it the attention of
  LLaMA-family decoders: `num_kv_heads` < `num_heads` shares each key/value head among
  num_heads / num_kv_heads query heads (grouped-query attention; query head h reads
  key/value head h // group, as Hugging Face's `repeat_kv`); `head_size` decouples the heads
  from d_model; `rotary_base` rotates queries and keys by their positions (`rotary`);
  `qk_norm` RMS-normalises queries and keys before the rotation, per head ("heads", Qwen3)
  or over the whole projection ("projection", OLMoE); `qkv_bias` / `output_bias` say which
  projections have biases.
  """

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    *,
    num_kv_heads: int | None = None,
    head_size: int | None = None,
    qkv_bias: bool = True,
    output_bias: bool = True,
    rotary_base: float | None = None,
    qk_norm: str = "none",
    norm_epsilon: float = 1e-6,
    dropout_rate: float = 0.0,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    num_kv_heads = num_kv_heads or num_heads
    if head_size is None and d_model % num_heads:
      raise ValueError(f"num_heads={num_heads} must divide d_model={d_model}")
    if num_heads % num_kv_heads:
      raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
    if qk_norm not in QK_NORMS:
      raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_size = head_size or d_model // num_heads
    self.rotary_base = rotary_base
    self.qk_norm = qk_norm
    init = nnx.initializers.xavier_uniform()

    def projection(in_features, out_features, use_bias):
      return nnx.Linear(
        in_features, out_features, use_bias=use_bias, kernel_init=init, dtype=dtype, rngs=rngs
      )

    query_width, key_width = num_heads * self.head_size, num_kv_heads * self.head_size
    self.query = projection(d_model, query_width, qkv_bias)
    self.key = projection(d_model, key_width, qkv_bias)
    self.value = projection(d_model, key_width, qkv_bias)
    self.output = projection(query_width, d_model, output_bias)
    if qk_norm != "none":
      per_head = qk_norm == "heads"
      self.query_norm = nnx.RMSNorm(
        self.head_size if per_head else query_width, epsilon=norm_epsilon, dtype=dtype, rngs=rngs
      )
      self.key_norm = nnx.RMSNorm(
        self.head_size if per_head else key_width, epsilon=norm_epsilon, dtype=dtype, rngs=rngs
      )
    self.dropout = nnx.Dropout(dropout_rate)

  def _split_heads(self, x_BxLxD: jax.Array, num_heads: int | None = None) -> jax.Array:
    batch, length, _ = x_BxLxD.shape
    return x_BxLxD.reshape(batch, length, num_heads or self.num_heads, self.head_size)

  def _heads(self, projected_BxLxF, norm_name: str, num_heads: int, positions_BxL) -> jax.Array:
    """Projected queries or keys as heads, normalised and rotated as the options say."""
    if self.qk_norm == "projection":
      projected_BxLxF = getattr(self, norm_name)(projected_BxLxF)
    heads_BxLxHxDh = self._split_heads(projected_BxLxF, num_heads)
    if self.qk_norm == "heads":
      heads_BxLxHxDh = getattr(self, norm_name)(heads_BxLxHxDh)
    if self.rotary_base is not None:
      heads_BxLxHxDh = apply_rotary(
        heads_BxLxHxDh, _positions_or_range(positions_BxL, heads_BxLxHxDh), self.rotary_base
      )
    return heads_BxLxHxDh

  def project_key_value(self, x_BxKxD: jax.Array, positions_BxK: jax.Array | None = None) -> KeyValueCache:
    """Keys (normalised and rotated as the options say) and values of `x`, as [B, K, kv heads, Dh]."""
    key = self._heads(self.key(x_BxKxD), "key_norm", self.num_kv_heads, positions_BxK)
    return KeyValueCache(key, self._split_heads(self.value(x_BxKxD), self.num_kv_heads))

  def attend(
    self,
    query_BxQxD: jax.Array,
    key_value: KeyValueCache,
    mask_Bx1xQxK: jax.Array | None,
    *,
    positions_BxQ: jax.Array | None = None,
    deterministic: bool,
    rngs: nnx.Rngs | None,
  ) -> jax.Array:
    """Attention of new queries over already-projected keys and values."""
    q_BxQxHxDh = self._heads(self.query(query_BxQxD), "query_norm", self.num_heads, positions_BxQ)
    q_BxQxHxDh = q_BxQxHxDh / jnp.sqrt(self.head_size).astype(q_BxQxHxDh.dtype)
    batch, length = query_BxQxD.shape[:2]
    group = self.num_heads // self.num_kv_heads
    if group == 1:
      scores_BxHxQxK = jnp.einsum("bqhd,bkhd->bhqk", q_BxQxHxDh, key_value.key_BxKxHxDh)
    else:
      q_BxQxGxRxDh = q_BxQxHxDh.reshape(batch, length, self.num_kv_heads, group, self.head_size)
      scores = jnp.einsum("bqgrd,bkgd->bgrqk", q_BxQxGxRxDh, key_value.key_BxKxHxDh)
      scores_BxHxQxK = scores.reshape(batch, self.num_heads, length, -1)
    # Softmax in float32: bfloat16 logits lose the small differences that matter.
    scores_BxHxQxK = scores_BxHxQxK.astype(jnp.float32)
    if mask_Bx1xQxK is not None:
      scores_BxHxQxK = jnp.where(mask_Bx1xQxK, scores_BxHxQxK, jnp.finfo(jnp.float32).min)
    weights_BxHxQxK = jax.nn.softmax(scores_BxHxQxK, axis=-1).astype(q_BxQxHxDh.dtype)
    weights_BxHxQxK = self.dropout(weights_BxHxQxK, deterministic=deterministic, rngs=rngs)
    if group == 1:
      context_BxQxHxDh = jnp.einsum("bhqk,bkhd->bqhd", weights_BxHxQxK, key_value.value_BxKxHxDh)
    else:
      weights = weights_BxHxQxK.reshape(batch, self.num_kv_heads, group, length, -1)
      context_BxQxHxDh = jnp.einsum("bgrqk,bkgd->bqgrd", weights, key_value.value_BxKxHxDh)
    return self.output(context_BxQxHxDh.reshape(batch, length, -1))

  def __call__(
    self,
    query_BxQxD: jax.Array,
    memory_BxKxD: jax.Array,
    mask_Bx1xQxK: jax.Array | None = None,
    *,
    positions_BxQ: jax.Array | None = None,
    deterministic: bool = True,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """Attention of `query` over `memory` (the same array for self-attention).

    `positions_BxQ`: each token's position for the rotation (self-attention; None = 0, 1, ...).
    """
    key_value = self.project_key_value(memory_BxKxD, positions_BxQ)
    return self.attend(
      query_BxQxD,
      key_value,
      mask_Bx1xQxK,
      positions_BxQ=positions_BxQ,
      deterministic=deterministic,
      rngs=rngs,
    )

  def decode_step(
    self,
    query_Bx1xD: jax.Array,
    cache: KeyValueCache,
    step: jax.Array,
    *,
    positions_Bx1: jax.Array | None = None,
    key_mask_Bx1x1xK: jax.Array | None = None,
  ) -> tuple[jax.Array, KeyValueCache]:
    """Causal self-attention of the token in cache slot `step` over slots <= step.

    Writes this slot's key and value into the cache, so each step costs O(max_length)
    instead of re-running the whole prefix. `positions_Bx1` (default: `step`) is the token's
    position for the rotation, which differs from its slot in a left-padded batch;
    `key_mask_Bx1x1xK` hides slots that hold no token (the padding).
    """
    if positions_Bx1 is None:
      positions_Bx1 = jnp.full((query_Bx1xD.shape[0], 1), step, jnp.int32)
    new = self.project_key_value(query_Bx1xD, positions_Bx1)
    cache = KeyValueCache(
      jax.lax.dynamic_update_slice_in_dim(cache.key_BxKxHxDh, new.key_BxKxHxDh, step, axis=1),
      jax.lax.dynamic_update_slice_in_dim(cache.value_BxKxHxDh, new.value_BxKxHxDh, step, axis=1),
    )
    max_length = cache.key_BxKxHxDh.shape[1]
    mask_Bx1x1xK = (jnp.arange(max_length) <= step)[None, None, None, :]
    if key_mask_Bx1x1xK is not None:
      mask_Bx1x1xK = mask_Bx1x1xK & key_mask_Bx1x1xK
    output = self.attend(
      query_Bx1xD, cache, mask_Bx1x1xK, positions_BxQ=positions_Bx1, deterministic=True, rngs=None
    )
    return output, cache

  def empty_cache(self, batch_size: int, max_length: int, dtype) -> KeyValueCache:
    shape = (batch_size, max_length, self.num_kv_heads, self.head_size)
    return KeyValueCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def _positions_or_range(positions_BxL: jax.Array | None, x_BxLx___: jax.Array) -> jax.Array:
  """`positions_BxL`, or 0, 1, ... L-1 for every sequence."""
  if positions_BxL is not None:
    return positions_BxL
  batch, length = x_BxLx___.shape[:2]
  return jnp.broadcast_to(jnp.arange(length)[None], (batch, length))
