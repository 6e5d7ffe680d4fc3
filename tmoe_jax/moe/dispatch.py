"""Fixed-capacity dispatch: permute tokens into per-expert buffers and back.

Shapes: T tokens, D model width, E experts, K choices per token, C capacity
(slots per expert). The buffers are [E, C, D] so every expert runs as one
batched matmul with static shapes, as XLA needs.

Tokens claim slots in priority order: all first choices (k=0) in token order,
then all second choices, and so on (GShard). An assignment that finds its
expert full is dropped: it contributes nothing and the token keeps only its
residual. Dropping is deterministic given the routing.

Scatter/gather by slot index costs O(T*K*D); the one-hot einsum formulation
(GShard) costs O(T*E*C*D) and is kept only as a test reference.
"""

from __future__ import annotations

import fractions
import math

import jax
import jax.numpy as jnp
from flax import struct


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  """C = ceil(capacity_factor * tokens * top_k / num_experts), clipped to [1, tokens].

  Counts all k assignments (the GShard/MaxText convention); an expert never gets
  the same token twice, hence the clip. `num_tokens` is one routing group's.
  Exact rational arithmetic: in floating point 1.1 * 90 / 3 rounds up to 34 slots, not 33.
  """
  capacity = math.ceil(fractions.Fraction(repr(capacity_factor)) * num_tokens * top_k / num_experts)
  return max(1, min(capacity, num_tokens))


@struct.dataclass
class DispatchSlots:
  """Where each (token, choice) assignment landed.

  slot_TxK: int32 flat slot `expert * C + position` in the [E*C] buffer; E*C
    (one past the end) for a dropped or masked assignment.
  kept_TxK: bool, the assignment got a slot.
  """

  slot_TxK: jax.Array
  kept_TxK: jax.Array


def assign_slots(
  expert_indices_TxK: jax.Array,
  num_experts: int,
  capacity: int,
  token_mask_T: jax.Array | None = None,
) -> DispatchSlots:
  """Gives each assignment a position inside its expert's buffer, or drops it."""
  num_tokens, top_k = expert_indices_TxK.shape
  # Choice-major order so every token's first choice outranks any second choice.
  onehot_KxTxE = jax.nn.one_hot(expert_indices_TxK.T, num_experts, dtype=jnp.int32)
  if token_mask_T is not None:
    onehot_KxTxE = onehot_KxTxE * token_mask_T.astype(jnp.int32)[None, :, None]
  onehot_AxE = onehot_KxTxE.reshape(top_k * num_tokens, num_experts)
  position_AxE = jnp.cumsum(onehot_AxE, axis=0) - 1
  position_A = jnp.sum(position_AxE * onehot_AxE, axis=-1)
  routed_A = jnp.sum(onehot_AxE, axis=-1) > 0
  kept_A = routed_A & (position_A < capacity)
  expert_A = expert_indices_TxK.T.reshape(-1)
  slot_A = jnp.where(kept_A, expert_A * capacity + position_A, num_experts * capacity)
  to_TxK = lambda a: a.reshape(top_k, num_tokens).T
  return DispatchSlots(slot_TxK=to_TxK(slot_A).astype(jnp.int32), kept_TxK=to_TxK(kept_A))


def dispatch_tokens(x_TxD: jax.Array, slots: DispatchSlots, num_experts: int, capacity: int) -> jax.Array:
  """Copies each kept assignment's token into its slot: [T, D] -> [E, C, D], empty slots 0."""
  num_tokens, d_model = x_TxD.shape
  top_k = slots.slot_TxK.shape[1]
  x_AxD = jnp.broadcast_to(x_TxD[:, None, :], (num_tokens, top_k, d_model)).reshape(-1, d_model)
  buffer = jnp.zeros((num_experts * capacity, d_model), x_TxD.dtype)
  # Kept slots are unique, and mode="drop" discards the one-past-the-end index.
  buffer = buffer.at[slots.slot_TxK.reshape(-1)].set(x_AxD, mode="drop", unique_indices=True)
  return buffer.reshape(num_experts, capacity, d_model)


def combine_outputs(y_ExCxD: jax.Array, slots: DispatchSlots, gates_TxK: jax.Array) -> jax.Array:
  """Gate-weighted sum of each token's expert outputs: [E, C, D] -> [T, D]; dropped give 0."""
  num_experts, capacity, d_model = y_ExCxD.shape
  y_flat = y_ExCxD.reshape(num_experts * capacity, d_model)
  y_TxKxD = jnp.take(y_flat, slots.slot_TxK, axis=0, mode="fill", fill_value=0)
  weights_TxK = jnp.where(slots.kept_TxK, gates_TxK, 0.0).astype(y_ExCxD.dtype)
  return jnp.einsum("tkd,tk->td", y_TxKxD, weights_TxK)
