"""The generic, jit-compiled train step: one optimizer update of any task's model.

A task supplies `loss_fn(model, batch, rngs, step) -> (task_loss, metrics, auxes)`
where `auxes` is a tuple of `MoEAux` (one per MoE layer, possibly empty); this
module adds the weighted MoE auxiliary losses, differentiates, applies the Optax
update and reports whether everything stayed finite. The step is a pure function
of explicit inputs: (graphdef static) + TrainState + batch -> new TrainState +
metrics; nothing is read from or written to a module behind the caller's back.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tmoe_jax.moe.statistics import MoEAux
from tmoe_jax.parallel import sharding
from tmoe_jax.training import grad_accumulation
from tmoe_jax.training.state import TrainState

# (model, batch, rngs, step) -> (task loss scalar, float metrics, MoEAux per MoE layer)
LossFn = Callable[[nnx.Module, dict, nnx.Rngs, jax.Array], tuple[jax.Array, dict, tuple[MoEAux, ...]]]


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Weights of the MoE auxiliary losses added to the task loss."""

  load_balancing: float = 1e-2
  router_z: float = 1e-3

  @classmethod
  def from_config(cls, model_config) -> LossWeights:
    return cls(
      load_balancing=model_config.get("load_balancing_weight", 0.0),
      router_z=model_config.get("router_z_weight", 0.0),
    )


def moe_losses(auxes: tuple[MoEAux, ...]) -> tuple[jax.Array, jax.Array]:
  """Mean over MoE layers of the load-balancing and z losses (0 when the model has none)."""
  if not auxes:
    return jnp.zeros(()), jnp.zeros(())
  balance = jnp.mean(jnp.stack([aux.load_balancing_loss for aux in auxes]))
  z = jnp.mean(jnp.stack([aux.router_z_loss for aux in auxes]))
  return balance, z


def routing_metrics(auxes: tuple[MoEAux, ...]) -> dict[str, jax.Array]:
  """Per MoE layer (in the model's order): expert load, drops, router entropy."""
  if not auxes:
    return {}
  return {
    "expert_fraction": jnp.stack([aux.expert_fraction_E for aux in auxes]),
    "dropped_fraction": jnp.stack([aux.dropped_fraction for aux in auxes]),
    "router_entropy": jnp.stack([aux.router_entropy for aux in auxes]),
  }


def all_finite(tree) -> jax.Array:
  """bool scalar: every floating-point leaf of `tree` is finite (integer leaves cannot overflow)."""
  flags = [
    jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def batch_gradients(state: TrainState, batch, dropout_key, *, graphdef, loss_fn: LossFn, loss_weights):
  """(gradients, metrics, new model state) of the objective (task loss + weighted MoE losses) on one batch."""

  def objective(params):
    # copy=True: fresh Variables at this trace level, so the forward pass may update
    # non-parameter state (e.g. the expert bias) inside the differentiated function.
    model = nnx.merge(graphdef, params, state.model_state, copy=True)
    task_loss, task_metrics, auxes = loss_fn(model, batch, nnx.Rngs(dropout=dropout_key), state.step)
    balance, z = moe_losses(auxes)
    aux_loss = loss_weights.load_balancing * balance + loss_weights.router_z * z
    metrics = {
      "loss": task_loss,
      "aux_loss": aux_loss,
      "load_balancing_loss": balance,
      "router_z_loss": z,
      **task_metrics,
      **routing_metrics(auxes),
    }
    # Non-parameter variables the forward pass updated (outside the gradient).
    return task_loss + aux_loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

  grads, (metrics, model_state) = jax.grad(objective, has_aux=True)(state.params)
  return grads, metrics, model_state


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  graphdef: nnx.GraphDef,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule,
  loss_weights: LossWeights,
  loss_fn: LossFn,
  microbatches: int = 1,
  group_rows: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update; returns the new state and float metrics of this batch.

  microbatches > 1: the gradient is accumulated over that many microbatches of whole
  routing groups of `group_rows` rows (`grad_accumulation`), the same update in less memory.
  """
  rng, dropout_key = jax.random.split(state.rng)
  if microbatches > 1:
    grads, metrics, model_state = grad_accumulation.accumulated_gradients(
      state.params,
      state.model_state,
      batch,
      dropout_key,
      state.step,
      graphdef=graphdef,
      loss_fn=loss_fn,
      loss_weights=loss_weights,
      num_microbatches=microbatches,
      group_rows=group_rows,
    )
  else:
    grads, metrics, model_state = batch_gradients(
      state, batch, dropout_key, graphdef=graphdef, loss_fn=loss_fn, loss_weights=loss_weights
    )
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["learning_rate"] = schedule(state.step)
  new_state = TrainState(
    step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state, rng=rng
  )
  # Checked on device so the host reads one flag per step. A finite grad norm (the root
  # of the sum of every gradient's square) bounds each squared gradient, so Adam's moments
  # stay finite and its normalised step is bounded: the new parameters are finite short of
  # an absurd learning rate. Checking parameters and moments themselves cost 3-5 % of a CPU
  # step (bench/RESULTS.md section 7). The non-parameter state (the expert bias) is
  # updated outside the gradient, so it is checked itself.
  metrics["is_finite"] = all_finite(
    (metrics["loss"], metrics["aux_loss"], metrics["grad_norm"], new_state.model_state)
  )
  return new_state, metrics


def jit_train_step(
  graphdef,
  optimizer,
  schedule,
  loss_weights,
  loss_fn: LossFn,
  *,
  state_shardings=None,
  mesh=None,
  microbatches: int = 1,
  group_rows: int = 1,
):
  """`state_shardings` (`training.state.train_state_shardings`) and `mesh` pin the layout:
  the state keeps its shardings step after step and the batch is split over every device."""
  step = functools.partial(
    train_step,
    graphdef=graphdef,
    optimizer=optimizer,
    schedule=schedule,
    loss_weights=loss_weights,
    loss_fn=loss_fn,
    microbatches=microbatches,
    group_rows=group_rows,
  )
  # The state is donated: its buffers are reused for the new state, halving peak memory.
  if state_shardings is None:
    return jax.jit(step, donate_argnums=0)
  return jax.jit(
    step,
    donate_argnums=0,
    in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
  )
