"""The dense position-wise feed-forward blocks: D -> F -> D, plain or gated."""

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


class GatedFeedForward(nnx.Module):
  """(act(x W_gate) * x W_up) W_down without biases: SwiGLU with silu (LLaMA, Mixtral), GeGLU with gelu."""

  def __init__(self, d_model: int, d_ff: int, *, activation: str = "silu", dtype=jnp.float32, rngs: nnx.Rngs):
    self.activation = ACTIVATIONS[activation]

    def projection(in_features, out_features):
      return nnx.Linear(in_features, out_features, use_bias=False, dtype=dtype, rngs=rngs)

    self.gate = projection(d_model, d_ff)
    self.up = projection(d_model, d_ff)
    self.down = projection(d_ff, d_model)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    return self.down(self.activation(self.gate(x_BxLxD)) * self.up(x_BxLxD))
