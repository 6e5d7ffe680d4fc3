"""Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens.

Balanced by construction (every expert gets exactly C tokens); a token may be
picked by zero or several experts. Not causal: a token's routing depends on the
other tokens of the batch, so it is not for token-by-token decoding.
Shapes: T tokens, E experts, K experts chosen per token, C capacity (tokens
per expert), D model width. Router math is float32 whatever the model computes
in: a softmax over bfloat16 logits makes near-ties between experts arbitrary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class ExpertChoiceRoute:
  """Which tokens each expert picked (Zhou et al. 2022).

  token_indices_ExC: int32, the tokens expert e picked, best score first.
  gates_ExC: float32, the picked token's softmax probability for e; 0 where
    the pick is not kept.
  kept_ExC: bool, the pick is a real token (False only when C exceeds the
    number of unmasked tokens and the expert had to fill slots with padding).
  router_probs_TxE: float32, softmax over experts per token.
  router_logits_TxE: float32, pre-softmax scores (for the z-loss).
  """

  token_indices_ExC: jax.Array
  gates_ExC: jax.Array
  kept_ExC: jax.Array
  router_probs_TxE: jax.Array
  router_logits_TxE: jax.Array


def expert_choice_route(
  router_logits_TxE: jax.Array, capacity: int, token_mask_T: jax.Array | None = None
) -> ExpertChoiceRoute:
  """Each expert picks its top-C tokens by softmax score.

  Every expert gets exactly C tokens, so load is balanced by construction and
  no balancing loss is needed; a token may be picked by 0 to E experts.
  Choices depend on the other tokens in the batch, so expert choice is not
  causal: do not use it for token-by-token decoding.

  Args:
    router_logits_TxE: [T, E], any float dtype; cast to float32.
    capacity: C, static, in [1, T]; the paper uses C = T * capacity_factor / E.
    token_mask_T: optional bool [T]; False tokens (padding) are never picked
      while real tokens remain (their score is -inf).
  """
  num_tokens = router_logits_TxE.shape[0]
  if not 1 <= capacity <= num_tokens:
    raise ValueError(f"capacity must be in [1, num_tokens={num_tokens}], got {capacity}")
  router_logits_TxE = router_logits_TxE.astype(jnp.float32)
  # Softmax over experts (not tokens): the score says how much a token wants e.
  router_probs_TxE = jax.nn.softmax(router_logits_TxE, axis=-1)
  scores_ExT = router_probs_TxE.T
  if token_mask_T is not None:
    scores_ExT = jnp.where(token_mask_T[None, :], scores_ExT, -jnp.inf)
  top_scores_ExC, token_indices_ExC = jax.lax.top_k(scores_ExT, capacity)
  kept_ExC = jnp.isfinite(top_scores_ExC)
  # Gather from the probabilities rather than reuse top_k's values so the
  # gradient path is the plain softmax, and padding picks get exactly 0.
  gates_ExC = jnp.take_along_axis(router_probs_TxE.T, token_indices_ExC, axis=-1)
  gates_ExC = jnp.where(kept_ExC, gates_ExC, 0.0)
  return ExpertChoiceRoute(
    token_indices_ExC=token_indices_ExC.astype(jnp.int32),
    gates_ExC=gates_ExC,
    kept_ExC=kept_ExC,
    router_probs_TxE=router_probs_TxE,
    router_logits_TxE=router_logits_TxE,
  )


def expert_choice_dispatch(x_TxD: jax.Array, route: ExpertChoiceRoute) -> jax.Array:
  """Gathers each expert's picked tokens: [T, D] -> [E, C, D]; non-kept picks are 0."""
  x_ExCxD = jnp.take(x_TxD, route.token_indices_ExC, axis=0)
  return jnp.where(route.kept_ExC[..., None], x_ExCxD, 0)


def expert_choice_combine(y_ExCxD: jax.Array, route: ExpertChoiceRoute, num_tokens: int) -> jax.Array:
  """Scatter-adds gate * expert output back to tokens: [E, C, D] -> [T, D].

  A token picked by no expert gets 0 (only its residual survives); one picked
  by several gets the gate-weighted sum.
  """
  num_experts, capacity, d_model = y_ExCxD.shape
  weighted_ExCxD = y_ExCxD.astype(jnp.float32) * route.gates_ExC[..., None]
  # Accumulate in float32: up to E contributions land on one token.
  y_TxD = (
    jnp.zeros((num_tokens, d_model), jnp.float32)
    .at[route.token_indices_ExC.reshape(-1)]
    .add(weighted_ExCxD.reshape(num_experts * capacity, d_model))
  )
  return y_TxD.astype(y_ExCxD.dtype)
