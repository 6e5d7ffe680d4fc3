"""Multi-head attention with padding and causal masks and a decoding cache.

Shapes: B batch, Q query length, K key length, D d_model, H heads, Dh head size.
Masks are boolean [B, 1, Q, K] (True = may attend) so one mask serves all heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct


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
  """Scaled dot-product attention over `num_heads` heads, with output projection."""

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    *,
    dropout_rate: float = 0.0,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if d_model % num_heads:
      raise ValueError(f"num_heads={num_heads} must divide d_model={d_model}")
    self.num_heads = num_heads
    self.head_size = d_model // num_heads
    init = nnx.initializers.xavier_uniform()

    def projection(in_features, out_features):
      return nnx.Linear(in_features, out_features, kernel_init=init, dtype=dtype, rngs=rngs)

    self.query = projection(d_model, d_model)
    self.key = projection(d_model, d_model)
    self.value = projection(d_model, d_model)
    self.output = projection(d_model, d_model)
    self.dropout = nnx.Dropout(dropout_rate)

  def _split_heads(self, x_BxLxD: jax.Array) -> jax.Array:
    batch, length, _ = x_BxLxD.shape
    return x_BxLxD.reshape(batch, length, self.num_heads, self.head_size)

  def project_key_value(self, x_BxKxD: jax.Array) -> KeyValueCache:
    return KeyValueCache(self._split_heads(self.key(x_BxKxD)), self._split_heads(self.value(x_BxKxD)))

  def attend(
    self,
    query_BxQxD: jax.Array,
    key_value: KeyValueCache,
    mask_Bx1xQxK: jax.Array | None,
    *,
    deterministic: bool,
    rngs: nnx.Rngs | None,
  ) -> jax.Array:
    """Attention of new queries over already-projected keys and values."""
    q_BxQxHxDh = self._split_heads(self.query(query_BxQxD))
    q_BxQxHxDh = q_BxQxHxDh / jnp.sqrt(self.head_size).astype(q_BxQxHxDh.dtype)
    scores_BxHxQxK = jnp.einsum("bqhd,bkhd->bhqk", q_BxQxHxDh, key_value.key_BxKxHxDh)
    # Softmax in float32: bfloat16 logits lose the small differences that matter.
    scores_BxHxQxK = scores_BxHxQxK.astype(jnp.float32)
    if mask_Bx1xQxK is not None:
      scores_BxHxQxK = jnp.where(mask_Bx1xQxK, scores_BxHxQxK, jnp.finfo(jnp.float32).min)
    weights_BxHxQxK = jax.nn.softmax(scores_BxHxQxK, axis=-1).astype(q_BxQxHxDh.dtype)
    weights_BxHxQxK = self.dropout(weights_BxHxQxK, deterministic=deterministic, rngs=rngs)
    context_BxQxHxDh = jnp.einsum("bhqk,bkhd->bqhd", weights_BxHxQxK, key_value.value_BxKxHxDh)
    batch, length = query_BxQxD.shape[:2]
    return self.output(context_BxQxHxDh.reshape(batch, length, -1))

  def __call__(
    self,
    query_BxQxD: jax.Array,
    memory_BxKxD: jax.Array,
    mask_Bx1xQxK: jax.Array | None = None,
    *,
    deterministic: bool = True,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """Attention of `query` over `memory` (the same array for self-attention)."""
    key_value = self.project_key_value(memory_BxKxD)
    return self.attend(query_BxQxD, key_value, mask_Bx1xQxK, deterministic=deterministic, rngs=rngs)

  def decode_step(
    self,
    query_Bx1xD: jax.Array,
    cache: KeyValueCache,
    step: jax.Array,
  ) -> tuple[jax.Array, KeyValueCache]:
    """Causal self-attention of the token at position `step` over positions <= step.

    Writes this position's key and value into the cache, so each step costs
    O(max_length) instead of re-running the whole prefix.
    """
    new = self.project_key_value(query_Bx1xD)
    cache = KeyValueCache(
      jax.lax.dynamic_update_slice_in_dim(cache.key_BxKxHxDh, new.key_BxKxHxDh, step, axis=1),
      jax.lax.dynamic_update_slice_in_dim(cache.value_BxKxHxDh, new.value_BxKxHxDh, step, axis=1),
    )
    max_length = cache.key_BxKxHxDh.shape[1]
    mask_1x1x1xK = (jnp.arange(max_length) <= step)[None, None, None, :]
    output = self.attend(query_Bx1xD, cache, mask_1x1x1xK, deterministic=True, rngs=None)
    return output, cache

  def empty_cache(self, batch_size: int, max_length: int, dtype) -> KeyValueCache:
    shape = (batch_size, max_length, self.num_heads, self.head_size)
    return KeyValueCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
