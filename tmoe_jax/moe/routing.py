"""Token-choice routing: pure functions from router logits to a `RouteOutput`.

Shapes: T tokens, E experts, K experts chosen per token, C capacity (tokens
per expert), D model width. Router math is float32 whatever the model computes
in: a softmax over bfloat16 logits makes near-ties between experts arbitrary.

Contents:
  jitter_noise             the multiplicative router noise
  top_k_route              softmax before/after top-k, jitter, expert bias (Switch, GShard, Mixtral)
  update_expert_bias       DeepSeek-V3 auxiliary-loss-free balancing (outside the gradient)
  batch_prioritized_order  Riquelme et al. 2021 BPR: capacity goes to confident tokens
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

from tmoe_jax.moe.dispatch import DispatchSlots, assign_slots


@struct.dataclass
class RouteOutput:
  """Which experts each token goes to, and with what weight.

  expert_indices_TxK: int32, the chosen experts, best first.
  gates_TxK: float32, the weight of each chosen expert's output.
  router_probs_TxE: float32, the full softmax over experts (for the balancing loss).
  router_logits_TxE: float32, pre-softmax scores (for the z-loss).
  """

  expert_indices_TxK: jax.Array
  gates_TxK: jax.Array
  router_probs_TxE: jax.Array
  router_logits_TxE: jax.Array


def check_top_k(top_k: int, num_experts: int) -> None:
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")


def jitter_noise(key: jax.Array, shape: tuple[int, ...], eps: float) -> jax.Array:
  """Multiplicative router jitter: float32 uniform(1 - eps, 1 + eps) of `shape` (e.g. [T, E]).

  The numbers depend on the element count, not the shape: [B, L, E] and [B*L, E]
  draws with one key are the same values.
  """
  return jax.random.uniform(key, shape, jnp.float32, minval=1.0 - eps, maxval=1.0 + eps)


def top_k_route(
  router_logits_TxE: jax.Array,
  top_k: int,
  *,
  softmax_order: Literal["before", "after"] = "before",
  normalize_gates: bool = True,
  jitter_key: jax.Array | None = None,
  jitter_eps: float = 0.0,
  expert_bias_E: jax.Array | None = None,
) -> RouteOutput:
  """Token-choice top-k routing with the common variants as options.

  Args:
    router_logits_TxE: [T, E], any float dtype; cast to float32.
    top_k: K, static, in [1, E].
    softmax_order:
      "before" (Switch / GShard): softmax over all E experts, the K largest
        probabilities are the gates; with `normalize_gates` they are rescaled
        to sum to 1, except for K=1 where that would make every gate 1 and cut
        the router off from the task gradient (Switch keeps the raw probability).
      "after" (Mixtral): top-k of the logits, then a softmax over those K, so
        gates always sum to 1 and `normalize_gates` has no effect. Note that
        softmax over a subset of logits equals the full softmax renormalised
        over that subset, so for K > 1 this equals "before" with
        `normalize_gates`; the orders differ for K=1 (here the gate is always
        1, so the router learns nothing from the task) and when "before" is
        unnormalised.
    normalize_gates: see `softmax_order`.
    jitter_key: PRNG key for multiplicative jitter, training only; None (the
      default, use it at evaluation) turns jitter off.
    jitter_eps: the logits are multiplied by uniform(1 - eps, 1 + eps) per
      (token, expert). Switch multiplies the router *input* instead; scaling
      the logits serves the same purpose (exploration among near-ties) without
      touching the router matmul. The jittered logits feed everything
      downstream: selection, gates, `router_probs_TxE` and `router_logits_TxE`.
    expert_bias_E: float [E], DeepSeek-V3 auxiliary-loss-free balancing. It is
      added to the full-softmax probabilities for *selection only* (in both
      orders, so one bias state serves either and its units are those of
      DeepSeek-V3's affinities); gates come from the unbiased scores, and no
      gradient flows into the bias (see `update_expert_bias`).

  Returns:
    RouteOutput with expert_indices_TxK int32 ordered by selection score, best
    first (with a bias, gates need not be descending); gates_TxK float32;
    router_probs_TxE the full unbiased softmax (for the balancing loss);
    router_logits_TxE the float32 (jittered) logits (for the z-loss).
  """
  num_experts = router_logits_TxE.shape[-1]
  check_top_k(top_k, num_experts)
  if softmax_order not in ("before", "after"):
    raise ValueError(f"softmax_order must be 'before' or 'after', got {softmax_order!r}")
  if not 0.0 <= jitter_eps < 1.0:
    raise ValueError(f"jitter_eps must be in [0, 1), got {jitter_eps}")

  router_logits_TxE = router_logits_TxE.astype(jnp.float32)
  if jitter_key is not None and jitter_eps > 0.0:
    router_logits_TxE = router_logits_TxE * jitter_noise(jitter_key, router_logits_TxE.shape, jitter_eps)
  router_probs_TxE = jax.nn.softmax(router_logits_TxE, axis=-1)

  if expert_bias_E is None:
    # Softmax is monotone, so top-k of the probabilities is top-k of the logits.
    _, expert_indices_TxK = jax.lax.top_k(router_probs_TxE, top_k)
  else:
    bias_E = jax.lax.stop_gradient(expert_bias_E.astype(jnp.float32))
    _, expert_indices_TxK = jax.lax.top_k(router_probs_TxE + bias_E, top_k)

  if softmax_order == "before":
    gates_TxK = jnp.take_along_axis(router_probs_TxE, expert_indices_TxK, axis=-1)
    if normalize_gates and top_k > 1:
      gates_TxK = gates_TxK / jnp.sum(gates_TxK, axis=-1, keepdims=True)
  else:
    chosen_logits_TxK = jnp.take_along_axis(router_logits_TxE, expert_indices_TxK, axis=-1)
    gates_TxK = jax.nn.softmax(chosen_logits_TxK, axis=-1)

  return RouteOutput(
    expert_indices_TxK=expert_indices_TxK.astype(jnp.int32),
    gates_TxK=gates_TxK,
    router_probs_TxE=router_probs_TxE,
    router_logits_TxE=router_logits_TxE,
  )


def update_expert_bias(expert_bias_E: jax.Array, expert_load_E: jax.Array, *, rate: float) -> jax.Array:
  """DeepSeek-V3 bias update: bias_e += rate * sign(mean_load - load_e).

  Overloaded experts are pushed down, idle ones up, by a fixed step: the sign
  makes the step independent of the batch size and of whether `expert_load_E`
  holds counts or fractions (e.g. `losses.expert_assignment_fraction`).

  The bias is not a parameter: the caller stores it as non-trainable state
  (e.g. an `nnx.Variable` subclass kept out of the optimizer), calls this after
  each training step on that step's load, and never differentiates through it.

  Args:
    expert_bias_E: float [E], the current bias.
    expert_load_E: [E], tokens (or share of assignments) each expert received.
    rate: the step size (DeepSeek-V3 uses 1e-3 on sigmoid affinities).

  Returns:
    float32 [E], the new bias.
  """
  load_E = jax.lax.stop_gradient(expert_load_E.astype(jnp.float32))
  bias_E = jax.lax.stop_gradient(expert_bias_E.astype(jnp.float32))
  return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)


def batch_prioritized_order(router_probs_TxE: jax.Array, expert_indices_TxK: jax.Array) -> jax.Array:
  """int32 [T]: tokens sorted by the probability of their first choice, descending.

  Riquelme et al. 2021 (V-MoE): when capacity is tight, filling slots in this
  order instead of token order drops the least confident tokens rather than
  the last ones in the sequence. Ties keep token order (stable sort).

  To use it with `dispatch.assign_slots`: permute the tokens, assign, then
  scatter the slots back to the original order (`assign_slots_prioritized`
  does exactly this):

    perm_T = batch_prioritized_order(probs_TxE, indices_TxK)
    slots = assign_slots(indices_TxK[perm_T], E, C, mask_T[perm_T])
    slot_TxK = jnp.zeros_like(slots.slot_TxK).at[perm_T].set(slots.slot_TxK)

  The first choice's probability (not the max) is the priority so that a
  selection bias (`expert_bias_E`) is respected.
  """
  priority_T = jnp.take_along_axis(router_probs_TxE.astype(jnp.float32), expert_indices_TxK[:, :1], axis=-1)[
    :, 0
  ]
  return jnp.argsort(priority_T, descending=True, stable=True).astype(jnp.int32)


def assign_slots_prioritized(
  expert_indices_TxK: jax.Array,
  router_probs_TxE: jax.Array,
  num_experts: int,
  capacity: int,
  token_mask_T: jax.Array | None = None,
) -> DispatchSlots:
  """`assign_slots` with BPR priority, returned in the original token order.

  Still choice-major (every first choice outranks any second choice); within
  each choice rank k, tokens with a higher first-choice probability claim
  slots first. The result drops into `dispatch_tokens` / `combine_outputs`.
  """
  perm_T = batch_prioritized_order(router_probs_TxE, expert_indices_TxK)
  mask_perm_T = None if token_mask_T is None else token_mask_T[perm_T]
  slots = assign_slots(expert_indices_TxK[perm_T], num_experts, capacity, mask_perm_T)
  unpermute = lambda a_TxK: jnp.zeros_like(a_TxK).at[perm_T].set(a_TxK, unique_indices=True)
  return DispatchSlots(slot_TxK=unpermute(slots.slot_TxK), kept_TxK=unpermute(slots.kept_TxK))
