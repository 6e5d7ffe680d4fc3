"""Dense softmax gating: every expert runs on every token, outputs weighted by softmax.

The original notebook's model, kept as the reference the sparse layers are
tested against and for tiny expert counts. Shapes: T tokens, E experts, K experts chosen per token, C capacity (tokens
per expert), D model width. Router math is float32 whatever the model computes
in: a softmax over bfloat16 logits makes near-ties between experts arbitrary.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def dense_softmax_gates(router_logits_TxE: jax.Array) -> jax.Array:
  """float32 [T, E]: the softmax weight of every expert for every token."""
  return jax.nn.softmax(router_logits_TxE.astype(jnp.float32), axis=-1)


def dense_softmax_moe(
  x_TxD: jax.Array,
  router_logits_TxE: jax.Array,
  expert_fn: Callable[[jax.Array], jax.Array],
) -> jax.Array:
  """Runs every expert on every token and mixes the outputs by the softmax.

  The dense reference layer: no selection, no capacity, nothing dropped, and
  E times the expert compute of top-1 routing.

  Args:
    x_TxD: [T, D] tokens.
    router_logits_TxE: [T, E].
    expert_fn: [E, T, D] -> [E, T, D], expert e applied to slice e (e.g. an
      `MlpExperts` module, whose [E, C, D] input here has C = T).

  Returns:
    [T, D] in the experts' output dtype: sum_e softmax_e * expert_e(x).
  """
  num_tokens, d_model = x_TxD.shape
  num_experts = router_logits_TxE.shape[-1]
  x_ExTxD = jnp.broadcast_to(x_TxD[None], (num_experts, num_tokens, d_model))
  y_ExTxD = expert_fn(x_ExTxD)
  gates_TxE = dense_softmax_gates(router_logits_TxE)
  return jnp.einsum("etd,te->td", y_ExTxD, gates_TxE.astype(y_ExTxD.dtype))
