"""The dropless expert-parallel exchange: each (token, choice) row travels once, to its expert.

Runs per device inside `jax.shard_map` over the 'expert' axis (size X, E_local =
E / X experts per device, shard-major: expert e lives on peer e // E_local).
Shapes: A assignments on this device (T_local * K), sorted by expert; S the most
rows one device can send one peer, T_local * min(K, E_local) (a token's K
experts are distinct, so at most min(K, E_local) of them live on one peer);
R = X * S rows in a receive buffer; D model width.

1. The A rows are sorted by expert, so the rows for peer j are one contiguous
   slice. Peers swap their per-expert row counts (an all_to_all of [X, E_local]
   ints) and from them every offset the exchange needs (`ExchangePlan`).
2. Rows go out with a `ragged_all_to_all`; each device receives X slices (one
   per sender, each sorted by local expert) into an [R, D] buffer.
3. A stable sort by local expert makes each local expert's rows contiguous, and
   the grouped expert kernel (`moe.dropless.grouped_experts`: ragged_dot on
   GPU/TPU, the block loop on CPU) runs only those rows: FLOPs are the real
   assignments', never E * T_local rows.
4. The results go back by the mirror-image exchange into the sender's sorted order.

Two implementations of the exchange share that plan and one signature, that of
`jax.lax.ragged_all_to_all`:
- "ragged" (GPU, TPU): `jax.lax.ragged_all_to_all`, moving only the real rows.
- "padded" (CPU, where XLA has no ragged-all-to-all: "UNIMPLEMENTED: HLO opcode
  `ragged-all-to-all` is not supported by XLA:CPU"): `padded_ragged_all_to_all`
  packs each peer's slice into a fixed [S, D] block and uses the fixed-size
  `all_to_all`; it moves X * S rows per device (E_local / min(K, E_local) times
  fewer than an [E, T_local, D] capacity buffer with C = T_local).
Both are linear in the rows, so JAX differentiates through them (the transpose
of an exchange is the reverse exchange).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from tmoe_jax.parallel.platform import target_backend

EXCHANGES = ("auto", "ragged", "padded")

# The grouped expert computation: (rows [R, D] grouped by local expert, group sizes
# [E_local]) -> outputs [R, D], rows past the groups 0.
LocalExperts = Callable[[jax.Array, jax.Array], jax.Array]


def resolve_exchange(exchange: str) -> str:
  """Checks the name and maps "auto" to "ragged" on GPU/TPU and "padded" on CPU."""
  if exchange not in EXCHANGES:
    raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
  if exchange != "auto":
    return exchange
  return "padded" if target_backend() == "cpu" else "ragged"


def max_slice_rows(tokens_per_shard: int, top_k: int, experts_per_shard: int) -> int:
  """S: the most rows one device sends one peer (top-k picks distinct experts)."""
  return tokens_per_shard * min(top_k, experts_per_shard)


def _exclusive_cumsum(sizes: jax.Array) -> jax.Array:
  return jnp.cumsum(sizes) - sizes


@struct.dataclass
class ExchangePlan:
  """Every offset and size of both exchanges, from the row counts alone (int32).

  send_sizes_X / input_offsets_X: the slice of this device's sorted rows for each peer.
  recv_counts_XxL: rows each peer sends here, per local expert (L = E_local).
  recv_sizes_X / recv_offsets_X: where each peer's slice lands in the receive buffer.
  output_offsets_X: where this device's slice lands in each peer's receive buffer.
  return_offsets_X: where each peer's slice came from in that peer's sorted rows.
  """

  send_sizes_X: jax.Array
  input_offsets_X: jax.Array
  recv_counts_XxL: jax.Array
  recv_sizes_X: jax.Array
  recv_offsets_X: jax.Array
  output_offsets_X: jax.Array
  return_offsets_X: jax.Array


def plan_exchange(group_sizes_E: jax.Array, *, axis_name: str, axis_size: int) -> ExchangePlan:
  """The exchange plan for rows sorted by expert with these per-expert counts [E]."""
  counts_XxL = group_sizes_E.astype(jnp.int32).reshape(axis_size, -1)
  send_sizes_X = counts_XxL.sum(axis=1)
  input_offsets_X = _exclusive_cumsum(send_sizes_X)
  # recv_counts[i]: peer i's counts for this device's experts.
  recv_counts_XxL = lax.all_to_all(counts_XxL, axis_name, split_axis=0, concat_axis=0)
  recv_sizes_X = recv_counts_XxL.sum(axis=1)
  recv_offsets_X = _exclusive_cumsum(recv_sizes_X)
  # Swap the two offset tables so that each side learns where its slices go.
  output_offsets_X = lax.all_to_all(recv_offsets_X, axis_name, split_axis=0, concat_axis=0)
  return_offsets_X = lax.all_to_all(input_offsets_X, axis_name, split_axis=0, concat_axis=0)
  return ExchangePlan(
    send_sizes_X=send_sizes_X,
    input_offsets_X=input_offsets_X,
    recv_counts_XxL=recv_counts_XxL,
    recv_sizes_X=recv_sizes_X,
    recv_offsets_X=recv_offsets_X,
    output_offsets_X=output_offsets_X,
    return_offsets_X=return_offsets_X,
  )


def padded_ragged_all_to_all(
  operand: jax.Array,
  output: jax.Array,
  input_offsets: jax.Array,
  send_sizes: jax.Array,
  output_offsets: jax.Array,
  recv_sizes: jax.Array,
  *,
  axis_name: str,
  max_rows: int,
) -> jax.Array:
  """`jax.lax.ragged_all_to_all` with one slice per peer, built on the fixed-size `all_to_all`.

  Same arguments and result (see its docstring), with `max_rows` >= every send
  size: each slice is padded to [max_rows, ...] for the exchange.
  """
  rows_S = lax.iota(jnp.int32, max_rows)
  source_XxS = input_offsets[:, None] + rows_S
  sent_XxS = rows_S < send_sizes[:, None]
  blocks_XxSx_ = jnp.take(operand, source_XxS, axis=0, mode="clip")
  blocks_XxSx_ = jnp.where(sent_XxS.reshape(sent_XxS.shape + (1,) * (operand.ndim - 1)), blocks_XxSx_, 0)
  received_XxSx_ = lax.all_to_all(blocks_XxSx_, axis_name, split_axis=0, concat_axis=0)
  # Where each peer's slice lands here: the receive side of `output_offsets`.
  landing_X = lax.all_to_all(output_offsets, axis_name, split_axis=0, concat_axis=0)
  destination_XxS = jnp.where(
    rows_S < recv_sizes[:, None], landing_X[:, None] + rows_S, output.shape[0]
  )  # out of range: dropped
  return output.at[destination_XxS.reshape(-1)].set(
    received_XxSx_.reshape((-1,) + operand.shape[1:]).astype(output.dtype), mode="drop"
  )


def _local_expert_of_rows(plan: ExchangePlan, num_rows: int) -> jax.Array:
  """The local expert of each receive-buffer row [R]; L (none) for rows past the received ones."""
  experts_per_shard = plan.recv_counts_XxL.shape[1]
  row_R = lax.iota(jnp.int32, num_rows)
  ends_X = plan.recv_offsets_X + plan.recv_sizes_X
  sender_R = jnp.minimum(jnp.searchsorted(ends_X, row_R, side="right"), ends_X.shape[0] - 1)
  position_R = row_R - plan.recv_offsets_X[sender_R]
  expert_ends_RxL = jnp.cumsum(plan.recv_counts_XxL, axis=1)[sender_R]
  local_expert_R = jnp.sum(position_R[:, None] >= expert_ends_RxL, axis=1).astype(jnp.int32)
  return jnp.where(row_R < ends_X[-1], local_expert_R, experts_per_shard)


def exchange_and_run_experts(
  x_sorted_AxD: jax.Array,
  group_sizes_E: jax.Array,
  run_local_experts: LocalExperts,
  *,
  axis_name: str,
  axis_size: int,
  max_rows: int,
  exchange: str = "auto",
) -> jax.Array:
  """Runs each sorted row through its expert, on whichever device holds it: [A, D] -> [A, D].

  x_sorted_AxD: this device's rows sorted by expert, `group_sizes_E` [E] rows per
    expert; rows past sum(group_sizes_E) (masked tokens) are not sent and give 0.
  run_local_experts: the grouped computation of this device's E / axis_size experts.
  max_rows: S, `max_slice_rows(...)`: a bound on any one peer slice.
  exchange: "ragged", "padded" or "auto" (see the module docstring).
  """
  exchange = resolve_exchange(exchange)
  if exchange == "ragged":
    all_to_all = functools.partial(lax.ragged_all_to_all, axis_name=axis_name)
  else:
    all_to_all = functools.partial(padded_ragged_all_to_all, axis_name=axis_name, max_rows=max_rows)
  plan = plan_exchange(group_sizes_E, axis_name=axis_name, axis_size=axis_size)
  num_rows = axis_size * max_rows
  received_RxD = all_to_all(
    x_sorted_AxD,
    jnp.zeros((num_rows,) + x_sorted_AxD.shape[1:], x_sorted_AxD.dtype),
    plan.input_offsets_X,
    plan.send_sizes_X,
    plan.output_offsets_X,
    plan.recv_sizes_X,
  )
  # Senders' slices are each sorted by local expert; a stable sort groups them all.
  local_expert_R = _local_expert_of_rows(plan, num_rows)
  _, order_R = lax.sort((local_expert_R, lax.iota(jnp.int32, num_rows)), num_keys=1, is_stable=True)
  grouped_out_RxD = run_local_experts(jnp.take(received_RxD, order_R, axis=0), plan.recv_counts_XxL.sum(0))
  inverse_R = jnp.zeros((num_rows,), jnp.int32).at[order_R].set(lax.iota(jnp.int32, num_rows))
  out_RxD = jnp.take(grouped_out_RxD, inverse_R, axis=0)
  return all_to_all(
    out_RxD,
    jnp.zeros(x_sorted_AxD.shape[:1] + out_RxD.shape[1:], out_RxD.dtype),
    plan.recv_offsets_X,
    plan.recv_sizes_X,
    plan.return_offsets_X,
    plan.send_sizes_X,
  )
