"""The explicit training state that every step takes in and gives back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from tmoe_jax.moe.parameter_sharding import tree_shardings
from tmoe_jax.parallel import sharding


@struct.dataclass
class TrainState:
  """Everything needed to continue training exactly: checkpointed as one pytree.

  step: int32 scalar, the number of updates applied so far.
  params: the model's nnx.Param state (the graph definition stays outside, static).
  model_state: every other model variable (e.g. fixed sMoE masks, routing biases
    updated outside the gradient); often empty.
  opt_state: the Optax optimizer state.
  rng: uint32 [2] PRNG key, split once per step for dropout.
  """

  step: jax.Array
  params: nnx.State
  model_state: nnx.State
  opt_state: optax.OptState
  rng: jax.Array


def create_train_state(
  model: nnx.Module, optimizer: optax.GradientTransformation, seed: int
) -> tuple[nnx.GraphDef, TrainState]:
  """Splits `model` into its static graph definition and a fresh TrainState."""
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    model_state=model_state,
    opt_state=optimizer.init(params),
    # A raw uint32 key rather than a typed key array: it checkpoints as plain data.
    rng=jax.random.PRNGKey(seed),
  )
  return graphdef, state


def count_params(params: nnx.State) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def train_state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
  """A TrainState of NamedShardings: pass as jit in_/out_shardings and to `jax.device_put`.

  params and the optimizer moments: expert weights on 'expert', the rest replicated;
  model_state (e.g. the [E] expert bias every device routes with), step and rng: replicated.
  """
  return TrainState(
    step=sharding.replicated(mesh),
    params=tree_shardings(state.params, mesh),
    model_state=jax.tree.map(lambda _: sharding.replicated(mesh), state.model_state),
    opt_state=tree_shardings(state.opt_state, mesh),
    rng=sharding.replicated(mesh),
  )


def shard_train_state(state: TrainState, mesh: Mesh) -> TrainState:
  """Places an (unsharded) TrainState on the mesh."""
  return jax.device_put(state, train_state_shardings(state, mesh))
