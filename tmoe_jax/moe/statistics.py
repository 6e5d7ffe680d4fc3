"""Routing statistics: the sums one forward pass accumulates, and the `MoEAux` they finalize into.

Shapes: T tokens, E experts, K experts chosen per token.

Every statistic is a ratio of sums over tokens. A layer computes `RoutingSums`
on whatever tokens it holds (one routing group, one device's groups), adds or
`psum`s them, and only then calls `finalize`. Taking the ratios before the
reduction would give different numbers per mesh, and for the Switch balancing
loss a wrong one: E * mean_s sum_e f_e^s P_e^s penalises a batch whose shards
are each skewed toward a different expert even when the whole batch is
balanced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from tmoe_jax.moe import losses


@struct.dataclass
class MoEAux:
  """What one MoE layer reports besides its output.

  load_balancing_loss, router_z_loss: scalars to add (weighted) to the task loss.
  expert_fraction_E: share of routing assignments per expert (before dropping).
  dropped_fraction: share of assignments that found their expert full.
  router_entropy: mean entropy of the router softmax, in nats.
  router_probability_E: mean full-softmax probability per expert, P_e of the balancing loss
    `E * sum_e f_e P_e` (zeros for a layer without a balancing loss), and
  num_tokens: how many real tokens were routed: with `expert_fraction_E` they let gradient
    accumulation rebuild the losses of a whole batch from its microbatches
    (`training.grad_accumulation`).
  """

  load_balancing_loss: jax.Array
  router_z_loss: jax.Array
  expert_fraction_E: jax.Array
  dropped_fraction: jax.Array
  router_entropy: jax.Array
  router_probability_E: jax.Array
  num_tokens: jax.Array


@struct.dataclass
class RoutingSums:
  """Float32 sums over the routed (unmasked) tokens a layer saw; `finalize` turns them into `MoEAux`.

  tokens: how many real tokens.
  assignments_E: [E] (token, choice) assignments per expert, kept or not.
  router_probs_E: [E] the full router softmax summed over tokens.
  z_squared: sum over tokens of logsumexp(router logits)^2 (ST-MoE z-loss).
  entropy: sum over tokens of the router softmax's entropy, nats.
  dropped: assignments that found their expert full.
  """

  tokens: jax.Array
  assignments_E: jax.Array
  router_probs_E: jax.Array
  z_squared: jax.Array
  entropy: jax.Array
  dropped: jax.Array

  def __add__(self, other: RoutingSums) -> RoutingSums:
    return jax.tree.map(jnp.add, self, other)


def routing_sums(
  router_logits_TxE: jax.Array,
  router_probs_TxE: jax.Array,
  expert_indices_TxK: jax.Array,
  kept_TxK: jax.Array | None,
  token_mask_T: jax.Array | None,
) -> RoutingSums:
  """Sums for the T tokens given; `kept_TxK` None means nothing was dropped (dropless)."""
  num_tokens, top_k = expert_indices_TxK.shape
  num_experts = router_probs_TxE.shape[-1]
  real_T = jnp.ones((num_tokens,), bool) if token_mask_T is None else token_mask_T.astype(bool)
  weight_T = real_T.astype(jnp.float32)
  probs_TxE = router_probs_TxE.astype(jnp.float32)
  if kept_TxK is None:
    dropped = jnp.zeros((), jnp.float32)
  else:
    dropped = jnp.sum(real_T[:, None] & ~kept_TxK).astype(jnp.float32)
  onehot_TxKxE = jax.nn.one_hot(expert_indices_TxK, num_experts, dtype=jnp.float32)
  return RoutingSums(
    tokens=jnp.sum(weight_T),
    assignments_E=jnp.einsum("tke,t->e", onehot_TxKxE, weight_T),
    router_probs_E=jnp.einsum("te,t->e", probs_TxE, weight_T),
    z_squared=jnp.sum(weight_T * losses.router_z_per_token(router_logits_TxE)),
    entropy=jnp.sum(weight_T * losses.router_entropy_per_token(probs_TxE)),
    dropped=dropped,
  )


def finalize(sums: RoutingSums, top_k: int) -> MoEAux:
  """Ratios of the (already reduced) sums: Switch loss E * sum_e f_e P_e, z-loss, f_e, drops, entropy."""
  num_experts = sums.assignments_E.shape[-1]
  tokens = jnp.maximum(sums.tokens, 1.0)
  assignments = jnp.maximum(sums.tokens * top_k, 1.0)
  fraction_E = sums.assignments_E / assignments
  probability_E = sums.router_probs_E / tokens
  return MoEAux(
    load_balancing_loss=num_experts * jnp.sum(fraction_E * probability_E),
    router_z_loss=sums.z_squared / tokens,
    expert_fraction_E=fraction_E,
    dropped_fraction=sums.dropped / assignments,
    router_entropy=sums.entropy / tokens,
    router_probability_E=probability_E,
    num_tokens=sums.tokens,
  )


def undropped_routing_aux(
  router_logits_TxE: jax.Array,
  router_probs_TxE: jax.Array,
  expert_indices_TxK: jax.Array,
  token_mask_T: jax.Array | None = None,
) -> MoEAux:
  """`MoEAux` of a layer with no capacity (nothing dropped) that routes all its tokens at once."""
  sums = routing_sums(router_logits_TxE, router_probs_TxE, expert_indices_TxK, None, token_mask_T)
  return finalize(sums, expert_indices_TxK.shape[-1])
