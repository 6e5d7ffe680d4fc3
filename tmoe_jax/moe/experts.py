"""Expert weights: E independent feed-forward networks run as one batched matmul.

Shapes: E experts, C tokens per expert, D model width, F hidden width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tmoe_jax.feedforward import ACTIVATIONS


def mlp_experts(
  weights: Sequence[jax.Array], x_ExCxD: jax.Array, *, activation: Callable, dtype
) -> jax.Array:
  """`MlpExperts.__call__`: weights (w_in_ExDxF, b_in_ExF, w_out_ExFxD, b_out_ExD); [E, C, D] -> [E, C, D]."""
  w_in_ExDxF, b_in_ExF, w_out_ExFxD, b_out_ExD = (w.astype(dtype) for w in weights)
  x_ExCxD = x_ExCxD.astype(dtype)
  hidden_ExCxF = activation(jnp.einsum("ecd,edf->ecf", x_ExCxD, w_in_ExDxF) + b_in_ExF[:, None])
  return jnp.einsum("ecf,efd->ecd", hidden_ExCxF, w_out_ExFxD) + b_out_ExD[:, None]


def gated_experts(
  weights: Sequence[jax.Array], x_ExCxD: jax.Array, *, activation: Callable, dtype
) -> jax.Array:
  """`GatedMlpExperts.__call__`: weights (w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD); [E, C, D] -> [E, C, D]."""
  w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD = (w.astype(dtype) for w in weights)
  x_ExCxD = x_ExCxD.astype(dtype)
  gate_ExCxF = activation(jnp.einsum("ecd,edf->ecf", x_ExCxD, w_gate_ExDxF))
  up_ExCxF = jnp.einsum("ecd,edf->ecf", x_ExCxD, w_up_ExDxF)
  return jnp.einsum("ecf,efd->ecd", gate_ExCxF * up_ExCxF, w_down_ExFxD)


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
    weights = (self.w_in_ExDxF[...], self.b_in_ExF[...], self.w_out_ExFxD[...], self.b_out_ExD[...])
    return mlp_experts(weights, x_ExCxD, activation=self.activation, dtype=self.dtype)


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
    weights = (self.w_gate_ExDxF[...], self.w_up_ExDxF[...], self.w_down_ExFxD[...])
    return gated_experts(weights, x_ExCxD, activation=self.activation, dtype=self.dtype)


# config.expert_type -> the pure expert function, and the module holding its stacked weights.
EXPERT_FUNCTIONS: dict[str, Callable] = {"mlp": mlp_experts, "gated": gated_experts}
# config.expert_type -> expert stack class; both map [E, C, D] -> [E, C, D].
EXPERT_TYPES = {"mlp": MlpExperts, "gated": GatedMlpExperts}
# config.expert_type -> its stacked [E, ...] parameter names, in the order the pure expert
# functions (and `moe.dropless`) take them; `parallel.sharding` splits exactly these on 'expert'.
EXPERT_PARAMS_BY_TYPE: dict[str, tuple[str, ...]] = {
  "mlp": ("w_in_ExDxF", "b_in_ExF", "w_out_ExFxD", "b_out_ExD"),
  "gated": ("w_gate_ExDxF", "w_up_ExDxF", "w_down_ExFxD"),
}


def expert_weights_of(experts: nnx.Module, expert_type: str = "mlp") -> tuple[jax.Array, ...]:
  """The stacked weights of an `MlpExperts` / `GatedMlpExperts` module, in `EXPERT_FUNCTIONS` order."""
  return tuple(getattr(experts, name)[...] for name in EXPERT_PARAMS_BY_TYPE[expert_type])
