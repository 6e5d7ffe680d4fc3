"""The one token-choice MoE function, its routing groups and its routing sums, against slow references.

Shapes: B sequences of L tokens, G routing groups of S tokens, T = G*S, D model
width, F hidden width, E experts, K top-k, C capacity per (group, expert).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmoe_jax.moe import losses
from tmoe_jax.moe.dispatch import expert_capacity
from tmoe_jax.moe.routing import top_k_route
from tmoe_jax.moe.statistics import finalize, routing_sums
from tmoe_jax.moe.token_choice import local_experts, routing_groups, token_choice_moe

G, S, D, F, E, K = 4, 12, 6, 10, 4, 2


def _problem(seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 6)
  x_GxSxD = jax.random.normal(keys[0], (G, S, D))
  mask_GxS = jax.random.uniform(keys[1], (G, S)) > 0.15
  # A router skewed toward expert 0, so that capacity binds in every group.
  router_DxE = jax.random.normal(keys[2], (D, E)).at[:, 0].add(0.8)
  weights = (
    0.5 * jax.random.normal(keys[3], (E, D, F)),
    0.1 * jax.random.normal(keys[4], (E, F)),
    0.5 * jax.random.normal(keys[5], (E, F, D)),
    0.1 * jnp.arange(E * D, dtype=jnp.float32).reshape(E, D) / (E * D),
  )
  return x_GxSxD, mask_GxS, router_DxE, weights


def _slow_reference(x_GxSxD, mask_GxS, router_DxE, weights, capacity):
  """Per group, a Python loop over assignments, first choices first, each expert's slots counted by hand."""
  w_in, b_in, w_out, b_out = (np.asarray(w) for w in weights)
  expert = lambda e, x_D: np.maximum(x_D @ w_in[e] + b_in[e], 0.0) @ w_out[e] + b_out[e]
  y = np.zeros(x_GxSxD.shape, np.float32)
  dropped = 0
  for g in range(G):
    route = top_k_route(x_GxSxD[g] @ router_DxE, K)
    indices, gates = np.asarray(route.expert_indices_TxK), np.asarray(route.gates_TxK)
    used = [0] * E
    for k in range(K):
      for t in range(S):
        if not mask_GxS[g, t]:
          continue
        e = int(indices[t, k])
        if used[e] < capacity:
          used[e] += 1
          y[g, t] += gates[t, k] * expert(e, np.asarray(x_GxSxD[g, t]))
        else:
          dropped += 1
  return y, dropped


def _run(x_GxSxD, mask_GxS, router_DxE, weights, capacity, **settings):
  experts = local_experts(weights, expert_type="mlp", activation="relu", dtype=jnp.float32)
  return token_choice_moe(x_GxSxD, mask_GxS, router_DxE, experts, top_k=K, capacity=capacity, **settings)


def test_capacity_and_drop_order_are_decided_per_group_as_the_slow_reference():
  x_GxSxD, mask_GxS, router_DxE, weights = _problem()
  capacity = expert_capacity(S, E, K, 1.0)
  y, sums = jax.jit(lambda *a: _run(*a, capacity))(x_GxSxD, mask_GxS, router_DxE, weights)
  expected, dropped = _slow_reference(x_GxSxD, mask_GxS, router_DxE, weights, capacity)
  assert dropped > 0, "the test needs capacity to bind"
  chex.assert_shape(y, (G, S, D))
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(sums.dropped), dropped)
  np.testing.assert_allclose(float(sums.tokens), float(jnp.sum(mask_GxS)))


def test_each_group_is_independent_of_the_others():
  """Running the groups together or one by one gives the same outputs, and sums that add up."""
  x_GxSxD, mask_GxS, router_DxE, weights = _problem(1)
  capacity = expert_capacity(S, E, K, 1.25)
  y, sums = _run(x_GxSxD, mask_GxS, router_DxE, weights, capacity, batch_prioritized=True)
  alone = [
    _run(x_GxSxD[g : g + 1], mask_GxS[g : g + 1], router_DxE, weights, capacity, batch_prioritized=True)
    for g in range(G)
  ]
  np.testing.assert_allclose(y, jnp.concatenate([y_g for y_g, _ in alone]), rtol=1e-6, atol=1e-6)
  total = alone[0][1]
  for _, sums_g in alone[1:]:
    total = total + sums_g
  chex.assert_trees_all_close(total, sums, rtol=1e-5)


@pytest.mark.parametrize("capacity", [None, S], ids=["dropless", "ample"])
def test_dropless_and_ample_capacity_agree(capacity):
  x_GxSxD, mask_GxS, router_DxE, weights = _problem(2)
  y, sums = _run(x_GxSxD, mask_GxS, router_DxE, weights, capacity)
  expected, dropped = _slow_reference(x_GxSxD, mask_GxS, router_DxE, weights, S)
  assert dropped == 0 and float(sums.dropped) == 0.0
  np.testing.assert_allclose(jnp.where(mask_GxS[..., None], y, 0.0), expected, rtol=1e-5, atol=1e-5)


def test_finalized_sums_equal_the_loss_functions_on_the_whole_batch():
  keys = jax.random.split(jax.random.PRNGKey(3), 2)
  logits_TxE = 2.0 * jax.random.normal(keys[0], (40, E))
  mask_T = jax.random.uniform(keys[1], (40,)) > 0.3
  route = top_k_route(logits_TxE, K)
  kept_TxK = jnp.ones((40, K), bool).at[::3, 1].set(False)
  # Sums of two halves, added, then finalized: the statistics of the whole.
  halves = [slice(0, 17), slice(17, 40)]
  sums = [
    routing_sums(
      route.router_logits_TxE[h],
      route.router_probs_TxE[h],
      route.expert_indices_TxK[h],
      kept_TxK[h],
      mask_T[h],
    )
    for h in halves
  ]
  aux = finalize(sums[0] + sums[1], K)
  probs, indices = route.router_probs_TxE, route.expert_indices_TxK
  np.testing.assert_allclose(
    aux.load_balancing_loss, losses.load_balancing_loss(probs, indices, mask_T), rtol=1e-6
  )
  np.testing.assert_allclose(aux.router_z_loss, losses.router_z_loss(logits_TxE, mask_T), rtol=1e-6)
  np.testing.assert_allclose(aux.router_entropy, losses.router_entropy(probs, mask_T), rtol=1e-6)
  np.testing.assert_allclose(
    aux.expert_fraction_E, losses.expert_assignment_fraction(indices, E, mask_T), rtol=1e-6
  )
  routed_dropped = jnp.sum(mask_T[:, None] & ~kept_TxK)
  np.testing.assert_allclose(aux.dropped_fraction, routed_dropped / (jnp.sum(mask_T) * K), rtol=1e-6)


def test_routing_groups_are_whole_sequences_and_padding_is_masked():
  groups = routing_groups(batch=5, length=3, sequences_per_group=2)
  assert (groups.num_groups, groups.group_size, groups.padded_batch) == (3, 6, 6)
  x_BxLxD = jnp.arange(5 * 3 * 2, dtype=jnp.float32).reshape(5, 3, 2)
  mask_GxS = groups.group(jnp.ones((5, 3), bool), pad_value=False)
  chex.assert_trees_all_equal(mask_GxS[-1], jnp.array([True] * 3 + [False] * 3))
  grouped = groups.group(x_BxLxD)
  chex.assert_trees_all_equal(grouped[1, :3], x_BxLxD[2])  # group 1 starts with sequence 2
  chex.assert_trees_all_equal(groups.ungroup(grouped), x_BxLxD)
  # 0, or more sequences than the batch has: one group of the whole batch.
  assert routing_groups(5, 3, 0).num_groups == 1
  assert routing_groups(5, 3, 8).num_groups == 1 and routing_groups(5, 3, 8).group_size == 15
  with pytest.raises(ValueError, match="sequences_per_group"):
    routing_groups(5, 3, -1)


def test_jitter_multiplies_the_logits_before_routing():
  x_GxSxD, mask_GxS, router_DxE, weights = _problem(4)
  noise_GxSxE = jax.random.uniform(jax.random.PRNGKey(9), (G, S, E), minval=0.5, maxval=1.5)
  _, sums = _run(x_GxSxD, mask_GxS, router_DxE, weights, None, jitter_GxSxE=noise_GxSxE)
  logits_TxE = (x_GxSxD @ router_DxE * noise_GxSxE).reshape(G * S, E)
  mask_T = mask_GxS.reshape(-1)
  np.testing.assert_allclose(
    finalize(sums, K).router_z_loss, losses.router_z_loss(logits_TxE, mask_T), rtol=1e-5
  )


@pytest.mark.parametrize("masked", [False, True])
def test_undropped_routing_aux_matches_the_loss_formulas(masked):
  """Layers without capacity report `finalize(routing_sums(...))`: the Switch loss, z-loss, load and
  entropy of `moe.losses` computed directly over the same tokens."""
  from tmoe_jax.moe import losses
  from tmoe_jax.moe.routing import top_k_route
  from tmoe_jax.moe.statistics import undropped_routing_aux

  logits_TxE = jax.random.normal(jax.random.key(0), (37, 6)) * 2.0
  route = top_k_route(logits_TxE, 2)
  mask_T = (jnp.arange(37) % 5 != 0) if masked else None
  aux = undropped_routing_aux(
    route.router_logits_TxE, route.router_probs_TxE, route.expert_indices_TxK, mask_T
  )
  probs, indices = route.router_probs_TxE, route.expert_indices_TxK
  expected = {
    "load_balancing_loss": losses.load_balancing_loss(probs, indices, mask_T),
    "router_z_loss": losses.router_z_loss(route.router_logits_TxE, mask_T),
    "expert_fraction_E": losses.expert_assignment_fraction(indices, 6, mask_T),
    "router_entropy": losses.router_entropy(probs, mask_T),
  }
  for name, value in expected.items():
    np.testing.assert_allclose(getattr(aux, name), value, rtol=1e-6, err_msg=name)
  assert float(aux.dropped_fraction) == 0.0
