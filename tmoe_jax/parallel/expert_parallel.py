"""Expert-parallel top-k MoE: local routing, all-to-all to the experts' devices and back.

Shapes: T tokens (global), T_local = T / (data * expert) tokens per device,
D model width, F expert hidden width, E experts, K top-k, C capacity per
(device, expert) pair, X the 'expert' mesh axis size, E_local = E / X experts
per device.

Layout (`jax.shard_map` over the ('data', 'expert') mesh of `mesh.py`):
  tokens          [T, D]          split over ('data', 'expert'): every device routes T_local tokens
  router kernel   [D, E]          replicated
  expert weights  [E, ...]        split on 'expert' along E (replicated over 'data')

Per device:
  1. route its T_local tokens (`routing.top_k_route`) and give each assignment a
     slot (`dispatch.assign_slots`) with a per-device capacity
     C = ceil(capacity_factor * T_local * K / E): the devices never coordinate
     slot assignment, so which tokens drop depends on the local batch only;
  2. dispatch into [E, C, D] = [X, E_local, C, D]: block j goes to expert-axis peer j;
  3. `all_to_all` over 'expert': receive [X, E_local, C, D], the tokens every peer
     sent to this device's E_local experts, and run them as [E_local, X*C, D];
  4. `all_to_all` back, then `combine_outputs` on the local [E, C, D] results.
  'data' replicas exchange nothing in the forward pass; the gradients of the
  replicated router and of the expert weights are summed over the replicas by
  shard_map's transpose.

Routing statistics are global. The Switch balancing loss is E * sum_e f_e * P_e
with f_e and P_e means over *all* tokens; the mean of per-shard losses,
E * mean_s sum_e f_e^s P_e^s, is a different (and known-buggy) quantity: a
batch whose shards are each skewed toward a different expert is balanced
overall, yet every shard's product is large, so the averaged loss penalises a
balanced router. Here each shard contributes sums and counts, they are psum'd
over every device, and only then divided and multiplied, so every statistic
equals the single-device one on the whole batch (up to float summation order).

Dropless (`capacity_factor=None`): no capacity, nothing dropped. Each device
sorts its T_local * K assignments by expert and `ragged_exchange` sends every
row once to its expert's device (`jax.lax.ragged_all_to_all` on GPU/TPU; a
padded fixed-size all_to_all of T_local * min(K, E_local) rows per peer on CPU,
where XLA has no ragged all-to-all), which runs only the rows it received with
the grouped kernel of `moe.dropless`. With mesh.expert = 1 there is nothing to
exchange and each device runs the single-device dropless layer on its tokens.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from tmoe_jax.feedforward import ACTIVATIONS
from tmoe_jax.moe.dispatch import assign_slots, combine_outputs, dispatch_tokens
from tmoe_jax.moe.dropless import (
  check_expert_weights,
  combine_sorted_outputs,
  dropless_moe,
  grouped_experts,
  sort_by_expert,
)
from tmoe_jax.moe.experts import EXPERT_FUNCTIONS
from tmoe_jax.moe.routing import assign_slots_prioritized, check_top_k, top_k_route
from tmoe_jax.moe.statistics import MoEAux
from tmoe_jax.parallel.mesh import BATCH_AXES, EXPERT_AXIS, check_experts_divisible, num_token_shards
from tmoe_jax.parallel.ragged_exchange import exchange_and_run_experts, max_slice_rows, resolve_exchange
from tmoe_jax.parallel.sharding import EXPERT_PARAMS_BY_TYPE

# ---------------------------------------------------------------------------
# The expert MLPs as pure functions of their stacked weights (the math of
# `tmoe_jax.moe.experts`), so they can run on a device's slice of the experts.


def expert_weights_of(experts, expert_type: str = "mlp") -> tuple[jax.Array, ...]:
  """The stacked weights of an `MlpExperts` / `GatedMlpExperts` module, in `EXPERT_FUNCTIONS` order."""
  return tuple(getattr(experts, name)[...] for name in EXPERT_PARAMS_BY_TYPE[expert_type])


# ---------------------------------------------------------------------------
# Sizes.


def local_capacity(tokens_per_shard: int, num_experts: int, top_k: int, capacity_factor: float | None) -> int:
  """C per (device, expert): ceil(cf * T_local * K / E) clipped to [1, T_local]; T_local if cf is None.

  The same exact rational arithmetic as `MoEConfig.capacity`, on the local token count.
  """
  if capacity_factor is None:
    return tokens_per_shard
  capacity = math.ceil(fractions.Fraction(repr(capacity_factor)) * tokens_per_shard * top_k / num_experts)
  return max(1, min(capacity, tokens_per_shard))


@dataclasses.dataclass(frozen=True)
class AllToAllBytes:
  """All-to-all traffic of one expert-parallel MoE layer in one forward pass (backward moves as much again).

  capacity: C per (device, expert); None for dropless.
  rows_per_device: rows of one device's fixed-size send buffer: E * C with a
    capacity, X * T_local * min(K, E_local) for the padded dropless exchange.
  buffer_bytes_per_device: those rows' bytes.
  sent_bytes_per_device: what one device sends per forward pass, both exchanges
    (dispatch and return), without the 1/X of each buffer that stays local.
  total_bytes: sent_bytes_per_device summed over all devices.
  payload_bytes: the real (token, choice) rows among total_bytes if every
    assignment were kept and routing were uniform: what the ragged exchange
    (`jax.lax.ragged_all_to_all`, GPU/TPU) moves; the rest is padding.
  """

  capacity: int | None
  rows_per_device: int
  buffer_bytes_per_device: int
  sent_bytes_per_device: int
  total_bytes: int
  payload_bytes: int


def bytes_moved_per_layer(
  num_tokens: int,
  d_model: int,
  num_experts: int,
  top_k: int,
  capacity_factor: float | None,
  *,
  data: int,
  expert: int,
  dtype=jnp.float32,
) -> AllToAllBytes:
  """All-to-all bytes per MoE layer per step (forward) from the shapes alone; see `AllToAllBytes`."""
  shards = data * expert
  if num_tokens % shards:
    raise ValueError(f"num_tokens={num_tokens} must be divisible by data * expert = {shards}")
  itemsize = jnp.dtype(dtype).itemsize
  tokens_per_shard = num_tokens // shards
  if capacity_factor is None:
    capacity = None
    rows = expert * max_slice_rows(tokens_per_shard, top_k, num_experts // expert)
  else:
    capacity = local_capacity(tokens_per_shard, num_experts, top_k, capacity_factor)
    rows = num_experts * capacity
  buffer_bytes = rows * d_model * itemsize
  remote_share = fractions.Fraction(expert - 1, expert)
  sent_per_device = int(2 * buffer_bytes * remote_share)
  payload = int(2 * num_tokens * top_k * d_model * itemsize * remote_share)
  return AllToAllBytes(
    capacity=capacity,
    rows_per_device=rows,
    buffer_bytes_per_device=buffer_bytes,
    sent_bytes_per_device=sent_per_device,
    total_bytes=sent_per_device * shards,
    payload_bytes=payload,
  )


# ---------------------------------------------------------------------------
# The layer.


def _exchange_and_run(
  buffer_ExCxD: jax.Array, expert_weights: tuple, expert_fn: Callable, expert_axis_size: int
) -> jax.Array:
  """Runs every slot of a device's [E, C, D] buffer through its expert, wherever that expert lives."""
  num_experts, capacity, d_model = buffer_ExCxD.shape
  if expert_axis_size == 1:
    return expert_fn(expert_weights, buffer_ExCxD)
  experts_per_shard = num_experts // expert_axis_size
  # Experts are laid out shard-major (expert e lives on peer e // E_local), matching
  # the P('expert') split of the stacked weights.
  send_XxExCxD = buffer_ExCxD.reshape(expert_axis_size, experts_per_shard, capacity, d_model)
  # recv[j]: the tokens peer j sent to this device's experts.
  recv_XxExCxD = jax.lax.all_to_all(send_XxExCxD, EXPERT_AXIS, split_axis=0, concat_axis=0)
  local_in_ExXCxD = recv_XxExCxD.transpose(1, 0, 2, 3).reshape(
    experts_per_shard, expert_axis_size * capacity, d_model
  )
  local_out_ExXCxD = expert_fn(expert_weights, local_in_ExXCxD)
  out_XxExCxD = local_out_ExXCxD.reshape(experts_per_shard, expert_axis_size, capacity, -1).transpose(
    1, 0, 2, 3
  )
  # back[j]: this device's tokens, processed by peer j's experts.
  back_XxExCxD = jax.lax.all_to_all(out_XxExCxD, EXPERT_AXIS, split_axis=0, concat_axis=0)
  return back_XxExCxD.reshape(num_experts, capacity, -1)


def _global_stats(
  route, kept_TxK: jax.Array, token_mask_T: jax.Array, num_experts: int, top_k: int
) -> MoEAux:
  """Sums and counts on this shard, psum'd over every device, then divided: global statistics."""
  weight_T = token_mask_T.astype(jnp.float32)
  probs_TxE = route.router_probs_TxE
  log_z_T = jax.nn.logsumexp(route.router_logits_TxE, axis=-1)
  # Same clamp as `losses.router_entropy`.
  entropy_T = -jnp.sum(probs_TxE * jnp.log(jnp.maximum(probs_TxE, 1e-9)), axis=-1)
  routed_TxK = jnp.broadcast_to(token_mask_T[:, None], kept_TxK.shape)
  sums = {
    "tokens": jnp.sum(weight_T),
    "counts_E": jnp.einsum(
      "tke,t->e", jax.nn.one_hot(route.expert_indices_TxK, num_experts, dtype=jnp.float32), weight_T
    ),
    "probs_E": jnp.einsum("te,t->e", probs_TxE, weight_T),
    "z_squared": jnp.sum(weight_T * log_z_T**2),
    "entropy": jnp.sum(weight_T * entropy_T),
    "dropped": jnp.sum(routed_TxK & ~kept_TxK).astype(jnp.float32),
  }
  # The reduction must come before any product: see the module docstring.
  sums = jax.lax.psum(sums, BATCH_AXES)
  tokens = jnp.maximum(sums["tokens"], 1.0)
  assignments = jnp.maximum(sums["tokens"] * top_k, 1.0)
  fraction_E = sums["counts_E"] / assignments
  probability_E = sums["probs_E"] / tokens
  return MoEAux(
    load_balancing_loss=num_experts * jnp.sum(fraction_E * probability_E),
    router_z_loss=sums["z_squared"] / tokens,
    expert_fraction_E=fraction_E,
    dropped_fraction=sums["dropped"] / assignments,
    router_entropy=sums["entropy"] / tokens,
  )


def expert_parallel_moe(
  x_TxD: jax.Array,
  router_kernel_DxE: jax.Array,
  expert_weights: Sequence[jax.Array],
  *,
  mesh: Mesh,
  top_k: int,
  capacity_factor: float | None,
  normalize_gates: bool = True,
  activation: str = "relu",
  token_mask_T: jax.Array | None = None,
  softmax_order: str = "before",
  expert_type: str = "mlp",
  dtype=jnp.float32,
  jitter_key: jax.Array | None = None,
  jitter_eps: float = 0.0,
  expert_bias_E: jax.Array | None = None,
  batch_prioritized: bool = False,
  exchange: str = "auto",
) -> tuple[jax.Array, MoEAux]:
  """Top-k MoE layer with tokens split over ('data', 'expert') and experts over 'expert'.

  Args:
    x_TxD: [T, D] tokens; T must be divisible by data * expert. Under jit, pass
      it split over ('data', 'expert') on T (e.g. a batch-split [B, L, D]
      reshaped to [B*L, D]) to avoid a reshuffle at the shard_map boundary.
    router_kernel_DxE: [D, E], the router's `nnx.Linear` kernel (no bias); float32 math.
    expert_weights: stacked [E, ...] weights in `EXPERT_FUNCTIONS[expert_type]` order
      (`expert_weights_of(module.experts, expert_type)`); E divisible by X.
    mesh: a ('data', 'expert') mesh from `mesh.make_mesh`.
    top_k, normalize_gates, softmax_order, expert_bias_E: as `routing.top_k_route`.
    capacity_factor: per-device capacity ceil(cf * T_local * K / E); None = dropless.
    activation: a key of `feedforward.ACTIVATIONS`.
    token_mask_T: optional bool [T]; False (padding) tokens are not routed and
      are left out of every statistic.
    expert_type: "mlp" or "gated" (`moe.experts.EXPERT_TYPES`).
    dtype: the experts' compute dtype (the router is always float32).
    jitter_key, jitter_eps: multiplicative router jitter as in `top_k_route`; the
      [T, E] noise is drawn once for the whole batch, outside the shard_map, so it
      is the noise the single-device layer would draw with the same key.
    batch_prioritized: BPR slot order (`routing.assign_slots_prioritized`), per device.
    exchange: the dropless exchange, "ragged", "padded" or "auto" (ragged on
      GPU/TPU, padded on CPU); see `ragged_exchange`. Unused with a capacity.

  Returns:
    y_TxD: [T, D] in `dtype`, split like x_TxD; dropped assignments contribute 0.
    stats: global `MoEAux` (replicated scalars / [E]).
  """
  num_tokens, _ = x_TxD.shape
  num_experts = router_kernel_DxE.shape[-1]
  check_top_k(top_k, num_experts)
  check_experts_divisible(num_experts, mesh)
  expert_weights = check_expert_weights(expert_weights, expert_type)
  shards = num_token_shards(mesh)
  if num_tokens % shards:
    raise ValueError(
      f"the token count ({num_tokens}) must be divisible by mesh.data * mesh.expert = {shards}"
    )
  capacity = local_capacity(num_tokens // shards, num_experts, top_k, capacity_factor)
  exchange = resolve_exchange(exchange)
  expert_fn = functools.partial(
    EXPERT_FUNCTIONS[expert_type], activation=ACTIVATIONS[activation], dtype=dtype
  )
  expert_axis_size = mesh.shape[EXPERT_AXIS]

  tokens_spec = P(BATCH_AXES)
  inputs = {
    "x_TxD": x_TxD,
    "mask_T": jnp.ones((num_tokens,), bool) if token_mask_T is None else token_mask_T.astype(bool),
    "router_DxE": router_kernel_DxE,
    "experts": expert_weights,
  }
  specs = {
    "x_TxD": tokens_spec,
    "mask_T": tokens_spec,
    "router_DxE": P(),
    "experts": tuple(P(EXPERT_AXIS) for _ in expert_weights),
  }
  if jitter_key is not None and jitter_eps > 0.0:
    # Identical to the draw inside `top_k_route`, so results match the single-device layer.
    inputs["noise_TxE"] = jax.random.uniform(
      jitter_key, (num_tokens, num_experts), jnp.float32, minval=1.0 - jitter_eps, maxval=1.0 + jitter_eps
    )
    specs["noise_TxE"] = tokens_spec
  if expert_bias_E is not None:
    inputs["bias_E"] = expert_bias_E
    specs["bias_E"] = P()

  def _dropless_on_device(x_TxD, route, mask_T, local_weights):
    x_TxD = x_TxD.astype(dtype)
    weights = tuple(w.astype(dtype) for w in local_weights)
    if expert_axis_size == 1:
      return dropless_moe(
        x_TxD,
        route.expert_indices_TxK,
        route.gates_TxK,
        weights,
        activation,
        expert_type=expert_type,
        token_mask_T=mask_T,
      )
    sorted_ = sort_by_expert(route.expert_indices_TxK, num_experts, mask_T)
    y_sorted_AxD = exchange_and_run_experts(
      jnp.take(x_TxD, sorted_.token_A, axis=0),
      sorted_.group_sizes_E,
      functools.partial(grouped_experts, weights=weights, activation=activation, expert_type=expert_type),
      axis_name=EXPERT_AXIS,
      axis_size=expert_axis_size,
      max_rows=max_slice_rows(num_tokens // shards, top_k, num_experts // expert_axis_size),
      exchange=exchange,
    )
    return combine_sorted_outputs(
      y_sorted_AxD, sorted_.rank_TxK, jnp.where(mask_T[:, None], route.gates_TxK, 0)
    )

  def per_device(local):
    x_TxD = local["x_TxD"]
    mask_T = local["mask_T"]
    logits_TxE = jnp.dot(x_TxD.astype(jnp.float32), local["router_DxE"].astype(jnp.float32))
    if "noise_TxE" in local:
      logits_TxE = logits_TxE * local["noise_TxE"]
    route = top_k_route(
      logits_TxE,
      top_k,
      softmax_order=softmax_order,
      normalize_gates=normalize_gates,
      expert_bias_E=local.get("bias_E"),
    )
    if capacity_factor is None:
      y_TxD = _dropless_on_device(x_TxD, route, mask_T, local["experts"])
      return y_TxD, _global_stats(
        route, jnp.ones(route.expert_indices_TxK.shape, bool), mask_T, num_experts, top_k
      )
    if batch_prioritized:
      slots = assign_slots_prioritized(
        route.expert_indices_TxK, route.router_probs_TxE, num_experts, capacity, mask_T
      )
    else:
      slots = assign_slots(route.expert_indices_TxK, num_experts, capacity, mask_T)
    buffer_ExCxD = dispatch_tokens(x_TxD, slots, num_experts, capacity)
    y_ExCxD = _exchange_and_run(buffer_ExCxD, local["experts"], expert_fn, expert_axis_size)
    y_TxD = combine_outputs(y_ExCxD, slots, route.gates_TxK)
    return y_TxD, _global_stats(route, slots.kept_TxK, mask_T, num_experts, top_k)

  stats_specs = MoEAux(
    load_balancing_loss=P(),
    router_z_loss=P(),
    expert_fraction_E=P(),
    dropped_fraction=P(),
    router_entropy=P(),
  )
  return jax.shard_map(
    per_device, mesh=mesh, in_specs=(specs,), out_specs=(tokens_spec, stats_specs), check_vma=True
  )(inputs)
