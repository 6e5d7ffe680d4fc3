"""Expert parallelism: `token_choice.token_choice_moe` under `jax.shard_map`, plus the exchanges.

Shapes: G routing groups (global), G_local = G / (data * expert) per device, S
tokens per group, D model width, E experts, K top-k, C capacity per (group,
expert), X the 'expert' mesh axis size, E_local = E / X experts per device.

Layout (`jax.shard_map` over the ('data', 'expert') mesh of `parallel.mesh`):
  tokens          [G, S, D]       groups split over ('data', 'expert')
  router kernel   [D, E]          replicated
  expert weights  [E, ...]        split on 'expert' along E (replicated over 'data')

Every device runs the single-device function on its G_local groups. Only the
`ExpertCompute` differs, and adds the exchanges:
  capacity  the [E, G_local*C, D] slot buffer is cut into X blocks of E_local
            experts; `all_to_all` over 'expert' sends block j to peer j, which
            runs its experts on [E_local, X*G_local*C, D]; a second
            `all_to_all` brings the results back.
  dropless  each device sorts its assignments by expert and `ragged_exchange`
            sends every row once to its expert's device
            (`jax.lax.ragged_all_to_all` on GPU/TPU, a padded fixed-size
            all_to_all on CPU), which runs only the rows it received through
            the grouped kernel of `moe.dropless`.
Then the `RoutingSums` are psum'd over every device, so `statistics.finalize`
gives the statistics of the whole batch. Capacity and drop order are decided
per routing group, so the output, the losses and the gradients equal the
single-device layer's on any mesh (up to float summation order). 'data'
replicas exchange nothing in the forward pass; the gradients of the replicated
router and of the expert weights are summed over them by shard_map's
transpose.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from tmoe_jax.moe.dispatch import expert_capacity
from tmoe_jax.moe.dropless import (
  check_expert_weights,
  combine_sorted_outputs,
  grouped_experts,
  sort_by_expert,
)
from tmoe_jax.moe.routing import check_top_k
from tmoe_jax.moe.statistics import RoutingSums
from tmoe_jax.moe.token_choice import ExpertCompute, local_experts, token_choice_moe
from tmoe_jax.parallel.mesh import BATCH_AXES, EXPERT_AXIS, check_experts_divisible, num_token_shards
from tmoe_jax.parallel.ragged_exchange import exchange_and_run_experts, max_slice_rows, resolve_exchange

# ---------------------------------------------------------------------------
# Sizes.


@dataclasses.dataclass(frozen=True)
class AllToAllBytes:
  """All-to-all traffic of one expert-parallel MoE layer in one forward pass (backward moves as much again).

  capacity: C per (routing group, expert); None for dropless.
  rows_per_device: rows of one device's fixed-size send buffer: G_local * E * C
    with a capacity, X * T_local * min(K, E_local) for the padded dropless exchange.
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
  group_size: int | None = None,
  dtype=jnp.float32,
) -> AllToAllBytes:
  """All-to-all bytes per MoE layer per step (forward) from the shapes alone; see `AllToAllBytes`.

  `group_size`: tokens per routing group (None = one group per device).
  """
  shards = data * expert
  if num_tokens % shards:
    raise ValueError(f"num_tokens={num_tokens} must be divisible by data * expert = {shards}")
  itemsize = jnp.dtype(dtype).itemsize
  tokens_per_shard = num_tokens // shards
  group_size = tokens_per_shard if group_size is None else group_size
  if tokens_per_shard % group_size:
    raise ValueError(f"group_size={group_size} must divide the tokens per device ({tokens_per_shard})")
  if capacity_factor is None:
    capacity = None
    rows = expert * max_slice_rows(tokens_per_shard, top_k, num_experts // expert)
  else:
    capacity = expert_capacity(group_size, num_experts, top_k, capacity_factor)
    rows = (tokens_per_shard // group_size) * num_experts * capacity
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
# The experts across the 'expert' axis.


def exchanged_experts(
  local_weights: Sequence[jax.Array],
  *,
  expert_type: str,
  activation: str,
  dtype,
  num_experts: int,
  expert_axis_size: int,
  tokens_per_device: int,
  top_k: int,
  exchange: str,
) -> ExpertCompute:
  """`ExpertCompute` for a device holding E_local = E / X experts: rows travel to their expert's device.

  Experts are laid out shard-major (expert e lives on peer e // E_local), matching
  the P('expert') split of the stacked weights.
  """
  local_weights = tuple(local_weights)
  experts_per_shard = num_experts // expert_axis_size
  on_device = local_experts(local_weights, expert_type=expert_type, activation=activation, dtype=dtype)

  def run_buffers(buffer_ExNxD):
    _, rows, d_model = buffer_ExNxD.shape
    send_XxExNxD = buffer_ExNxD.reshape(expert_axis_size, experts_per_shard, rows, d_model)
    # recv[j]: the rows peer j sent to this device's experts.
    recv_XxExNxD = jax.lax.all_to_all(send_XxExNxD, EXPERT_AXIS, split_axis=0, concat_axis=0)
    local_in = recv_XxExNxD.transpose(1, 0, 2, 3).reshape(experts_per_shard, expert_axis_size * rows, d_model)
    local_out = on_device.run_buffers(local_in)
    out_XxExNxD = local_out.reshape(experts_per_shard, expert_axis_size, rows, -1).transpose(1, 0, 2, 3)
    # back[j]: this device's rows, processed by peer j's experts.
    back_XxExNxD = jax.lax.all_to_all(out_XxExNxD, EXPERT_AXIS, split_axis=0, concat_axis=0)
    return back_XxExNxD.reshape(num_experts, rows, -1)

  def run_dropless(x_TxD, expert_indices_TxK, gates_TxK, token_mask_T):
    weights = tuple(w.astype(dtype) for w in local_weights)
    sorted_ = sort_by_expert(expert_indices_TxK, num_experts, token_mask_T)
    y_sorted_AxD = exchange_and_run_experts(
      jnp.take(x_TxD.astype(dtype), sorted_.token_A, axis=0),
      sorted_.group_sizes_E,
      functools.partial(grouped_experts, weights=weights, activation=activation, expert_type=expert_type),
      axis_name=EXPERT_AXIS,
      axis_size=expert_axis_size,
      max_rows=max_slice_rows(tokens_per_device, top_k, experts_per_shard),
      exchange=exchange,
    )
    return combine_sorted_outputs(
      y_sorted_AxD, sorted_.rank_TxK, jnp.where(token_mask_T[:, None], gates_TxK, 0)
    )

  return ExpertCompute(run_buffers=run_buffers, run_dropless=run_dropless)


# ---------------------------------------------------------------------------
# The layer.


def expert_parallel_moe(
  x_GxSxD: jax.Array,
  token_mask_GxS: jax.Array,
  router_kernel_DxE: jax.Array,
  expert_weights: Sequence[jax.Array],
  *,
  mesh: Mesh,
  top_k: int,
  capacity: int | None,
  expert_type: str = "mlp",
  activation: str = "relu",
  dtype=jnp.float32,
  softmax_order: str = "before",
  normalize_gates: bool = True,
  batch_prioritized: bool = False,
  jitter_GxSxE: jax.Array | None = None,
  expert_bias_E: jax.Array | None = None,
  router_dtype=jnp.float32,
  exchange: str = "auto",
) -> tuple[jax.Array, RoutingSums]:
  """`token_choice.token_choice_moe` with groups split over ('data', 'expert') and experts over 'expert'.

  Args:
    x_GxSxD, token_mask_GxS, router_kernel_DxE, top_k, capacity, softmax_order,
      normalize_gates, batch_prioritized, jitter_GxSxE, expert_bias_E, router_dtype: as
      `token_choice_moe`. G must be divisible by data * expert; under jit, pass
      the groups split over ('data', 'expert') to avoid a reshuffle.
    expert_weights: stacked [E, ...] weights in `EXPERT_FUNCTIONS[expert_type]`
      order (`experts.expert_weights_of(module)`); E divisible by X.
    mesh: a ('data', 'expert') mesh from `parallel.mesh.make_mesh`.
    expert_type, activation, dtype: the experts' kind, activation name and
      compute dtype.
    exchange: the dropless exchange, "ragged", "padded" or "auto" (ragged on
      GPU/TPU, padded on CPU); see `parallel.ragged_exchange`.

  Returns:
    y_GxSxD in `dtype`, split like x; and the `RoutingSums` of the whole batch
    (psum'd over every device, replicated).
  """
  num_groups, group_size, _ = x_GxSxD.shape
  num_experts = router_kernel_DxE.shape[-1]
  check_top_k(top_k, num_experts)
  check_experts_divisible(num_experts, mesh)
  expert_weights = check_expert_weights(expert_weights, expert_type)
  shards = num_token_shards(mesh)
  if num_groups % shards:
    raise ValueError(
      f"the routing groups ({num_groups}) must be divisible by mesh.data * mesh.expert = {shards}"
    )
  exchange = resolve_exchange(exchange)
  expert_axis_size = mesh.shape[EXPERT_AXIS]
  groups_spec = P(BATCH_AXES)
  inputs = {
    "x": x_GxSxD,
    "mask": token_mask_GxS.astype(bool),
    "router": router_kernel_DxE,
    "experts": expert_weights,
  }
  specs = {
    "x": groups_spec,
    "mask": groups_spec,
    "router": P(),
    "experts": tuple(P(EXPERT_AXIS) for _ in expert_weights),
  }
  if jitter_GxSxE is not None:
    inputs["jitter"], specs["jitter"] = jitter_GxSxE, groups_spec
  if expert_bias_E is not None:
    inputs["bias"], specs["bias"] = expert_bias_E, P()

  def per_device(local):
    expert_settings = {"expert_type": expert_type, "activation": activation, "dtype": dtype}
    if expert_axis_size == 1:
      experts = local_experts(local["experts"], **expert_settings)
    else:
      experts = exchanged_experts(
        local["experts"],
        **expert_settings,
        num_experts=num_experts,
        expert_axis_size=expert_axis_size,
        tokens_per_device=(num_groups // shards) * group_size,
        top_k=top_k,
        exchange=exchange,
      )
    y, sums = token_choice_moe(
      local["x"],
      local["mask"],
      local["router"],
      experts,
      top_k=top_k,
      capacity=capacity,
      softmax_order=softmax_order,
      normalize_gates=normalize_gates,
      batch_prioritized=batch_prioritized,
      jitter_GxSxE=local.get("jitter"),
      expert_bias_E=local.get("bias"),
      router_dtype=router_dtype,
    )
    # Sums, never ratios, are reduced: see `moe.statistics`.
    return y, jax.lax.psum(sums, BATCH_AXES)

  return jax.shard_map(
    per_device, mesh=mesh, in_specs=(specs,), out_specs=(groups_spec, P()), check_vma=True
  )(inputs)
