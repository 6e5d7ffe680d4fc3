"""Guided routing (the original MNIST "guided" variant): a label decides the owner expert.

In training the router is pushed toward the owner (a gate loss) and tokens may
be routed by label (teacher forcing); at evaluation the learned router decides.
Shapes: T tokens, E experts, K experts chosen per token, C capacity (tokens
per expert), D model width. Router math is float32 whatever the model computes
in: a softmax over bfloat16 logits makes near-ties between experts arbitrary.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from tmoe_jax.moe.losses import masked_mean
from tmoe_jax.moe.routing import RouteOutput, check_top_k


def label_to_expert(labels_T: jax.Array, num_experts: int, labels_per_expert: int = 2) -> jax.Array:
  """int32 [T]: the owner expert of each label, expert i owning labels
  {i * labels_per_expert, ..., (i + 1) * labels_per_expert - 1}
  (the default gives MNIST digits {2i, 2i+1} to expert i, 5 experts).

  Raises ValueError if a label is negative or maps past `num_experts`. The
  check needs concrete values: under jit it is skipped, so validate the label
  range where the data is loaded.
  """
  if labels_per_expert < 1:
    raise ValueError(f"labels_per_expert must be >= 1, got {labels_per_expert}")
  try:
    labels_np = np.asarray(labels_T)
  except jax.errors.TracerArrayConversionError:
    labels_np = None
  if (
    labels_np is not None
    and labels_np.size
    and (labels_np.min() < 0 or labels_np.max() // labels_per_expert >= num_experts)
  ):
    raise ValueError(
      f"labels must be in [0, {num_experts * labels_per_expert}) for {num_experts} experts "
      f"with {labels_per_expert} labels each, got [{labels_np.min()}, {labels_np.max()}]"
    )
  return (jnp.asarray(labels_T) // labels_per_expert).astype(jnp.int32)


def guided_gate_loss(
  router_logits_TxE: jax.Array,
  owner_expert_T: jax.Array,
  kind: Literal["cross_entropy", "binary_cross_entropy"] = "cross_entropy",
  token_mask_T: jax.Array | None = None,
) -> jax.Array:
  """Scalar loss pulling the router toward each token's owner expert.

  kind:
    "cross_entropy": mean over tokens of -log softmax(logits)[owner].
    "binary_cross_entropy": BCE of the *softmax* gate (not a sigmoid per
      expert) against the one-hot owner, averaged over all T*E entries, as
      `torch.nn.BCELoss()(softmax_gate, one_hot)` computes it, logs clamped at
      -100 as PyTorch does. Compared with cross-entropy it also pushes every
      non-owner probability toward 0 on its own, and is E times smaller in scale.
  Both are computed from log-probabilities, not by taking logs of rounded
  probabilities, so confident routers give finite losses and gradients.

  Args:
    router_logits_TxE: [T, E], cast to float32.
    owner_expert_T: int [T], e.g. from `label_to_expert`.
    token_mask_T: optional bool [T]; False tokens (padding) are ignored.
  """
  router_logits_TxE = router_logits_TxE.astype(jnp.float32)
  num_experts = router_logits_TxE.shape[-1]
  log_probs_TxE = jax.nn.log_softmax(router_logits_TxE, axis=-1)
  target_TxE = jax.nn.one_hot(owner_expert_T, num_experts, dtype=jnp.float32)
  if kind == "cross_entropy":
    return masked_mean(-jnp.sum(target_TxE * log_probs_TxE, axis=-1), token_mask_T)
  if kind == "binary_cross_entropy":
    if num_experts == 1:
      # The one expert is every token's owner; the (1 - target) term is zero.
      log_rest_TxE = jnp.zeros_like(log_probs_TxE)
    else:
      # log(1 - p_e) = logsumexp of the other logits - logsumexp of all: exact near p_e = 1.
      others_TxExE = jnp.where(
        jnp.eye(num_experts, dtype=bool)[None], -jnp.inf, router_logits_TxE[:, None, :]
      )
      log_z_Tx1 = jax.nn.logsumexp(router_logits_TxE, axis=-1, keepdims=True)
      log_rest_TxE = jax.nn.logsumexp(others_TxExE, axis=-1) - log_z_Tx1
    bce_TxE = -(
      target_TxE * jnp.maximum(log_probs_TxE, -100.0) + (1.0 - target_TxE) * jnp.maximum(log_rest_TxE, -100.0)
    )
    return masked_mean(jnp.mean(bce_TxE, axis=-1), token_mask_T)
  raise ValueError(f"kind must be 'cross_entropy' or 'binary_cross_entropy', got {kind!r}")


def guided_route(
  owner_expert_T: jax.Array,
  router_probs_TxE: jax.Array,
  top_k: int,
  *,
  router_logits_TxE: jax.Array | None = None,
) -> RouteOutput:
  """Teacher-forced token choice: the owner expert is always the first choice.

  K=1: every token goes to its owner with gate 1 (the router then learns only
  from `guided_gate_loss`, not from the task). K>1: the owner first, then the
  router's K-1 most probable other experts; gates are the router
  probabilities of those K experts renormalised to sum to 1, so the task
  gradient still reaches the router. Being first choice also gives the owner
  dispatch priority (`assign_slots` is choice-major).

  Args:
    owner_expert_T: int [T], e.g. from `label_to_expert`.
    router_probs_TxE: float [T, E], the router softmax.
    top_k: K, static, in [1, E].
    router_logits_TxE: optional [T, E], stored in the output for the z-loss;
      without it the log-probabilities are stored, whose z-loss is 0.
  """
  num_experts = router_probs_TxE.shape[-1]
  check_top_k(top_k, num_experts)
  router_probs_TxE = router_probs_TxE.astype(jnp.float32)
  owner_TxK = owner_expert_T.astype(jnp.int32)[:, None]
  if top_k == 1:
    expert_indices_TxK = owner_TxK
    gates_TxK = jnp.ones(owner_TxK.shape, jnp.float32)
  else:
    is_owner_TxE = jax.nn.one_hot(owner_expert_T, num_experts, dtype=bool)
    _, rest_TxK = jax.lax.top_k(jnp.where(is_owner_TxE, -jnp.inf, router_probs_TxE), top_k - 1)
    expert_indices_TxK = jnp.concatenate([owner_TxK, rest_TxK.astype(jnp.int32)], axis=-1)
    gates_TxK = jnp.take_along_axis(router_probs_TxE, expert_indices_TxK, axis=-1)
    gates_TxK = gates_TxK / jnp.maximum(jnp.sum(gates_TxK, axis=-1, keepdims=True), 1e-9)
  if router_logits_TxE is None:
    router_logits_TxE = jnp.log(jnp.maximum(router_probs_TxE, 1e-30))
  return RouteOutput(
    expert_indices_TxK=expert_indices_TxK,
    gates_TxK=gates_TxK,
    router_probs_TxE=router_probs_TxE,
    router_logits_TxE=router_logits_TxE.astype(jnp.float32),
  )


def routing_agreement(
  expert_indices_TxK: jax.Array, owner_expert_T: jax.Array, token_mask_T: jax.Array | None = None
) -> jax.Array:
  """Scalar: the fraction of (unmasked) tokens whose first choice is their owner expert."""
  agree_T = (expert_indices_TxK[:, 0] == owner_expert_T).astype(jnp.float32)
  return masked_mean(agree_T, token_mask_T)
