"""Expert weights: E independent feed-forward networks run as one batched matmul.

Shapes: E experts, C tokens per expert, D model width, F hidden width.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class ExpertType:
  """Everything one kind of expert needs, in one entry of `EXPERT_REGISTRY`.

  Every kind is y = hidden(x W_1 + b_1, ..., x W_n + b_n) W_out + b_out: the MLP
  with one input projection and hidden = act(z), the gated expert with two
  (gate, up), hidden = act(gate) * up, and no biases.

  function: the pure expert function, (weights, x_ExCxD, *, activation, dtype) -> y_ExCxD.
  module: the nnx module holding the stacked weights (same math as `function`).
  parameters: the stacked [E, ...] parameter names, in `function`'s order
    (`moe.parameter_sharding` splits exactly these over 'expert').
  input_projections: n, the number of [E, D, F] input projections.
  has_biases: whether every projection has a bias (weights then alternate w, b).
  hidden: activation -> the hidden function of the n pre-activations.
  expert_parallel: whether `moe.expert_parallel` can split these experts over devices.
  """

  function: Callable
  module: type
  parameters: tuple[str, ...]
  input_projections: int
  has_biases: bool
  hidden: Callable[[Callable], Callable[..., jax.Array]]
  expert_parallel: bool = True

  def parts(self, weights: Sequence[jax.Array]) -> tuple[tuple, tuple, jax.Array, jax.Array | None]:
    """(input projections, their biases, output projection, its bias) of `weights`; None = no bias."""
    n = self.input_projections
    if self.has_biases:
      return tuple(weights[0 : 2 * n : 2]), tuple(weights[1 : 2 * n : 2]), weights[2 * n], weights[2 * n + 1]
    return tuple(weights[:n]), (None,) * n, weights[n], None

  def weights_of_parts(self, w_in, b_in, w_out, b_out) -> tuple:
    """Inverse of `parts`: back to the `parameters` order."""
    if self.has_biases:
      return (*(a for pair in zip(w_in, b_in) for a in pair), w_out, b_out)
    return (*w_in, w_out)


EXPERT_REGISTRY: dict[str, ExpertType] = {
  "mlp": ExpertType(
    function=mlp_experts,
    module=MlpExperts,
    parameters=("w_in_ExDxF", "b_in_ExF", "w_out_ExFxD", "b_out_ExD"),
    input_projections=1,
    has_biases=True,
    hidden=lambda activation: activation,
  ),
  "gated": ExpertType(
    function=gated_experts,
    module=GatedMlpExperts,
    parameters=("w_gate_ExDxF", "w_up_ExDxF", "w_down_ExFxD"),
    input_projections=2,
    has_biases=False,
    hidden=lambda activation: lambda gate_SxF, up_SxF: activation(gate_SxF) * up_SxF,
  ),
}
# Views of the registry, by config.expert_type.
EXPERT_FUNCTIONS: dict[str, Callable] = {name: entry.function for name, entry in EXPERT_REGISTRY.items()}
EXPERT_TYPES: dict[str, type] = {name: entry.module for name, entry in EXPERT_REGISTRY.items()}
EXPERT_PARAMS_BY_TYPE: dict[str, tuple[str, ...]] = {
  name: entry.parameters for name, entry in EXPERT_REGISTRY.items()
}


def expert_weights_of(experts: nnx.Module, expert_type: str = "mlp") -> tuple[jax.Array, ...]:
  """The stacked weights of an `MlpExperts` / `GatedMlpExperts` module, in `EXPERT_FUNCTIONS` order."""
  return tuple(getattr(experts, name)[...] for name in EXPERT_PARAMS_BY_TYPE[expert_type])
