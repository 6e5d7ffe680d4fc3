"""Dropless top-k MoE: every assignment is computed, no capacity, no dropped tokens.

Shapes: T tokens, D model width, F expert hidden width, E experts, K choices per
token, A = T*K assignments, P = A + block_size rows of a padded sorted buffer,
S rows of one block.

The A (token, choice) assignments are stably sorted by expert, so each expert's
rows are one contiguous group of the sorted buffer (`sort_by_expert`); each row
then runs through its own expert's MLP (`grouped_mlp`), and every token sums its
K outputs weighted by the gates (`dropless_moe`). The group sizes are data, the
shapes are not: everything is jit-able, and differentiable in x, gates and all
expert weights.

Two ways to run the grouped MLP:

- "ragged_dot": `jax.lax.ragged_dot` for both matmuls, the grouped matmul that
  XLA lowers to a real grouped kernel on GPU and TPU. XLA:CPU has no such kernel:
  it computes every expert on every row and masks, E times the FLOPs (measured
  on 16384 x 512 -> 1024 rows: 1.19 s at E=8 and 11.2 s at E=64, against 0.155 s
  for one equal-FLOP dense matmul).
- "block_loop": a `while` loop over experts and, inside, over blocks of that
  expert's contiguous rows. Each block is a dense [S, D] x [D, F] matmul on
  slices of the sorted buffer (no gathered per-block weights, no copies of the
  activations), so the FLOPs are the assignments' own plus the padding of each
  expert's last block to a multiple of `granule` rows (< granule rows per
  expert; the pad rows are the next group's rows, whose results are discarded).
  The trip counts are data-dependent, so no worst-case capacity is ever computed.
  Full blocks have `block_size` rows; the one remainder block per expert has
  the smallest multiple of `granule` that covers it, so an expert costs
  floor(n / block_size) + 1 matmuls per layer, each big enough for XLA:CPU's
  dot to run near peak (measured on this 2-core Sapphire Rapids: 128 GFLOP/s at
  32 rows, 230 at 256, 290 at 512). Both MLP layers run in the same block, so the
  [S, F] hidden activation stays in cache; forward stores only the pre-activation
  for backward. Backward (a `custom_vjp`, since `while` loops with data-dependent
  trip counts are not reverse-differentiable) runs the same loop and adds each
  block's weight gradients straight into the expert's slice of the gradient.

"auto" picks "ragged_dot" on GPU/TPU and "block_loop" on CPU
(`jax.default_backend()`). Measured numbers for the whole layer (train step and
forward+backward against a dense FFN of equal active FLOPs) are in
`bench/moe_layer.py`'s output; the choices above were made from these kernel
measurements (T=8192, K=2, D=512, F=1024, float32, 2 CPU cores, fwd+bwd of the
grouped MLP alone relative to the dense FFN's):

  block schedule                       E=8     E=64
  one size, 128 rows                   1.19x   1.58x
  binary ladder 256/128/64/32          1.08x   1.51x
  512-row blocks + one 32-granule tail   see the module-level bench
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from tmoe_jax.feedforward import ACTIVATIONS

METHODS = ("auto", "ragged_dot", "block_loop")
DEFAULT_BLOCK_SIZE = 512
DEFAULT_GRANULE = 32

Activation = Callable[[jax.Array], jax.Array]


@struct.dataclass
class SortedAssignments:
  """The A = T*K assignments stably sorted by expert (ties keep token order).

  order_A: int32, the flat assignment `t * K + k` at each sorted position.
  token_A: int32, the token of each sorted assignment (`order_A // K`).
  expert_A: int32, the expert of each sorted assignment, ascending; E for an
    assignment of a masked token (those sort last and belong to no group).
  rank_TxK: int32, the sorted position of each assignment (inverse of order_A).
  group_sizes_E: int32, how many sorted rows each expert owns; they sum to A
    unless tokens are masked.
  """

  order_A: jax.Array
  token_A: jax.Array
  expert_A: jax.Array
  rank_TxK: jax.Array
  group_sizes_E: jax.Array


def sort_by_expert(
  expert_indices_TxK: jax.Array, num_experts: int, token_mask_T: jax.Array | None = None
) -> SortedAssignments:
  """Groups the assignments by expert; masked tokens' assignments go past the last group."""
  num_tokens, top_k = expert_indices_TxK.shape
  expert_TxK = expert_indices_TxK.astype(jnp.int32)
  if token_mask_T is not None:
    expert_TxK = jnp.where(token_mask_T[:, None], expert_TxK, num_experts)
  num_assignments = num_tokens * top_k
  flat_A = lax.iota(jnp.int32, num_assignments)
  expert_A, order_A = lax.sort((expert_TxK.reshape(-1), flat_A), num_keys=1, is_stable=True)
  rank_A = jnp.zeros((num_assignments,), jnp.int32).at[order_A].set(flat_A, unique_indices=True)
  # Counting the sorted keys: E+1 bins so masked assignments fall in the dropped last one.
  boundaries_E = jnp.searchsorted(expert_A, jnp.arange(num_experts + 1, dtype=jnp.int32), side="left")
  return SortedAssignments(
    order_A=order_A,
    token_A=order_A // top_k,
    expert_A=expert_A,
    rank_TxK=rank_A.reshape(num_tokens, top_k),
    group_sizes_E=jnp.diff(boundaries_E).astype(jnp.int32),
  )


# ---------------------------------------------------------------------------
# The block loop (CPU).


def _for_each_block(start, size, block_size: int, granule: int, body, carry, *, mark_first: bool = False):
  """Runs `body(row, S, valid, first, carry)` over blocks covering rows [start, start + size).

  `floor(size / block_size)` full blocks, then one block of the smallest
  multiple S of `granule` holding the rest (if any) with only `valid` rows its
  own. Every block has a static S; the counts are data. With `mark_first` the
  static `first` is True for the group's first block only (else always False),
  which costs a second copy of each loop.
  """
  num_full = size // block_size

  def full_block(first):
    return lambda j, carry: body(start + j * block_size, block_size, jnp.int32(block_size), first, carry)

  if mark_first:
    carry = lax.fori_loop(0, jnp.minimum(num_full, 1), full_block(True), carry)
    carry = lax.fori_loop(1, num_full, full_block(False), carry)
  else:
    carry = lax.fori_loop(0, num_full, full_block(False), carry)
  rest = size - num_full * block_size
  rest_row = start + num_full * block_size
  tail_granules = (rest + granule - 1) // granule
  for multiple in range(1, block_size // granule + 1):
    rows = multiple * granule
    for first in (True, False) if mark_first else (False,):
      runs = tail_granules == multiple
      if mark_first:
        runs = runs & ((num_full == 0) == first)
      # A 0- or 1-trip loop per tail size (lax.switch would copy the carried buffers). The row
      # must depend on the trip index j (always 0): a loop-invariant body would be hoisted out
      # of the loop by XLA and run for every tail size.
      carry = lax.fori_loop(
        0,
        runs.astype(jnp.int32),
        lambda j, c, rows=rows, first=first: body(rest_row + j * rows, rows, rest, first, c),
        carry,
      )
  return carry


def _group_starts(group_sizes_E: jax.Array) -> jax.Array:
  return (jnp.cumsum(group_sizes_E) - group_sizes_E).astype(jnp.int32)


def _block_loop_forward(
  x_NxD,
  source_P,
  group_sizes_E,
  w_in_ExDxF,
  b_in_ExF,
  w_out_ExFxD,
  b_out_ExD,
  activation,
  block_size,
  granule,
):
  """Sorted row r is x_NxD[source_P[r]]; returns y_PxD (zero past the groups) and the pre-activation z_PxF.

  Rows are gathered block by block inside the loop, so the sorted input is
  never materialised.
  """
  num_rows = source_P.shape[0]
  d_model = x_NxD.shape[1]
  num_experts, _, d_ff = w_in_ExDxF.shape
  starts_E = _group_starts(group_sizes_E)
  out_dtype = jnp.result_type(x_NxD.dtype, w_out_ExFxD.dtype)

  def per_expert(e, carry):
    w_in_DxF, b_in_F = w_in_ExDxF[e], b_in_ExF[e]
    w_out_FxD, b_out_D = w_out_ExFxD[e], b_out_ExD[e]

    def block(row, rows, valid, first, carry):
      del valid, first  # rows past `valid` are the next group's: overwritten when that group runs
      y_PxD, z_PxF = carry
      x_SxD = jnp.take(x_NxD, lax.dynamic_slice_in_dim(source_P, row, rows), axis=0, mode="clip")
      z_SxF = x_SxD @ w_in_DxF + b_in_F
      y_SxD = activation(z_SxF) @ w_out_FxD + b_out_D
      return (
        lax.dynamic_update_slice_in_dim(y_PxD, y_SxD.astype(out_dtype), row, 0),
        lax.dynamic_update_slice_in_dim(z_PxF, z_SxF.astype(z_PxF.dtype), row, 0),
      )

    return _for_each_block(starts_E[e], group_sizes_E[e], block_size, granule, block, carry)

  init = (
    jnp.zeros((num_rows, d_model), out_dtype),
    jnp.zeros((num_rows, d_ff), jnp.result_type(x_NxD.dtype, w_in_ExDxF.dtype)),
  )
  y_PxD, z_PxF = lax.fori_loop(0, num_experts, per_expert, init)
  # The last group's tail block wrote up to block_size - 1 rows past the groups.
  tail = jnp.zeros((block_size, d_model), out_dtype)
  y_PxD = lax.dynamic_update_slice_in_dim(y_PxD, tail, jnp.sum(group_sizes_E), 0)
  return y_PxD, z_PxF


def _block_loop_backward(
  x_NxD,
  source_P,
  scale_P,
  z_PxF,
  dy_NxD,
  group_sizes_E,
  w_in_ExDxF,
  w_out_ExFxD,
  activation,
  block_size,
  granule,
):
  """Backward of `_block_loop_forward` where sorted row r's output cotangent is scale_P[r] * dy_NxD[source_P[r]].

  Returns dx_NxD (each row's input cotangent added at its source) and the
  cotangents of the four weight arrays (float32; the caller casts).
  """
  d_model = x_NxD.shape[1]
  num_experts, _, d_ff = w_in_ExDxF.shape
  starts_E = _group_starts(group_sizes_E)
  acc = jnp.float32

  def per_expert(e, carry):
    w_in_DxF, w_out_FxD = w_in_ExDxF[e], w_out_ExFxD[e]

    def block(row, rows, valid, first, carry):
      dx_NxD, dw_in, db_in, dw_out, db_out = carry
      # A group's first block stores its gradient instead of adding it: one fewer pass over
      # [D, F] per expert, most of the weight-gradient traffic when experts get one block each.
      accumulate = functools.partial(_store_at if first else _add_at, e=e)
      source_S = lax.dynamic_slice_in_dim(source_P, row, rows)
      # Zeroing the other groups' output cotangents zeroes every contribution of their rows.
      scale_Sx1 = jnp.where(
        lax.broadcasted_iota(jnp.int32, (rows, 1), 0) < valid,
        lax.dynamic_slice_in_dim(scale_P, row, rows)[:, None],
        0,
      )
      dy_SxD = scale_Sx1.astype(dy_NxD.dtype) * jnp.take(dy_NxD, source_S, axis=0, mode="clip")
      x_SxD = jnp.take(x_NxD, source_S, axis=0, mode="clip")
      hidden_SxF, activation_vjp = jax.vjp(activation, lax.dynamic_slice_in_dim(z_PxF, row, rows))
      dhidden_SxF = jnp.einsum("sd,fd->sf", dy_SxD, w_out_FxD)
      (dz_SxF,) = activation_vjp(dhidden_SxF.astype(hidden_SxF.dtype))
      dx_SxD = jnp.einsum("sf,df->sd", dz_SxF, w_in_DxF)
      # The other groups' rows add 0 to their sources.
      dx_NxD = dx_NxD.at[source_S].add(dx_SxD.astype(dx_NxD.dtype), mode="promise_in_bounds")
      dw_out = accumulate(
        dw_out, part=jnp.einsum("sf,sd->fd", hidden_SxF, dy_SxD, preferred_element_type=acc)
      )
      db_out = accumulate(db_out, part=jnp.sum(dy_SxD, axis=0, dtype=acc))
      dw_in = accumulate(dw_in, part=jnp.einsum("sd,sf->df", x_SxD, dz_SxF, preferred_element_type=acc))
      db_in = accumulate(db_in, part=jnp.sum(dz_SxF, axis=0, dtype=acc))
      return dx_NxD, dw_in, db_in, dw_out, db_out

    return _for_each_block(starts_E[e], group_sizes_E[e], block_size, granule, block, carry, mark_first=True)

  # Zeros stay only in the gradients of experts that got no rows.
  init = (
    jnp.zeros(x_NxD.shape, x_NxD.dtype),
    jnp.zeros((num_experts, d_model, d_ff), acc),
    jnp.zeros((num_experts, d_ff), acc),
    jnp.zeros((num_experts, d_ff, d_model), acc),
    jnp.zeros((num_experts, d_model), acc),
  )
  return lax.fori_loop(0, num_experts, per_expert, init)


def _add_at(total_ExN, *, e, part):
  """total[e] += part, written as a slice update so XLA does it in place."""
  index = (e,) + (0,) * part.ndim
  current = lax.dynamic_slice(total_ExN, index, (1,) + part.shape)
  return lax.dynamic_update_slice(total_ExN, current + part[None], index)


def _store_at(total_ExN, *, e, part):
  """total[e] = part, in place."""
  return lax.dynamic_update_slice(total_ExN, part[None], (e,) + (0,) * part.ndim)


def _weight_cotangents(weights, cotangents):
  return tuple(c.astype(w.dtype) for w, c in zip(weights, cotangents))


# grouped_mlp: sorted rows in, sorted rows out.


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _block_loop_grouped(
  x_AxD, group_sizes_E, w_in_ExDxF, b_in_ExF, w_out_ExFxD, b_out_ExD, activation, block_size, granule
):
  return _block_loop_grouped_fwd(
    x_AxD, group_sizes_E, w_in_ExDxF, b_in_ExF, w_out_ExFxD, b_out_ExD, activation, block_size, granule
  )[0]


def _padded_rows(num_rows: int, block_size: int) -> jax.Array:
  # Room for a block that starts at the last row (dynamic_slice would shift it back); the pad
  # rows read row 0, and their results are discarded.
  return jnp.pad(lax.iota(jnp.int32, num_rows), (0, block_size))


def _block_loop_grouped_fwd(
  x_AxD, group_sizes_E, w_in_ExDxF, b_in_ExF, w_out_ExFxD, b_out_ExD, activation, block_size, granule
):
  num_rows = x_AxD.shape[0]
  weights = (w_in_ExDxF, b_in_ExF, w_out_ExFxD, b_out_ExD)
  y_PxD, z_PxF = _block_loop_forward(
    x_AxD, _padded_rows(num_rows, block_size), group_sizes_E, *weights, activation, block_size, granule
  )
  return y_PxD[:num_rows], (x_AxD, z_PxF, group_sizes_E, weights)


def _block_loop_grouped_bwd(activation, block_size, granule, residuals, dy_AxD):
  x_AxD, z_PxF, group_sizes_E, weights = residuals
  source_P = _padded_rows(x_AxD.shape[0], block_size)
  dx_AxD, *cotangents = _block_loop_backward(
    x_AxD,
    source_P,
    jnp.ones(source_P.shape, dy_AxD.dtype),
    z_PxF,
    dy_AxD,
    group_sizes_E,
    weights[0],
    weights[2],
    activation,
    block_size,
    granule,
  )
  return (dx_AxD, None, *_weight_cotangents(weights, cotangents))


_block_loop_grouped.defvjp(_block_loop_grouped_fwd, _block_loop_grouped_bwd)


# dropless_moe: tokens in, gate-weighted sums out. One custom_vjp over gather, experts and
# combine, so that backward reads dy per token and adds dx per token inside the loop: no
# [A, D] copy of the inputs, output cotangents or input cotangents is ever made.


def _combine(y_PxD, rank_TxK, weights_TxK):
  # A sum over k (not an einsum) lets XLA fuse the row gathers instead of building [T, K, D].
  return sum(
    weights_TxK[:, k, None].astype(y_PxD.dtype) * jnp.take(y_PxD, rank_TxK[:, k], axis=0, mode="clip")
    for k in range(rank_TxK.shape[1])
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _block_loop_moe(
  x_TxD, weights_TxK, w_in_ExDxF, b_in_ExF, w_out_ExFxD, b_out_ExD, sorted_, activation, block_size, granule
):
  return _block_loop_moe_fwd(
    x_TxD, weights_TxK, w_in_ExDxF, b_in_ExF, w_out_ExFxD, b_out_ExD, sorted_, activation, block_size, granule
  )[0]


def _block_loop_moe_fwd(
  x_TxD, weights_TxK, w_in_ExDxF, b_in_ExF, w_out_ExFxD, b_out_ExD, sorted_, activation, block_size, granule
):
  weights = (w_in_ExDxF, b_in_ExF, w_out_ExFxD, b_out_ExD)
  # Pad rows read token 0; their results are discarded.
  token_P = jnp.pad(sorted_.token_A, (0, block_size))
  y_PxD, z_PxF = _block_loop_forward(
    x_TxD, token_P, sorted_.group_sizes_E, *weights, activation, block_size, granule
  )
  y_TxD = _combine(y_PxD, sorted_.rank_TxK, weights_TxK)
  return y_TxD, (x_TxD, weights_TxK, weights, sorted_, y_PxD, z_PxF)


def _block_loop_moe_bwd(activation, block_size, granule, residuals, dy_TxD):
  x_TxD, weights_TxK, weights, sorted_, y_PxD, z_PxF = residuals
  top_k = weights_TxK.shape[1]
  dweights_TxK = jnp.stack(
    [
      jnp.sum(dy_TxD * jnp.take(y_PxD, sorted_.rank_TxK[:, k], axis=0, mode="clip"), axis=-1)
      for k in range(top_k)
    ],
    axis=1,
  ).astype(weights_TxK.dtype)
  token_P = jnp.pad(sorted_.token_A, (0, block_size))
  # Each sorted row's output cotangent is its gate times its token's dy.
  scale_P = jnp.pad(weights_TxK.reshape(-1)[sorted_.order_A], (0, block_size))
  dx_TxD, *cotangents = _block_loop_backward(
    x_TxD,
    token_P,
    scale_P,
    z_PxF,
    dy_TxD,
    sorted_.group_sizes_E,
    weights[0],
    weights[2],
    activation,
    block_size,
    granule,
  )
  return (dx_TxD, dweights_TxK, *_weight_cotangents(weights, cotangents), None)


_block_loop_moe.defvjp(_block_loop_moe_fwd, _block_loop_moe_bwd)


# ---------------------------------------------------------------------------
# ragged_dot (GPU/TPU).


def _ragged_dot_mlp(x_AxD, group_sizes_E, w_in_ExDxF, b_in_ExF, w_out_ExFxD, b_out_ExD, activation):
  num_rows = x_AxD.shape[0]
  num_experts = w_in_ExDxF.shape[0]
  ends_E = jnp.cumsum(group_sizes_E)
  # Expert of each row; E (no expert, zero bias, zero output) past the last group.
  expert_A = jnp.searchsorted(ends_E, lax.iota(jnp.int32, num_rows), side="right")
  bias = lambda b_ExN: jnp.take(b_ExN, expert_A, axis=0, mode="fill", fill_value=0)
  hidden_AxF = activation(lax.ragged_dot(x_AxD, w_in_ExDxF, group_sizes_E) + bias(b_in_ExF))
  y_AxD = lax.ragged_dot(hidden_AxF.astype(w_out_ExFxD.dtype), w_out_ExFxD, group_sizes_E) + bias(b_out_ExD)
  return jnp.where((expert_A < num_experts)[:, None], y_AxD, 0)


# ---------------------------------------------------------------------------
# Public API.


def resolve_method(method: str) -> str:
  """ "auto" -> "ragged_dot" on GPU/TPU (a real grouped matmul), "block_loop" on CPU."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if method != "auto":
    return method
  return "block_loop" if jax.default_backend() == "cpu" else "ragged_dot"


def _activation_fn(activation: str | Activation) -> Activation:
  return ACTIVATIONS[activation] if isinstance(activation, str) else activation


def _check_block(block_size: int, granule: int) -> None:
  if granule < 1 or block_size < granule or block_size % granule:
    raise ValueError(f"block_size must be a positive multiple of granule >= 1, got {block_size}, {granule}")


def grouped_mlp(
  x_sorted_AxD: jax.Array,
  group_sizes_E: jax.Array,
  w_in_ExDxF: jax.Array,
  b_in_ExF: jax.Array,
  w_out_ExFxD: jax.Array,
  b_out_ExD: jax.Array,
  activation: str | Activation = "relu",
  *,
  method: str = "auto",
  block_size: int = DEFAULT_BLOCK_SIZE,
  granule: int = DEFAULT_GRANULE,
) -> jax.Array:
  """Row a of the first `group_sizes_E[0]` rows through expert 0's MLP, the next group through expert 1's, ...

  Returns y_sorted_AxD; rows past `sum(group_sizes_E)` are 0. `activation` is a
  name from `tmoe_jax.feedforward.ACTIVATIONS` or a callable (hashable, for jit).
  """
  method = resolve_method(method)
  activation = _activation_fn(activation)
  group_sizes_E = group_sizes_E.astype(jnp.int32)
  if method == "ragged_dot":
    return _ragged_dot_mlp(
      x_sorted_AxD, group_sizes_E, w_in_ExDxF, b_in_ExF, w_out_ExFxD, b_out_ExD, activation
    )
  _check_block(block_size, granule)
  return _block_loop_grouped(
    x_sorted_AxD, group_sizes_E, w_in_ExDxF, b_in_ExF, w_out_ExFxD, b_out_ExD, activation, block_size, granule
  )


def dropless_moe(
  x_TxD: jax.Array,
  expert_indices_TxK: jax.Array,
  gates_TxK: jax.Array,
  w_in_ExDxF: jax.Array,
  b_in_ExF: jax.Array,
  w_out_ExFxD: jax.Array,
  b_out_ExD: jax.Array,
  activation: str | Activation = "relu",
  *,
  token_mask_T: jax.Array | None = None,
  method: str = "auto",
  block_size: int = DEFAULT_BLOCK_SIZE,
  granule: int = DEFAULT_GRANULE,
) -> jax.Array:
  """y[t] = sum_k gates[t, k] * expert_{e[t, k]}(x[t]) for every token and choice: [T, D] -> [T, D].

  Masked tokens (token_mask_T False) are not computed and give 0. The output
  has the experts' compute dtype (x and weights promoted), like `combine_outputs`.
  """
  method = resolve_method(method)
  activation = _activation_fn(activation)
  num_experts = w_in_ExDxF.shape[0]
  sorted_ = sort_by_expert(expert_indices_TxK, num_experts, token_mask_T)
  weights_TxK = gates_TxK
  if token_mask_T is not None:
    weights_TxK = jnp.where(token_mask_T[:, None], weights_TxK, 0)
  if method == "ragged_dot":
    x_sorted_AxD = jnp.take(x_TxD, sorted_.token_A, axis=0)
    y_sorted_AxD = _ragged_dot_mlp(
      x_sorted_AxD, sorted_.group_sizes_E, w_in_ExDxF, b_in_ExF, w_out_ExFxD, b_out_ExD, activation
    )
    return _combine(y_sorted_AxD, sorted_.rank_TxK, weights_TxK)
  _check_block(block_size, granule)
  return _block_loop_moe(
    x_TxD, weights_TxK, w_in_ExDxF, b_in_ExF, w_out_ExFxD, b_out_ExD, sorted_, activation, block_size, granule
  )
