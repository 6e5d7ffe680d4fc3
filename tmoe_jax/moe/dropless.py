"""Dropless top-k MoE: every assignment is computed, no capacity, no dropped tokens.

Shapes: T tokens, D model width, F expert hidden width, E experts, K choices per
token, A = T*K assignments, P = A + block_size rows (the sorted rows plus room
for one block past the end), S rows of one block, N rows of a gather source, M
rows of a loop's output.

The A (token, choice) assignments are stably sorted by expert, so each expert
owns one contiguous group of sorted rows (`sort_by_expert`); each row runs
through its own expert (`grouped_experts`), and every token sums its K
outputs weighted by the gates (`dropless_moe`). Group sizes are data, shapes
are not: everything jits, and is differentiable in x, the gates and all weights.

Experts are either type of `moe.experts`, given as their stacked weights in
`EXPERT_PARAMS_BY_TYPE` order: "mlp", act(x W_in + b_in) W_out + b_out, and
"gated" (SwiGLU/GeGLU), (act(x W_gate) * x W_up) W_down. Both are one shape,
hidden(x W_1 + b_1, ...) W_out + b_out with one or two input projections, which
is how both methods run them with the same code. Both methods also run inside
`shard_map` (the expert-parallel layer calls them per device).

Methods, and which "auto" picks (`parallel.platform.target_backend()`: the local backend,
or the one a lowering targets):

- "ragged_dot" (GPU, TPU): `ragged_dot_experts`, `jax.lax.ragged_dot` for every
  matmul, the grouped matmul XLA lowers to a grouped kernel there.
- "block_loop" (CPU): `block_loop`, a `while` loop over experts and blocks of
  their rows with a hand-written backward; only the assignments' own FLOPs, never
  a worst-case capacity.

The files: `expert_sort` (the permutation), `block_loop`, `ragged_dot_experts`,
and this module, the public entry points. Measured timings: bench/RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from tmoe_jax.feedforward import ACTIVATIONS
from tmoe_jax.moe.block_loop import block_loop_grouped, block_loop_moe
from tmoe_jax.moe.expert_sort import SortedAssignments, combine_sorted_outputs, sort_by_expert
from tmoe_jax.moe.experts import EXPERT_PARAMS_BY_TYPE
from tmoe_jax.moe.ragged_dot_experts import ragged_dot_experts
from tmoe_jax.parallel.platform import target_backend

__all__ = [
  "METHODS",
  "SortedAssignments",
  "check_expert_weights",
  "combine_sorted_outputs",
  "dropless_moe",
  "grouped_experts",
  "grouped_mlp",
  "resolve_method",
  "sort_by_expert",
]

METHODS = ("auto", "ragged_dot", "block_loop")
DEFAULT_BLOCK_SIZE = 512
DEFAULT_GRANULE = 32

Activation = Callable[[jax.Array], jax.Array]


def resolve_method(method: str) -> str:
  """Checks a method name and maps "auto" to "ragged_dot" on GPU/TPU, "block_loop" on CPU."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if method != "auto":
    return method
  return "block_loop" if target_backend() == "cpu" else "ragged_dot"


def _activation_fn(activation: str | Activation) -> Activation:
  return ACTIVATIONS[activation] if isinstance(activation, str) else activation


def _check_block(block_size: int, granule: int) -> None:
  if granule < 1 or block_size < granule or block_size % granule:
    raise ValueError(f"block_size must be a positive multiple of granule >= 1, got {block_size}, {granule}")


def check_expert_weights(weights, expert_type: str) -> tuple[jax.Array, ...]:
  """`weights` as a tuple, checked against `EXPERT_PARAMS_BY_TYPE[expert_type]`."""
  if expert_type not in EXPERT_PARAMS_BY_TYPE:
    raise ValueError(f"expert_type must be one of {tuple(EXPERT_PARAMS_BY_TYPE)}, got {expert_type!r}")
  names = EXPERT_PARAMS_BY_TYPE[expert_type]
  # A lone stacked array would pass a length check by its expert count.
  if not isinstance(weights, (tuple, list)) or len(weights) != len(names):
    got = f"{len(weights)} arrays" if isinstance(weights, (tuple, list)) else type(weights).__name__
    raise ValueError(f"expert_type {expert_type!r} takes a tuple of weights {names}, got {got}")
  return tuple(weights)


def grouped_experts(
  x_sorted_AxD: jax.Array,
  group_sizes_E: jax.Array,
  weights: Sequence[jax.Array],
  activation: str | Activation = "relu",
  *,
  expert_type: str = "mlp",
  method: str = "auto",
  block_size: int = DEFAULT_BLOCK_SIZE,
  granule: int = DEFAULT_GRANULE,
) -> jax.Array:
  """Row a of the first `group_sizes_E[0]` rows through expert 0, the next group through expert 1, ...

  `weights` are the expert stack's arrays in `EXPERT_PARAMS_BY_TYPE[expert_type]`
  order: mlp (w_in_ExDxF, b_in_ExF, w_out_ExFxD, b_out_ExD), gated
  (w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD). Returns y_sorted_AxD; rows past
  `sum(group_sizes_E)` are 0. `activation` is a name from
  `tmoe_jax.feedforward.ACTIVATIONS` or a callable (hashable, for jit).
  """
  weights = check_expert_weights(weights, expert_type)
  method = resolve_method(method)
  activation = _activation_fn(activation)
  group_sizes_E = group_sizes_E.astype(jnp.int32)
  if method == "ragged_dot":
    return ragged_dot_experts(x_sorted_AxD, group_sizes_E, weights, expert_type, activation)
  _check_block(block_size, granule)
  return block_loop_grouped(
    x_sorted_AxD, group_sizes_E, weights, expert_type, activation, block_size, granule
  )


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
  """`grouped_experts` with MLP experts, the weights as separate arguments."""
  return grouped_experts(
    x_sorted_AxD,
    group_sizes_E,
    (w_in_ExDxF, b_in_ExF, w_out_ExFxD, b_out_ExD),
    activation,
    expert_type="mlp",
    method=method,
    block_size=block_size,
    granule=granule,
  )


def dropless_moe(
  x_TxD: jax.Array,
  expert_indices_TxK: jax.Array,
  gates_TxK: jax.Array,
  weights: Sequence[jax.Array],
  activation: str | Activation = "relu",
  *,
  expert_type: str = "mlp",
  token_mask_T: jax.Array | None = None,
  method: str = "auto",
  block_size: int = DEFAULT_BLOCK_SIZE,
  granule: int = DEFAULT_GRANULE,
) -> jax.Array:
  """y[t] = sum_k gates[t, k] * expert_{e[t, k]}(x[t]) for every token and choice: [T, D] -> [T, D].

  `weights` as in `grouped_experts`. Masked tokens (token_mask_T False) are not
  computed and give 0. The output has the experts' compute dtype (x and weights
  promoted), like `combine_outputs`.
  """
  weights = check_expert_weights(weights, expert_type)
  method = resolve_method(method)
  activation = _activation_fn(activation)
  num_experts = weights[0].shape[0]
  sorted_ = sort_by_expert(expert_indices_TxK, num_experts, token_mask_T)
  weights_TxK = gates_TxK
  if token_mask_T is not None:
    weights_TxK = jnp.where(token_mask_T[:, None], weights_TxK, 0)
  if method == "ragged_dot":
    x_sorted_AxD = jnp.take(x_TxD, sorted_.token_A, axis=0)
    y_sorted_AxD = ragged_dot_experts(x_sorted_AxD, sorted_.group_sizes_E, weights, expert_type, activation)
    return combine_sorted_outputs(y_sorted_AxD, sorted_.rank_TxK, weights_TxK)
  _check_block(block_size, granule)
  return block_loop_moe(x_TxD, weights_TxK, weights, sorted_, expert_type, activation, block_size, granule)
