"""The dropless grouped expert kernel for CPU: a block loop with a hand-written backward.

Shapes: T tokens, D model width, F expert hidden width, E experts, K choices per
token, A = T*K assignments, P = A + block_size rows (the sorted rows plus room
for one block past the end), S rows of one block, N rows of a gather source, M
rows of a loop's output.

A `while` loop over experts and, inside, over blocks of
the expert's rows: floor(n / block_size) full blocks, then one tail block of
the smallest multiple of `granule` rows that covers the rest. Trip counts are
data, so the FLOPs are the assignments' own plus under `granule` rows per
expert (rows of the next group, whose results are dropped), never a
worst-case capacity. Each block runs the expert's layers as dense [S, D] x [D, F]
and [S, F] x [F, D] matmuls on its weight slices (no per-block weight
copies), so the hidden activation stays in cache. The loop also gathers each
block's rows from x by token and adds each row's gated output to its token, so
no sorted [A, D] copy of inputs or outputs exists. Backward, a `custom_vjp`
(`while` loops with data-dependent trip counts are not reverse-differentiable),
runs the same loop: it gathers dy by token, gets each gate's cotangent
dy[token] . y_row from dy[token] W_out^T (computed anyway, so forward keeps no
outputs, only the pre-activations: one [P, F] for the MLP, gate and up for
the gated expert) and scatter-adds dx by token. The activation's derivative
comes from `jax.vjp` of the hidden function, so any activation works.

Why this schedule, with the timings that chose it: bench/RESULTS.md, "Dropless block loop".
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from tmoe_jax.moe.experts import EXPERT_REGISTRY

Activation = Callable[[jax.Array], jax.Array]


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


def _varying_like(zeros, *operands):
  """`zeros` (a pytree) made to vary over every mesh axis that an operand varies over.

  Inside `shard_map` a loop carry must keep its type, and the blocks write values
  computed from the operands into carries that start as fresh zeros, which vary over
  no axis. Outside `shard_map` nothing varies and this returns `zeros` as they are.
  """
  axes = frozenset().union(*(jax.typeof(a).manual_axis_type.varying for a in jax.tree.leaves(operands)))
  return lax.pcast(zeros, tuple(sorted(axes)), to="varying") if axes else zeros


def _group_starts(group_sizes_E: jax.Array) -> jax.Array:
  return (jnp.cumsum(group_sizes_E) - group_sizes_E).astype(jnp.int32)


def _expert_parts(expert_type: str, weights):
  """(input projections, their biases, output projection, its bias); see `experts.ExpertType.parts`."""
  return EXPERT_REGISTRY[expert_type].parts(weights)


def _weights_of_parts(expert_type: str, w_in, b_in, w_out, b_out) -> tuple:
  return EXPERT_REGISTRY[expert_type].weights_of_parts(w_in, b_in, w_out, b_out)


def _hidden_fn(expert_type: str, activation: Activation) -> Callable[..., jax.Array]:
  """The hidden activation [S, F] from the pre-activations: act(z), or act(gate) * up."""
  return EXPERT_REGISTRY[expert_type].hidden(activation)


def _affine(x_SxN, w_NxM, b_M):
  return x_SxN @ w_NxM if b_M is None else x_SxN @ w_NxM + b_M


def _at_expert(e, arrays):
  return tuple(None if a is None else a[e] for a in arrays)


def _block_loop_forward(
  x_NxD,
  source_P,
  gate_P,
  group_sizes_E,
  weights,
  expert_type,
  activation,
  block_size,
  granule,
  *,
  num_outputs=None,
):
  """Sorted row r (input x_NxD[source_P[r]]) through its group's expert, block by block.

  With `num_outputs` (the MoE layer), row r's output times gate_P[r] is added to
  output row source_P[r] of the returned y_MxD, M = num_outputs: gather,
  experts and the gate-weighted combine in one pass, with no sorted copy of the
  inputs or outputs. Without it (`grouped_experts`), y_MxD is the sorted outputs
  themselves, M = P, zero past the groups; gate_P is unused. Also returns the
  pre-activations z_PxF kept for backward, one [P, F] per input projection
  (MLP: z; gated: gate and up).
  """
  w_in, b_in, w_out_ExFxD, b_out_ExD = _expert_parts(expert_type, weights)
  hidden_fn = _hidden_fn(expert_type, activation)
  num_rows = source_P.shape[0]
  d_model = x_NxD.shape[1]
  num_experts, _, d_ff = w_in[0].shape
  starts_E = _group_starts(group_sizes_E)
  out_dtype = jnp.result_type(x_NxD.dtype, w_out_ExFxD.dtype)

  def per_expert(e, carry):
    w_in_DxF, b_in_F = _at_expert(e, w_in), _at_expert(e, b_in)
    w_out_FxD, b_out_D = _at_expert(e, (w_out_ExFxD, b_out_ExD))

    def block(row, rows, valid, first, carry):
      del first
      y_MxD, z_PxF = carry
      source_S = lax.dynamic_slice_in_dim(source_P, row, rows)
      x_SxD = jnp.take(x_NxD, source_S, axis=0, mode="clip")
      z_SxF = tuple(_affine(x_SxD, w, b) for w, b in zip(w_in_DxF, b_in_F))
      y_SxD = _affine(hidden_fn(*z_SxF), w_out_FxD, b_out_D).astype(out_dtype)
      # Rows past `valid` belong to the next group (or to no group): their z is overwritten
      # when that group runs, and they add nothing to the output (zero gate) ...
      if num_outputs is not None:
        gate_S = _own_rows(lax.dynamic_slice_in_dim(gate_P, row, rows), valid).astype(out_dtype)
        y_MxD = y_MxD.at[source_S].add(gate_S[:, None] * y_SxD, mode="promise_in_bounds")
      else:
        # ... or, as sorted outputs, are overwritten too.
        y_MxD = lax.dynamic_update_slice_in_dim(y_MxD, y_SxD, row, 0)
      z_PxF = tuple(
        lax.dynamic_update_slice_in_dim(kept, z.astype(kept.dtype), row, 0) for kept, z in zip(z_PxF, z_SxF)
      )
      return y_MxD, z_PxF

    return _for_each_block(starts_E[e], group_sizes_E[e], block_size, granule, block, carry)

  init = (
    jnp.zeros((num_rows if num_outputs is None else num_outputs, d_model), out_dtype),
    tuple(jnp.zeros((num_rows, d_ff), jnp.result_type(x_NxD.dtype, w.dtype)) for w in w_in),
  )
  init = _varying_like(init, x_NxD, source_P, gate_P, group_sizes_E, weights)
  y_MxD, z_PxF = lax.fori_loop(0, num_experts, per_expert, init)
  if num_outputs is None:
    # The last group's tail block wrote up to block_size - 1 rows past the groups.
    tail = jnp.zeros((block_size, d_model), out_dtype)
    y_MxD = lax.dynamic_update_slice_in_dim(y_MxD, tail, jnp.sum(group_sizes_E), 0)
  return y_MxD, z_PxF


def _own_rows(values_Sx___, valid):
  """The rows past `valid` (other groups' rows in a tail block) set to 0."""
  own = lax.broadcasted_iota(jnp.int32, (values_Sx___.shape[0],) + (1,) * (values_Sx___.ndim - 1), 0) < valid
  return jnp.where(own, values_Sx___, 0)


def _block_loop_backward(
  x_NxD,
  source_P,
  gate_P,
  z_PxF,
  dy_MxD,
  group_sizes_E,
  weights,
  expert_type,
  activation,
  block_size,
  granule,
  *,
  combined,
):
  """Backward of `_block_loop_forward` (`combined`: it was called with num_outputs).

  Returns dx_NxD (each row's input cotangent added at its source), the gate
  cotangent of each sorted row (combined; else None), and the cotangents of the
  weight arrays in `weights` order (float32; the caller casts).
  """
  w_in, b_in, w_out_ExFxD, b_out_ExD = _expert_parts(expert_type, weights)
  hidden_fn = _hidden_fn(expert_type, activation)
  num_rows = source_P.shape[0]
  d_model = x_NxD.shape[1]
  num_experts, _, d_ff = w_in[0].shape
  starts_E = _group_starts(group_sizes_E)
  acc = jnp.float32

  def per_expert(e, carry):
    w_in_DxF = _at_expert(e, w_in)
    w_out_FxD, b_out_D = _at_expert(e, (w_out_ExFxD, b_out_ExD))

    def block(row, rows, valid, first, carry):
      dx_NxD, dgate_P, dw_in, db_in, dw_out, db_out = carry
      # A group's first block stores its gradient instead of adding it: one fewer pass over
      # [D, F] per expert, most of the weight-gradient traffic when experts get one block each.
      accumulate = functools.partial(_store_at if first else _add_at, e=e)
      source_S = lax.dynamic_slice_in_dim(source_P, row, rows)
      # The vjp of the hidden function gives act' for any activation: dz = dhidden * act'(z)
      # for the MLP; dgate = dhidden * up * act'(gate) and dup = dhidden * act(gate) gated.
      hidden_SxF, hidden_vjp = jax.vjp(hidden_fn, *(lax.dynamic_slice_in_dim(z, row, rows) for z in z_PxF))
      if combined:
        # A row's output cotangent is gate * dy[token]. The gate's own cotangent dy[token] . y_row
        # follows from dy[token] W_out^T, computed anyway: y rows need not be kept from forward.
        dy_token_SxD = jnp.take(dy_MxD, source_S, axis=0, mode="clip")
        dhidden_token_SxF = jnp.einsum("sd,fd->sf", dy_token_SxD, w_out_FxD)
        dgate_S = jnp.sum(dhidden_token_SxF * hidden_SxF, axis=-1)
        if b_out_D is not None:
          dgate_S = dgate_S + dy_token_SxD @ b_out_D
        # Rows past `valid` are rewritten when their own group runs (or lie past the groups).
        dgate_P = lax.dynamic_update_slice_in_dim(dgate_P, dgate_S.astype(dgate_P.dtype), row, 0)
        # Zero gates on the other groups' rows zero every contribution of those rows.
        gate_Sx1 = _own_rows(lax.dynamic_slice_in_dim(gate_P, row, rows), valid)[:, None]
        dy_SxD = gate_Sx1.astype(dy_MxD.dtype) * dy_token_SxD
        dhidden_SxF = gate_Sx1.astype(dhidden_token_SxF.dtype) * dhidden_token_SxF
      else:
        dy_SxD = _own_rows(lax.dynamic_slice_in_dim(dy_MxD, row, rows), valid)
        dhidden_SxF = jnp.einsum("sd,fd->sf", dy_SxD, w_out_FxD)
      dz_SxF = hidden_vjp(dhidden_SxF.astype(hidden_SxF.dtype))
      dx_SxD = jnp.einsum("sf,df->sd", dz_SxF[0], w_in_DxF[0])
      for dz, w in zip(dz_SxF[1:], w_in_DxF[1:]):
        dx_SxD = dx_SxD + jnp.einsum("sf,df->sd", dz, w)
      # The other groups' rows add 0 to their sources.
      dx_NxD = dx_NxD.at[source_S].add(dx_SxD.astype(dx_NxD.dtype), mode="promise_in_bounds")
      x_SxD = jnp.take(x_NxD, source_S, axis=0, mode="clip")
      dw_out = accumulate(
        dw_out, part=jnp.einsum("sf,sd->fd", hidden_SxF, dy_SxD, preferred_element_type=acc)
      )
      if db_out is not None:
        db_out = accumulate(db_out, part=jnp.sum(dy_SxD, axis=0, dtype=acc))
      dw_in = tuple(
        accumulate(dw, part=jnp.einsum("sd,sf->df", x_SxD, dz, preferred_element_type=acc))
        for dw, dz in zip(dw_in, dz_SxF)
      )
      db_in = tuple(
        None if db is None else accumulate(db, part=jnp.sum(dz, axis=0, dtype=acc))
        for db, dz in zip(db_in, dz_SxF)
      )
      return dx_NxD, dgate_P, dw_in, db_in, dw_out, db_out

    return _for_each_block(starts_E[e], group_sizes_E[e], block_size, granule, block, carry, mark_first=True)

  # Zeros stay only in the gradients of experts that got no rows; None for absent biases.
  zeros = lambda shape, present=True: jnp.zeros(shape, acc) if present else None
  init = (
    jnp.zeros(x_NxD.shape, x_NxD.dtype),
    jnp.zeros((num_rows,) if combined else (0,), jnp.float32 if gate_P is None else gate_P.dtype),
    tuple(zeros((num_experts, d_model, d_ff)) for _ in w_in),
    tuple(zeros((num_experts, d_ff), b is not None) for b in b_in),
    zeros((num_experts, d_ff, d_model)),
    zeros((num_experts, d_model), b_out_ExD is not None),
  )
  init = _varying_like(init, x_NxD, source_P, gate_P, z_PxF, dy_MxD, group_sizes_E, weights)
  dx_NxD, dgate_P, *parts = lax.fori_loop(0, num_experts, per_expert, init)
  return dx_NxD, (dgate_P if combined else None), _weights_of_parts(expert_type, *parts)


def _add_at(total_ExN, *, e, part):
  """total[e] += part, written as a slice update so XLA does it in place."""
  index = (e,) + (0,) * part.ndim
  current = lax.dynamic_slice(total_ExN, index, (1,) + part.shape)
  return lax.dynamic_update_slice(total_ExN, current + part[None], index)


def _store_at(total_ExN, *, e, part):
  """total[e] = part, in place."""
  return lax.dynamic_update_slice(total_ExN, part[None], (e,) + (0,) * part.ndim)


def _cotangent_of(primal, cotangent):
  """`cotangent` summed over the mesh axes it varies over and `primal` does not.

  Inside `shard_map` an input that is the same on every device of an axis meets
  varying ones here; its cotangent is the sum of every device's part (what autodiff
  gives the implicit broadcast), and a `custom_vjp` must return it in the input's type.
  """
  extra = jax.typeof(cotangent).manual_axis_type.varying - jax.typeof(primal).manual_axis_type.varying
  return lax.psum(cotangent, tuple(sorted(extra))) if extra else cotangent


def _weight_cotangents(weights, cotangents):
  return tuple(_cotangent_of(w, c.astype(w.dtype)) for w, c in zip(weights, cotangents))


def _padded_rows(num_rows: int, block_size: int) -> jax.Array:
  # Room for a block that starts at the last row (dynamic_slice would shift it back); the pad
  # rows read row 0, and their results are discarded.
  return jnp.pad(lax.iota(jnp.int32, num_rows), (0, block_size))


# grouped_experts: sorted rows in, sorted rows out.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def block_loop_grouped(x_AxD, group_sizes_E, weights, expert_type, activation, block_size, granule):
  return _block_loop_grouped_fwd(x_AxD, group_sizes_E, weights, expert_type, activation, block_size, granule)[
    0
  ]


def _block_loop_grouped_fwd(x_AxD, group_sizes_E, weights, expert_type, activation, block_size, granule):
  num_rows = x_AxD.shape[0]
  source_P = _padded_rows(num_rows, block_size)
  y_PxD, z_PxF = _block_loop_forward(
    x_AxD, source_P, None, group_sizes_E, weights, expert_type, activation, block_size, granule
  )
  return y_PxD[:num_rows], (x_AxD, z_PxF, group_sizes_E, weights)


def _block_loop_grouped_bwd(expert_type, activation, block_size, granule, residuals, dy_AxD):
  x_AxD, z_PxF, group_sizes_E, weights = residuals
  num_rows = x_AxD.shape[0]
  dy_PxD = jnp.pad(dy_AxD, ((0, block_size), (0, 0)))
  dx_AxD, _, cotangents = _block_loop_backward(
    x_AxD,
    _padded_rows(num_rows, block_size),
    None,
    z_PxF,
    dy_PxD,
    group_sizes_E,
    weights,
    expert_type,
    activation,
    block_size,
    granule,
    combined=False,
  )
  return _cotangent_of(x_AxD, dx_AxD), None, _weight_cotangents(weights, cotangents)


block_loop_grouped.defvjp(_block_loop_grouped_fwd, _block_loop_grouped_bwd)


# dropless_moe: tokens in, gate-weighted sums out, one custom_vjp for gather, experts and
# combine, so that forward adds each row's output to its token and backward reads dy per
# token and adds dx per token inside the loop.


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def block_loop_moe(x_TxD, weights_TxK, weights, sorted_, expert_type, activation, block_size, granule):
  return _block_loop_moe_fwd(
    x_TxD, weights_TxK, weights, sorted_, expert_type, activation, block_size, granule
  )[0]


def _sorted_gates(weights_TxK, sorted_, block_size):
  return jnp.pad(weights_TxK.reshape(-1)[sorted_.order_A], (0, block_size))


def _block_loop_moe_fwd(x_TxD, weights_TxK, weights, sorted_, expert_type, activation, block_size, granule):
  # Pad rows read token 0 with gate 0.
  token_P = jnp.pad(sorted_.token_A, (0, block_size))
  y_TxD, z_PxF = _block_loop_forward(
    x_TxD,
    token_P,
    _sorted_gates(weights_TxK, sorted_, block_size),
    sorted_.group_sizes_E,
    weights,
    expert_type,
    activation,
    block_size,
    granule,
    num_outputs=x_TxD.shape[0],
  )
  return y_TxD, (x_TxD, weights_TxK, weights, sorted_, z_PxF)


def _block_loop_moe_bwd(expert_type, activation, block_size, granule, residuals, dy_TxD):
  x_TxD, weights_TxK, weights, sorted_, z_PxF = residuals
  token_P = jnp.pad(sorted_.token_A, (0, block_size))
  dx_TxD, dgate_P, cotangents = _block_loop_backward(
    x_TxD,
    token_P,
    _sorted_gates(weights_TxK, sorted_, block_size),
    z_PxF,
    dy_TxD,
    sorted_.group_sizes_E,
    weights,
    expert_type,
    activation,
    block_size,
    granule,
    combined=True,
  )
  # Masked tokens' assignments sit past the groups, where dgate_P is not written (or is a tail
  # block's leftover): their weights are a constant 0 upstream, so only unmasked ones matter.
  dweights_TxK = jnp.take(dgate_P, sorted_.rank_TxK, axis=0, mode="clip").astype(weights_TxK.dtype)
  return (
    _cotangent_of(x_TxD, dx_TxD),
    _cotangent_of(weights_TxK, dweights_TxK),
    _weight_cotangents(weights, cotangents),
    None,
  )


block_loop_moe.defvjp(_block_loop_moe_fwd, _block_loop_moe_bwd)
