"""Dropless dispatch's permutation: the (token, choice) assignments sorted by expert, and back.

Shapes: T tokens, D model width, E experts, K choices per token, A = T*K assignments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax


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


def combine_sorted_outputs(y_sorted_AxD: jax.Array, rank_TxK: jax.Array, weights_TxK: jax.Array) -> jax.Array:
  """y[t] = sum_k weights[t, k] * y_sorted[rank[t, k]]: sorted rows back to tokens, [A, D] -> [T, D]."""
  # A sum over k (not an einsum) lets XLA fuse the row gathers instead of building [T, K, D].
  return sum(
    weights_TxK[:, k, None].astype(y_sorted_AxD.dtype)
    * jnp.take(y_sorted_AxD, rank_TxK[:, k], axis=0, mode="clip")
    for k in range(rank_TxK.shape[1])
  )
