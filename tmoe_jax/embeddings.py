"""Token and position embeddings.

Shapes: B batch, L length, D d_model, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Token id 0 is padding in every vocabulary (`tmoe_jax.data`), model and loss.
PAD_ID = 0
POSITION_EMBEDDINGS = ("sinusoidal", "learned")


def sinusoidal_positions(length: int, d_model: int) -> np.ndarray:
  """Fixed sin/cos table of "Attention Is All You Need", float32 [length, d_model]."""
  positions = np.arange(length, dtype=np.float64)[:, None]
  # Frequencies 1 / 10000^(2i/D) over the first half, sin and cos side by side.
  inverse_frequency = 1.0 / (10000.0 ** (np.arange(0, d_model, 2, dtype=np.float64) / d_model))
  angles = positions * inverse_frequency[None, :]
  table = np.zeros((length, d_model), dtype=np.float64)
  table[:, 0::2] = np.sin(angles)
  table[:, 1::2] = np.cos(angles[:, : d_model // 2])
  return table.astype(np.float32)


class PositionEmbedding(nnx.Module):
  """Adds sinusoidal (fixed) or learned position vectors to [B, L, D] inputs."""

  def __init__(self, kind: str, max_length: int, d_model: int, *, rngs: nnx.Rngs):
    self.kind = kind
    self.max_length = max_length
    self.d_model = d_model
    if kind == "learned":
      self.table = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (max_length, d_model)))
    elif kind != "sinusoidal":
      raise ValueError(f"unknown position embedding {kind!r}")

  def __call__(self, x_BxLxD: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """Adds positions offset..offset+L-1 (offset > 0 when decoding one step at a time)."""
    length = x_BxLxD.shape[1]
    if length > self.max_length:
      raise ValueError(f"sequence length {length} exceeds model.max_length={self.max_length}")
    if self.kind == "learned":
      table = self.table[...]
    else:
      # A trace-time constant, not a variable: nothing to train or checkpoint.
      table = jnp.asarray(sinusoidal_positions(self.max_length, self.d_model))
    positions_LxD = jax.lax.dynamic_slice_in_dim(table, offset, length, axis=0)
    return x_BxLxD + positions_LxD[None].astype(x_BxLxD.dtype)
