"""Expert weights: E independent feed-forward networks run as one batched matmul.

Shapes: E experts, C tokens per expert, D model width, F hidden width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tmoe_jax.feedforward import ACTIVATIONS


def expert_kernel_init():
  # Fan-in init per expert, as each expert is an ordinary dense layer.
  return nnx.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
  )


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
    init = expert_kernel_init()
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


class GatedMlpExperts(nnx.Module):
  """E gated MLPs (SwiGLU with silu, GeGLU with gelu): (act(x W_gate) * x W_up) W_down.

  No biases, as in the LLaMA/Mixtral experts. Weights [E, D, F], [E, D, F], [E, F, D].
  """

  def __init__(
    self,
    num_experts: int,
    d_model: int,
    d_ff: int,
    *,
    activation: str = "silu",
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    init = expert_kernel_init()
    self.activation = ACTIVATIONS[activation]
    self.dtype = dtype
    self.w_gate_ExDxF = nnx.Param(init(rngs.params(), (num_experts, d_model, d_ff)))
    self.w_up_ExDxF = nnx.Param(init(rngs.params(), (num_experts, d_model, d_ff)))
    self.w_down_ExFxD = nnx.Param(init(rngs.params(), (num_experts, d_ff, d_model)))

  def __call__(self, x_ExCxD: jax.Array) -> jax.Array:
    cast = lambda p: p[...].astype(self.dtype)
    x_ExCxD = x_ExCxD.astype(self.dtype)
    gate_ExCxF = self.activation(jnp.einsum("ecd,edf->ecf", x_ExCxD, cast(self.w_gate_ExDxF)))
    up_ExCxF = jnp.einsum("ecd,edf->ecf", x_ExCxD, cast(self.w_up_ExDxF))
    return jnp.einsum("ecf,efd->ecd", gate_ExCxF * up_ExCxF, cast(self.w_down_ExFxD))


# config.expert_type -> expert stack class; both map [E, C, D] -> [E, C, D].
EXPERT_TYPES = {"mlp": MlpExperts, "gated": GatedMlpExperts}
