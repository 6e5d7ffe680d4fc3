"""Gradient accumulation: one optimizer update from N microbatches, equal to the one-batch update.

Shapes: N microbatches, R rows per microbatch, E experts, L MoE layers.

`train.batch_size` stays the batch of one update; `train.grad_accum_steps = N`
cuts it into N microbatches of whole routing groups, so that capacity and drop
order are those of the whole batch (`moe.token_choice.routing_groups`). Every loss
term is then rebuilt exactly:

- the task loss, a mean over the batch's units (tokens when the task reports
  `num_tokens`, else rows), is `sum_m T_m L_m / T`;
- each layer's z-loss, a mean over its tokens, is `sum_m N_m z_m / N`;
- each layer's Switch balancing loss `E * sum_e f_e P_e` is not a sum over
  microbatches: its load `f_e` is the whole batch's. A first, forward-only pass
  over the microbatches measures `f_e`, `N` and `T`; the second pass
  differentiates `E * sum_e f_e N_m P_e^m / N` per microbatch (the load is a count,
  with no gradient, as in the one-batch step) and the gradients add up to the
  one-batch gradient.

The first pass costs one more forward per microbatch; it is skipped when the model
has no MoE layer and the task's loss is a mean over rows. Dropout draws its masks
per microbatch (its own key each), so the update equals the one-batch update
exactly when no randomness is drawn in training (dropout 0, no router jitter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tmoe_jax.moe.statistics import MoEAux
from tmoe_jax.validation import require, require_type

# The metric a task's loss reports when it is a mean over tokens rather than rows.
LOSS_UNITS_METRIC = "num_tokens"


def split_microbatches(batch: dict[str, jax.Array], num_microbatches: int, group_rows: int = 1):
  """Each [B, ...] array as [N, B / N, ...]: microbatch m holds routing groups m, m + N, m + 2N, ...

  Groups (`group_rows` consecutive rows) stay whole; striding them spreads every microbatch
  over the devices the batch is split over, instead of giving each microbatch to a few.
  """

  def split(x):
    rows = x.shape[0]
    if rows % (num_microbatches * group_rows):
      raise ValueError(
        f"a batch of {rows} rows does not split into {num_microbatches} microbatches of whole routing "
        f"groups of {group_rows} rows"
      )
    groups_per_microbatch = rows // (num_microbatches * group_rows)
    x = x.reshape(groups_per_microbatch, num_microbatches, group_rows, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(num_microbatches, rows // num_microbatches, *x.shape[3:])

  return jax.tree.map(split, batch)


def _units(task_metrics: dict[str, jax.Array], microbatch: dict[str, jax.Array]) -> jax.Array:
  if LOSS_UNITS_METRIC in task_metrics:
    return task_metrics[LOSS_UNITS_METRIC].astype(jnp.float32)
  return jnp.asarray(len(next(iter(microbatch.values()))), jnp.float32)


def accumulated_gradients(
  params: nnx.State,
  model_state: nnx.State,
  batch: dict[str, jax.Array],
  dropout_key: jax.Array,
  step: jax.Array,
  *,
  graphdef: nnx.GraphDef,
  loss_fn,
  loss_weights,
  num_microbatches: int,
  group_rows: int = 1,
):
  """(gradients, metrics, new model state) of one update over `num_microbatches` microbatches.

  The metrics are the one-batch step's: the task loss and its metrics pooled over units,
  the MoE losses of the whole batch, and routing metrics pooled over each layer's tokens.
  Model state updated in the forward pass is threaded through the microbatches in order.
  """
  microbatches = split_microbatches(batch, num_microbatches, group_rows)
  keys = jax.random.split(dropout_key, num_microbatches)

  def forward(params, model_state, microbatch, key):
    model = nnx.merge(graphdef, params, model_state, copy=True)
    task_loss, task_metrics, auxes = loss_fn(model, microbatch, nnx.Rngs(dropout=key), step)
    return task_loss, task_metrics, auxes, nnx.state(model, nnx.Not(nnx.Param))

  first = jax.tree.map(lambda x: x[0], microbatches)
  _, shape_metrics, shape_auxes, _ = jax.eval_shape(forward, params, model_state, first, keys[0])
  totals = _whole_batch_totals(forward, params, model_state, microbatches, keys, shape_metrics, shape_auxes)

  def accumulate(carry, inputs):
    grads_sum, model_state = carry
    microbatch, key = inputs

    def objective(params):
      task_loss, task_metrics, auxes, new_state = forward(params, model_state, microbatch, key)
      units = _units(task_metrics, microbatch)
      balance, z = _share_of_moe_losses(auxes, totals["layers"])
      share = task_loss * units / totals["units"] + loss_weights.load_balancing * balance
      share = share + loss_weights.router_z * z
      return share, (task_loss, units, task_metrics, auxes, balance, z, new_state)

    grads, (task_loss, units, task_metrics, auxes, balance, z, new_state) = jax.grad(objective, has_aux=True)(
      params
    )
    pooled = {
      "loss": task_loss * units,
      "balance": balance,
      "z": z,
      "task": {name: value * units for name, value in task_metrics.items() if name != LOSS_UNITS_METRIC},
      "units": units,
      "layers": tuple(_routing_metric_sums(aux) for aux in auxes),
    }
    return (jax.tree.map(jnp.add, grads_sum, grads), new_state), pooled

  zeros = jax.tree.map(jnp.zeros_like, params)
  (grads, model_state), pooled = jax.lax.scan(accumulate, (zeros, model_state), (microbatches, keys))
  return grads, _metrics(pooled, totals, loss_weights, shape_metrics), model_state


def _whole_batch_totals(forward, params, model_state, microbatches, keys, shape_metrics, shape_auxes):
  """The first pass: units T, and per MoE layer its load f_E and token count N, of the whole batch."""
  num_microbatches = len(keys)
  if not shape_auxes and LOSS_UNITS_METRIC not in shape_metrics:
    rows = jax.tree.leaves(microbatches)[0].shape[1] * num_microbatches
    return {"units": jnp.asarray(rows, jnp.float32), "layers": ()}

  def measure(_, inputs):
    microbatch, key = inputs
    _, task_metrics, auxes, _ = forward(params, model_state, microbatch, key)
    layers = tuple((aux.expert_fraction_E * aux.num_tokens, aux.num_tokens) for aux in auxes)
    return None, (_units(task_metrics, microbatch), layers)

  _, (units_N, layers) = jax.lax.scan(measure, None, (microbatches, keys))
  return {
    "units": jnp.maximum(jnp.sum(units_N), 1.0),
    "layers": tuple(
      (jnp.sum(load_NxE, 0) / jnp.maximum(jnp.sum(tokens_N), 1.0), jnp.maximum(jnp.sum(tokens_N), 1.0))
      for load_NxE, tokens_N in layers
    ),
  }


def _share_of_moe_losses(auxes: tuple[MoEAux, ...], layer_totals) -> tuple[jax.Array, jax.Array]:
  """This microbatch's part of the whole batch's mean-over-layers balancing and z losses."""
  if not auxes:
    return jnp.zeros(()), jnp.zeros(())
  balance, z = [], []
  for aux, (load_E, tokens) in zip(auxes, layer_totals, strict=True):
    num_experts = load_E.shape[-1]
    share = aux.num_tokens / tokens
    balance.append(num_experts * jnp.sum(load_E * aux.router_probability_E) * share)
    z.append(aux.router_z_loss * share)
  return jnp.mean(jnp.stack(balance)), jnp.mean(jnp.stack(z))


def _routing_metric_sums(aux: MoEAux) -> dict[str, jax.Array]:
  return {
    "expert_fraction": aux.expert_fraction_E * aux.num_tokens,
    "dropped_fraction": aux.dropped_fraction * aux.num_tokens,
    "router_entropy": aux.router_entropy * aux.num_tokens,
    "tokens": aux.num_tokens,
  }


def _metrics(pooled, totals, loss_weights, shape_metrics) -> dict[str, jax.Array]:
  units = jnp.maximum(jnp.sum(pooled["units"]), 1.0)
  balance, z = jnp.sum(pooled["balance"]), jnp.sum(pooled["z"])
  metrics = {
    "loss": jnp.sum(pooled["loss"]) / units,
    "aux_loss": loss_weights.load_balancing * balance + loss_weights.router_z * z,
    "load_balancing_loss": balance,
    "router_z_loss": z,
    **{name: jnp.sum(value) / units for name, value in pooled["task"].items()},
  }
  if LOSS_UNITS_METRIC in shape_metrics:
    metrics[LOSS_UNITS_METRIC] = jnp.sum(pooled["units"])
  if pooled["layers"]:

    def per_layer(name):
      return jnp.stack(
        [jnp.sum(layer[name], 0) / jnp.maximum(jnp.sum(layer["tokens"]), 1.0) for layer in pooled["layers"]]
      )

    metrics |= {name: per_layer(name) for name in ("expert_fraction", "dropped_fraction", "router_entropy")}
  return metrics


def microbatch_plan(config, mesh) -> tuple[int, int]:
  """(microbatches, rows per routing group) of a run; ConfigError naming the field that forbids it.

  `train.grad_accum_steps` (1 = off) must cut `train.batch_size` into microbatches that
  split evenly over the mesh and hold whole routing groups (`model.sequences_per_group`).
  """
  microbatches = config.train.get("grad_accum_steps", 1)
  require_type(microbatches, int, "train.grad_accum_steps")
  require(microbatches >= 1, "train.grad_accum_steps", f"must be >= 1, got {microbatches}")
  model = config.get("model", {})
  group_rows = model.get("sequences_per_group", 0) or 1
  if microbatches == 1:
    return 1, group_rows
  batch_size = config.train.batch_size
  require(
    batch_size % microbatches == 0,
    "train.grad_accum_steps",
    f"must divide train.batch_size={batch_size}, got {microbatches}",
  )
  rows = batch_size // microbatches
  devices = mesh.size
  require(
    rows % devices == 0,
    "train.grad_accum_steps",
    f"each microbatch of {rows} rows must split over the mesh's {devices} devices",
  )
  require(
    model.get("sequences_per_group", 1) != 0 or model.get("dispatch", "capacity") == "dropless",
    "model.sequences_per_group",
    "0 makes the whole batch one routing group, which microbatches cannot split without changing "
    "which tokens are dropped; set it to divide train.batch_size / train.grad_accum_steps",
  )
  require(
    rows % group_rows == 0,
    "model.sequences_per_group",
    f"must divide the microbatch of {rows} rows (train.batch_size / train.grad_accum_steps), got {group_rows}",
  )
  require(
    not model.get("expert_bias_rate", 0.0),
    "model.expert_bias_rate",
    "the bias update needs the whole batch's expert load, which gradient accumulation does not "
    "hand to the layers; use train.grad_accum_steps=1 or expert_bias_rate=0",
  )
  return microbatches, group_rows
