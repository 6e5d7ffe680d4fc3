"""The original notebook's regression MoE (softmax-gated small MLP experts) and an equal-size dense MLP.

Shapes: N points, I input dimension, H hidden width, E experts, K experts per
point (top-k gating), O = 1 output.

`MixtureOfMlps` mixes E experts I -> H -> O. Its gate (`gating`) is either
"dense", the notebook's layer: every expert runs on every point and the
outputs are mixed by the softmax of a linear router (`moe.dense_gating`), or
"top_k": `moe.routing.top_k_route` keeps the K largest softmax weights per
point, renormalised to sum to 1 (for K = 1 the raw probability, as in Switch). With E = 5 experts of 32 units the experts
are cheaper to run on every point than to dispatch, so the top-k mixture is
computed densely and the unchosen experts' outputs are multiplied by zero
gates; the result equals a dropless top-k layer exactly.

`DenseMlp` is the comparison: one hidden layer I -> W -> O, with W chosen by
`equal_parameter_hidden` so that it has (as nearly as an integer width allows)
as many parameters as the mixture.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tmoe_jax.feedforward import ACTIVATIONS
from tmoe_jax.moe import losses
from tmoe_jax.moe.dense_gating import dense_softmax_gates, dense_softmax_moe
from tmoe_jax.moe.experts import expert_kernel_init, mlp_experts
from tmoe_jax.moe.routing import top_k_route
from tmoe_jax.moe.statistics import MoEAux, undropped_routing_aux
from tmoe_jax.validation import require, settings_from_section

KINDS = ("moe", "dense_mlp")
GATINGS = ("dense", "top_k")
OUTPUT_DIM = 1  # a scalar target


def moe_parameter_count(input_dim: int, num_experts: int, hidden: int, output_dim: int = OUTPUT_DIM) -> int:
  """Parameters of `MixtureOfMlps`: a bias-free router I x E plus E MLPs I -> H -> O with biases."""
  router = input_dim * num_experts
  expert = input_dim * hidden + hidden + hidden * output_dim + output_dim
  return router + num_experts * expert


def dense_mlp_parameter_count(input_dim: int, hidden: int, output_dim: int = OUTPUT_DIM) -> int:
  """Parameters of `DenseMlp` I -> W -> O with biases: W (I + 1 + O) + O."""
  return input_dim * hidden + hidden + hidden * output_dim + output_dim


def equal_parameter_hidden(
  input_dim: int, num_experts: int, hidden: int, output_dim: int = OUTPUT_DIM
) -> int:
  """The width W whose `DenseMlp` parameter count is closest to the mixture's (ties round half to even).

  The count is W (I + 1 + O) + O, so W = round((moe_count - O) / (I + 1 + O)) and
  the two counts differ by at most (I + 1 + O) / 2.
  """
  target = moe_parameter_count(input_dim, num_experts, hidden, output_dim)
  return max(1, round((target - output_dim) / (input_dim + 1 + output_dim)))


@dataclasses.dataclass(frozen=True)
class RegressionModelConfig:
  """Settings of the regression model, from the `model` config section (plus the data's input width)."""

  input_dim: int
  kind: str = "moe"
  gating: str = "dense"
  num_experts: int = 5
  hidden: int = 32
  top_k: int = 2
  activation: str = "relu"

  def __post_init__(self):
    require(self.kind in KINDS, "model.kind", f"must be one of {KINDS}, got {self.kind!r}")
    require(self.gating in GATINGS, "model.gating", f"must be one of {GATINGS}, got {self.gating!r}")
    require(self.input_dim >= 1, "data.input_dim", f"must be >= 1, got {self.input_dim}")
    require(self.num_experts >= 1, "model.num_experts", f"must be >= 1, got {self.num_experts}")
    require(self.hidden >= 1, "model.hidden", f"must be >= 1, got {self.hidden}")
    require(
      1 <= self.top_k <= self.num_experts,
      "model.top_k",
      f"must be in [1, num_experts={self.num_experts}], got {self.top_k}",
    )
    require(
      self.activation in ACTIVATIONS,
      "model.activation",
      f"must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}",
    )

  @classmethod
  def from_config(cls, model_config, *, input_dim: int) -> RegressionModelConfig:
    """Builds from the `model` section of a ConfigDict, type-checking each field."""
    return settings_from_section(cls, model_config, input_dim=input_dim)

  @property
  def dense_hidden(self) -> int:
    """The `DenseMlp` width with the mixture's parameter count."""
    return equal_parameter_hidden(self.input_dim, self.num_experts, self.hidden)


class MixtureOfMlps(nnx.Module):
  """E MLP experts I -> H -> 1 mixed by a float32 softmax router; `__call__` returns (y [N], (MoEAux,))."""

  def __init__(self, config: RegressionModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    experts, inputs, hidden = config.num_experts, config.input_dim, config.hidden
    # Small router init (as `MoEFeedForward`): the gate starts near uniform.
    self.router = nnx.Linear(
      inputs, experts, use_bias=False, kernel_init=nnx.initializers.normal(0.02), rngs=rngs
    )
    init = expert_kernel_init()
    self.w_in_ExIxH = nnx.Param(init(rngs.params(), (experts, inputs, hidden)))
    self.b_in_ExH = nnx.Param(jnp.zeros((experts, hidden)))
    self.w_out_ExHxO = nnx.Param(init(rngs.params(), (experts, hidden, OUTPUT_DIM)))
    self.b_out_ExO = nnx.Param(jnp.zeros((experts, OUTPUT_DIM)))

  def experts(self, x_ExNxI: jax.Array) -> jax.Array:
    """Expert e applied to slice e: [E, N, I] -> [E, N, O]."""
    weights = (self.w_in_ExIxH[...], self.b_in_ExH[...], self.w_out_ExHxO[...], self.b_out_ExO[...])
    return mlp_experts(weights, x_ExNxI, activation=ACTIVATIONS[self.config.activation], dtype=jnp.float32)

  def __call__(self, x_NxI: jax.Array) -> tuple[jax.Array, tuple[MoEAux, ...]]:
    x_NxI = x_NxI.astype(jnp.float32)
    logits_NxE = self.router(x_NxI)
    if self.config.gating == "dense":
      return self._dense(x_NxI, logits_NxE)
    return self._top_k(x_NxI, logits_NxE)

  def _dense(self, x_NxI, logits_NxE):
    y_NxO = dense_softmax_moe(x_NxI, logits_NxE, self.experts)
    gates_NxE = dense_softmax_gates(logits_NxE)
    aux = MoEAux(
      # Every expert runs on every point: there is no load to balance.
      load_balancing_loss=jnp.zeros((), jnp.float32),
      router_z_loss=losses.router_z_loss(logits_NxE),
      # The share of the mixture weight each expert carries.
      expert_fraction_E=jnp.mean(gates_NxE, axis=0),
      dropped_fraction=jnp.zeros((), jnp.float32),
      router_entropy=losses.router_entropy(gates_NxE),
      router_probability_E=jnp.zeros_like(gates_NxE[0]),
      num_tokens=jnp.asarray(gates_NxE.shape[0], jnp.float32),
    )
    return y_NxO[:, 0], (aux,)

  def _top_k(self, x_NxI, logits_NxE):
    route = top_k_route(logits_NxE, self.config.top_k)
    x_ExNxI = jnp.broadcast_to(x_NxI[None], (self.config.num_experts, *x_NxI.shape))
    y_NxE = self.experts(x_ExNxI)[..., 0].T
    chosen_NxK = jnp.take_along_axis(y_NxE, route.expert_indices_TxK, axis=-1)
    y_N = jnp.sum(route.gates_TxK * chosen_NxK, axis=-1)
    aux = undropped_routing_aux(route.router_logits_TxE, route.router_probs_TxE, route.expert_indices_TxK)
    return y_N, (aux,)


class DenseMlp(nnx.Module):
  """One hidden layer I -> W -> 1, W = `config.dense_hidden`; `__call__` returns (y [N], ())."""

  def __init__(self, config: RegressionModelConfig, *, rngs: nnx.Rngs):
    self.activation = ACTIVATIONS[config.activation]
    self.hidden = nnx.Linear(config.input_dim, config.dense_hidden, rngs=rngs)
    self.output = nnx.Linear(config.dense_hidden, OUTPUT_DIM, rngs=rngs)

  def __call__(self, x_NxI: jax.Array) -> tuple[jax.Array, tuple[MoEAux, ...]]:
    y_NxO = self.output(self.activation(self.hidden(x_NxI.astype(jnp.float32))))
    return y_NxO[:, 0], ()


# model.kind -> the model class; both map x [N, I] to (y [N], tuple of MoEAux).
MODELS = {"moe": MixtureOfMlps, "dense_mlp": DenseMlp}


def build_model(config: RegressionModelConfig, seed: int) -> nnx.Module:
  return MODELS[config.kind](config, rngs=nnx.Rngs(params=seed))
