"""The explicit training state that every step takes in and gives back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


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
