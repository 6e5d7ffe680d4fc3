"""Auxiliary router losses and routing statistics (pure functions).

Shapes: T tokens, E experts, K experts chosen per token. An optional boolean
`token_mask_T` excludes padding tokens from every statistic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _token_weights(num_tokens: int, token_mask_T: jax.Array | None) -> jax.Array:
  if token_mask_T is None:
    return jnp.ones((num_tokens,), jnp.float32)
  return token_mask_T.astype(jnp.float32)


def expert_assignment_fraction(
  expert_indices_TxK: jax.Array, num_experts: int, token_mask_T: jax.Array | None = None
) -> jax.Array:
  """f_e, float32 [E]: the fraction of all routing assignments (over the k choices) that go to e."""
  num_tokens, top_k = expert_indices_TxK.shape
  weights_T = _token_weights(num_tokens, token_mask_T)
  counts_E = jnp.einsum(
    "tke,t->e", jax.nn.one_hot(expert_indices_TxK, num_experts, dtype=jnp.float32), weights_T
  )
  return counts_E / jnp.maximum(jnp.sum(weights_T) * top_k, 1.0)


def mean_router_probability(router_probs_TxE: jax.Array, token_mask_T: jax.Array | None = None) -> jax.Array:
  """P_e, float32 [E]: the mean full-softmax probability the router gives expert e."""
  weights_T = _token_weights(router_probs_TxE.shape[0], token_mask_T)
  total_E = jnp.einsum("te,t->e", router_probs_TxE.astype(jnp.float32), weights_T)
  return total_E / jnp.maximum(jnp.sum(weights_T), 1.0)


def load_balancing_loss(
  router_probs: jax.Array, expert_indices: jax.Array, token_mask: jax.Array | None = None
) -> jax.Array:
  """Switch Transformer loss E * sum_e f_e * P_e; 1.0 at perfect balance.

  Args:
    router_probs: float [T, E], the full softmax (not the renormalised top-k
      gates: those are constant in the unchosen experts and bias the gradient).
    expert_indices: int [T, K], the experts each token was routed to.
    token_mask: optional bool [T]; False tokens (padding) are ignored.
  """
  num_experts = router_probs.shape[-1]
  fraction_E = expert_assignment_fraction(expert_indices, num_experts, token_mask)
  probability_E = mean_router_probability(router_probs, token_mask)
  return num_experts * jnp.sum(fraction_E * probability_E)


def router_z_per_token(router_logits_TxE: jax.Array) -> jax.Array:
  """float32 [T]: logsumexp(logits)^2, each token's term of the ST-MoE z-loss."""
  return jax.nn.logsumexp(router_logits_TxE.astype(jnp.float32), axis=-1) ** 2


def router_entropy_per_token(router_probs_TxE: jax.Array) -> jax.Array:
  """float32 [T]: the entropy (nats) of each token's router distribution; the clamp keeps 0 log 0 at 0."""
  probs_TxE = router_probs_TxE.astype(jnp.float32)
  return -jnp.sum(probs_TxE * jnp.log(jnp.maximum(probs_TxE, 1e-9)), axis=-1)


def router_z_loss(router_logits: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
  """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2, keeping logits small.

  Args:
    router_logits: float [T, E].
    token_mask: optional bool [T]; False tokens (padding) are ignored.
  """
  return masked_mean(router_z_per_token(router_logits), token_mask)


def router_entropy(router_probs_TxE: jax.Array, token_mask_T: jax.Array | None = None) -> jax.Array:
  """Mean entropy (nats) of the router distribution: log(E) is uniform, 0 is one-hot."""
  return masked_mean(router_entropy_per_token(router_probs_TxE), token_mask_T)


def masked_mean(values_T: jax.Array, token_mask_T: jax.Array | None = None) -> jax.Array:
  """Mean of `values_T` over the tokens where `token_mask_T` is True (all if None)."""
  weights_T = _token_weights(values_T.shape[0], token_mask_T)
  return jnp.sum(weights_T * values_T.astype(jnp.float32)) / jnp.maximum(jnp.sum(weights_T), 1.0)
