"""Rotary position embeddings (RoPE, Su et al. 2021), in the half-split layout of LLaMA-family models.

Shapes: B batch, L length, H heads, Dh head size (even).

Each head vector is read as Dh/2 pairs (x_i, x_{i + Dh/2}) (the first half against the second,
the layout Hugging Face's `rotate_half` uses, not interleaved neighbours), and pair i at
position p is rotated by the angle p * base^(-2i/Dh). Attention scores then depend on the
positions of query and key only through their difference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def inverse_frequencies(head_size: int, base: float) -> jax.Array:
  """float32 [Dh/2]: base^(-2i/Dh), the rotation speed of pair i."""
  if head_size % 2:
    raise ValueError(f"rotary embeddings need an even head size, got {head_size}")
  exponents = jnp.arange(0, head_size, 2, dtype=jnp.float32) / head_size
  return 1.0 / (base**exponents)


def apply_rotary(x_BxLxHxDh: jax.Array, positions_BxL: jax.Array, base: float) -> jax.Array:
  """`x` with each head's pairs rotated by its token's position; angles in float32, result in x's dtype."""
  head_size = x_BxLxHxDh.shape[-1]
  angles_BxLxR = positions_BxL.astype(jnp.float32)[..., None] * inverse_frequencies(head_size, base)
  cos_BxLx1xR = jnp.cos(angles_BxLxR)[:, :, None, :].astype(x_BxLxHxDh.dtype)
  sin_BxLx1xR = jnp.sin(angles_BxLxR)[:, :, None, :].astype(x_BxLxHxDh.dtype)
  first, second = jnp.split(x_BxLxHxDh, 2, axis=-1)
  return jnp.concatenate(
    [first * cos_BxLx1xR - second * sin_BxLx1xR, second * cos_BxLx1xR + first * sin_BxLx1xR], axis=-1
  )
