"""Expert weights: E independent feed-forward networks run as one batched matmul.

Shapes: E experts, C tokens per expert, D model width, F hidden width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tmoe_jax.feedforward import ACTIVATIONS


class MlpExperts(nnx.Module):
  """E two-layer MLPs D -> F -> D with stacked weights [E, D, F] and [E, F, D]."""

  def __init__(
    self,
    num_experts: int,
    d_model: int,
    d_ff: int,
    *,
    activation: str = "relu",
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    # Fan-in init per expert, as each expert is an ordinary dense layer.
    init = nnx.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
    )
    self.activation = ACTIVATIONS[activation]
    self.dtype = dtype
    self.w_in_ExDxF = nnx.Param(init(rngs.params(), (num_experts, d_model, d_ff)))
    self.b_in_ExF = nnx.Param(jnp.zeros((num_experts, d_ff)))
    self.w_out_ExFxD = nnx.Param(init(rngs.params(), (num_experts, d_ff, d_model)))
    self.b_out_ExD = nnx.Param(jnp.zeros((num_experts, d_model)))

  def __call__(self, x_ExCxD: jax.Array) -> jax.Array:
    cast = lambda p: p[...].astype(self.dtype)
    x_ExCxD = x_ExCxD.astype(self.dtype)
    hidden_ExCxF = jnp.einsum("ecd,edf->ecf", x_ExCxD, cast(self.w_in_ExDxF)) + cast(self.b_in_ExF)[:, None]
    hidden_ExCxF = self.activation(hidden_ExCxF)
    return jnp.einsum("ecf,efd->ecd", hidden_ExCxF, cast(self.w_out_ExFxD)) + cast(self.b_out_ExD)[:, None]
