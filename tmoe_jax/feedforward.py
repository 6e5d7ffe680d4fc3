"""The dense position-wise feed-forward block: D -> F -> D."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu}


class FeedForward(nnx.Module):
  """Linear, activation, dropout, linear (the FFN of "Attention Is All You Need")."""

  def __init__(
    self,
    d_model: int,
    d_ff: int,
    *,
    activation: str = "relu",
    dropout_rate: float = 0.0,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.activation = ACTIVATIONS[activation]
    self.hidden = nnx.Linear(d_model, d_ff, dtype=dtype, rngs=rngs)
    self.output = nnx.Linear(d_ff, d_model, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate)

  def __call__(self, x_BxLxD: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
    hidden = self.activation(self.hidden(x_BxLxD))
    hidden = self.dropout(hidden, deterministic=deterministic, rngs=rngs)
    return self.output(hidden)
