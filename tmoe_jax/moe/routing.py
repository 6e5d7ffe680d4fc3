"""Routers: pure functions from router logits to a `RouteOutput`.

Shapes: T tokens, E experts, K experts chosen per token.
Router logits and probabilities are float32 whatever the model computes in: a
softmax over bfloat16 logits makes near-ties between experts arbitrary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


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


def top_k_route(router_logits_TxE: jax.Array, top_k: int, *, normalize_gates: bool = True) -> RouteOutput:
  """Token-choice routing (Switch for k=1, GShard/Mixtral for k=2).

  Softmax over all experts, then the k largest probabilities become the gates;
  with `normalize_gates` they are rescaled to sum to 1 per token (for k=1 that
  would make every gate 1 and cut the router off from the task gradient, so
  k=1 keeps the raw probability as Switch does).
  """
  num_experts = router_logits_TxE.shape[-1]
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
  router_logits_TxE = router_logits_TxE.astype(jnp.float32)
  router_probs_TxE = jax.nn.softmax(router_logits_TxE, axis=-1)
  gates_TxK, expert_indices_TxK = jax.lax.top_k(router_probs_TxE, top_k)
  if normalize_gates and top_k > 1:
    gates_TxK = gates_TxK / jnp.sum(gates_TxK, axis=-1, keepdims=True)
  return RouteOutput(
    expert_indices_TxK=expert_indices_TxK.astype(jnp.int32),
    gates_TxK=gates_TxK,
    router_probs_TxE=router_probs_TxE,
    router_logits_TxE=router_logits_TxE,
  )
