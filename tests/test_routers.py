"""Tests for the routers in `tmoe_jax.moe.routers`.

Shapes: T tokens, E experts, K top-k, C capacity, D model width.

References are independent of the library: per-token and per-expert Python
loops in float64 numpy (argsort for selection, `math` for softmaxes), a loop
over experts for the dense layer, and slot filling by hand for BPR.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

from tmoe_jax.moe.dense_gating import dense_softmax_gates, dense_softmax_moe
from tmoe_jax.moe.dispatch import assign_slots, combine_outputs, dispatch_tokens
from tmoe_jax.moe.expert_choice import expert_choice_combine, expert_choice_dispatch, expert_choice_route
from tmoe_jax.moe.experts import MlpExperts
from tmoe_jax.moe.guided import guided_gate_loss, guided_route, label_to_expert, routing_agreement
from tmoe_jax.moe.routing import (
  assign_slots_prioritized,
  batch_prioritized_order,
  top_k_route,
  update_expert_bias,
)


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------
# Slow references.


def _tanh_expert_weights(num_experts, d_model, seed=0):
  return np.random.default_rng(seed).normal(size=(num_experts, d_model, d_model)).astype(np.float32) * 0.5


def _tanh_experts(w_ExDxD):
  """expert_fn [E, N, D] -> [E, N, D]: expert e is x -> tanh(x @ W_e)."""
  return lambda x_ExNxD: jnp.tanh(jnp.einsum("end,edf->enf", x_ExNxD, w_ExDxD))


def reference_dense_moe(x_TxD, logits_TxE, w_ExDxD):
  """sum_e softmax(logits)_e * tanh(x @ W_e), looping over tokens and experts."""
  x_TxD = np.asarray(x_TxD, np.float64)
  probs = _softmax(logits_TxE)
  out = np.zeros_like(x_TxD)
  for t in range(x_TxD.shape[0]):
    for e in range(w_ExDxD.shape[0]):
      out[t] += probs[t, e] * np.tanh(x_TxD[t] @ np.asarray(w_ExDxD[e], np.float64))
  return out


def reference_mixtral(logits_TxE, top_k):
  """Per token: the k largest logits, then softmax over those k with `math`."""
  indices, gates = [], []
  for row in np.asarray(logits_TxE, np.float64):
    chosen = list(np.argsort(-row, kind="stable")[:top_k])
    peak = max(row[e] for e in chosen)
    z = sum(math.exp(row[e] - peak) for e in chosen)
    indices.append(chosen)
    gates.append([math.exp(row[e] - peak) / z for e in chosen])
  return np.array(indices), np.array(gates)


def reference_expert_choice(logits_TxE, capacity, mask_T=None):
  """Per expert: argsort tokens by softmax score (padding last), keep the first C."""
  probs = _softmax(logits_TxE)
  num_experts = probs.shape[1]
  indices = np.zeros((num_experts, capacity), np.int64)
  gates = np.zeros((num_experts, capacity))
  for e in range(num_experts):
    score = probs[:, e].copy()
    if mask_T is not None:
      score[~mask_T] = -np.inf
    order = np.argsort(-score, kind="stable")[:capacity]
    indices[e] = order
    gates[e] = [probs[t, e] if np.isfinite(score[t]) else 0.0 for t in order]
  return indices, gates


def reference_expert_choice_combine(y_ExCxD, indices_ExC, gates_ExC, num_tokens):
  out = np.zeros((num_tokens, y_ExCxD.shape[-1]))
  for e in range(indices_ExC.shape[0]):
    for c in range(indices_ExC.shape[1]):
      out[indices_ExC[e, c]] += gates_ExC[e, c] * np.asarray(y_ExCxD[e, c], np.float64)
  return out


def reference_prioritized_assign(indices_TxK, probs_TxE, num_experts, capacity, mask_T=None):
  """Choice-major slot filling, tokens visited by first-choice probability (descending, stable)."""
  indices_TxK = np.asarray(indices_TxK)
  num_tokens, top_k = indices_TxK.shape
  priority = [float(probs_TxE[t, indices_TxK[t, 0]]) for t in range(num_tokens)]
  order = sorted(range(num_tokens), key=lambda t: -priority[t])  # Python's sort is stable.
  fill = [0] * num_experts
  slot = np.full((num_tokens, top_k), num_experts * capacity, np.int64)
  kept = np.zeros((num_tokens, top_k), bool)
  for k in range(top_k):
    for t in order:
      if mask_T is not None and not mask_T[t]:
        continue
      e = int(indices_TxK[t, k])
      if fill[e] < capacity:
        slot[t, k] = e * capacity + fill[e]
        kept[t, k] = True
        fill[e] += 1
  return slot, kept


def _assert_finite_nonzero(grad):
  grad = np.asarray(grad)
  assert np.all(np.isfinite(grad)), grad
  assert np.any(np.abs(grad) > 0), grad


# ---------------------------------------------------------------------------
# Token choice.


class TopKRouteV2Test(chex.TestCase, parameterized.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_all_experts_unnormalized_equals_dense_softmax(self):
    """k = E, softmax before, raw gates and room for every token is the dense softmax layer."""
    num_tokens, num_experts, d_model = 5, 3, 4
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_tokens, d_model)).astype(np.float32)
    logits = rng.normal(size=(num_tokens, num_experts)).astype(np.float32)
    w = _tanh_expert_weights(num_experts, d_model)
    expert_fn = _tanh_experts(jnp.asarray(w))

    def sparse(x, logits):
      route = top_k_route(logits, num_experts, softmax_order="before", normalize_gates=False)
      slots = assign_slots(route.expert_indices_TxK, num_experts, num_tokens)
      buffer = dispatch_tokens(x, slots, num_experts, num_tokens)
      return combine_outputs(expert_fn(buffer), slots, route.gates_TxK)

    expected = reference_dense_moe(x, logits, w)
    out_sparse = self.variant(sparse)(jnp.asarray(x), jnp.asarray(logits))
    dense_fn = self.variant(lambda x, l: dense_softmax_moe(x, l, expert_fn))
    out_dense = dense_fn(jnp.asarray(x), jnp.asarray(logits))
    chex.assert_shape([out_sparse, out_dense], (num_tokens, d_model))
    np.testing.assert_allclose(np.asarray(out_dense), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out_sparse), expected, rtol=1e-5, atol=1e-5)
    gates = self.variant(dense_softmax_gates)(jnp.asarray(logits, jnp.bfloat16))
    assert gates.dtype == jnp.float32
    np.testing.assert_allclose(
      np.asarray(gates),
      _softmax(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32)),
      rtol=1e-5,
      atol=1e-6,
    )

  def test_dense_softmax_moe_with_mlp_experts(self):
    """MlpExperts as expert_fn: the dense layer equals k = E token choice through the same experts."""
    num_tokens, num_experts, d_model = 4, 3, 6
    experts = MlpExperts(num_experts, d_model, 8, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(num_tokens, d_model)), jnp.float32)
    logits = jnp.asarray(rng.normal(size=(num_tokens, num_experts)), jnp.float32)
    dense = dense_softmax_moe(x, logits, experts)
    route = top_k_route(logits, num_experts, normalize_gates=False)
    slots = assign_slots(route.expert_indices_TxK, num_experts, num_tokens)
    buffer = dispatch_tokens(x, slots, num_experts, num_tokens)
    sparse = combine_outputs(experts(buffer), slots, route.gates_TxK)
    chex.assert_trees_all_close(dense, sparse, rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1, 2)
  def test_before_agrees_with_and_without_jit(self, top_k):
    """Without jitter or bias, "before" is exactly `routing.top_k_route`."""
    logits = jnp.asarray(np.random.default_rng(top_k).normal(size=(6, 4)), jnp.float32)
    new = self.variant(lambda l: top_k_route(l, top_k))(logits)
    old = top_k_route(logits, top_k)
    chex.assert_trees_all_close(new, old, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1, 2, 3)
  def test_after_matches_mixtral_formula(self, top_k):
    """ "after": top-k of logits, softmax over those k (gate 1 for k=1); probs stay the full softmax."""
    logits = (np.random.default_rng(10 + top_k).normal(size=(7, 5)) * 2).astype(np.float32)
    route = self.variant(lambda l: top_k_route(l, top_k, softmax_order="after", normalize_gates=False))(
      jnp.asarray(logits)
    )
    indices, gates = reference_mixtral(logits, top_k)
    np.testing.assert_array_equal(np.asarray(route.expert_indices_TxK), indices)
    np.testing.assert_allclose(np.asarray(route.gates_TxK), gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(route.router_probs_TxE), _softmax(logits), rtol=1e-5, atol=1e-6)
    if top_k > 1:
      # Softmax over a subset = full softmax renormalised over it.
      before = top_k_route(jnp.asarray(logits), top_k, softmax_order="before", normalize_gates=True)
      np.testing.assert_allclose(np.asarray(route.gates_TxK), np.asarray(before.gates_TxK), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("before", "after")
  def test_bfloat16_logits_route_in_float32(self, softmax_order):
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(4, 6)), jnp.bfloat16)
    route = self.variant(lambda l: top_k_route(l, 2, softmax_order=softmax_order))(logits)
    for array in (route.gates_TxK, route.router_probs_TxE, route.router_logits_TxE):
      assert array.dtype == jnp.float32
    assert route.expert_indices_TxK.dtype == jnp.int32

  @chex.variants(with_jit=True, without_jit=True)
  def test_jitter_is_off_without_key_or_eps(self):
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(6, 4)), jnp.float32)
    clean = top_k_route(logits, 2)
    no_key = self.variant(lambda l: top_k_route(l, 2, jitter_eps=0.5))(logits)
    no_eps = self.variant(lambda l, k: top_k_route(l, 2, jitter_key=k, jitter_eps=0.0))(
      logits, jax.random.key(0)
    )
    chex.assert_trees_all_equal(no_key, clean)
    chex.assert_trees_all_equal(no_eps, clean)

  @chex.variants(with_jit=True, without_jit=True)
  def test_jitter_stays_within_bounds(self):
    """Noisy logits lie in the +-eps band, selection follows them, and only near-ties can flip."""
    eps = 0.3
    rng = np.random.default_rng(4)
    # Expert 0 leads by more than the band can close (10 * 0.7 > 1.5 * 1.3); experts 1-3 nearly tie.
    logits = np.concatenate([np.full((16, 1), 10.0), 1.0 + 0.5 * rng.uniform(size=(16, 3))], axis=1)
    logits = logits.astype(np.float32)
    route_fn = self.variant(
      lambda l, k: top_k_route(l, 2, jitter_key=k, jitter_eps=eps, softmax_order="after")
    )
    clean_second = np.argsort(-logits, axis=-1, kind="stable")[:, 1]
    flipped = 0
    for seed in range(3):
      route = route_fn(jnp.asarray(logits), jax.random.key(seed))
      noisy = np.asarray(route.router_logits_TxE)
      low, high = (
        np.minimum(logits * (1 - eps), logits * (1 + eps)),
        np.maximum(logits * (1 - eps), logits * (1 + eps)),
      )
      assert np.all((noisy >= low - 1e-6) & (noisy <= high + 1e-6))
      indices = np.asarray(route.expert_indices_TxK)
      np.testing.assert_array_equal(indices, np.argsort(-noisy, axis=-1, kind="stable")[:, :2])
      np.testing.assert_array_equal(indices[:, 0], 0)
      np.testing.assert_allclose(np.asarray(route.router_probs_TxE), _softmax(noisy), rtol=1e-5, atol=1e-6)
      flipped += int(np.sum(indices[:, 1] != clean_second))
    self.assertGreater(flipped, 0)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(("before", True), ("before", False), ("after", True))
  def test_expert_bias_changes_selection_not_gates(self, softmax_order, normalize_gates):
    """A bias steers selection; gates are the unbiased probabilities of the chosen experts."""
    logits = np.random.default_rng(5).normal(size=(8, 4)).astype(np.float32)
    bias = np.array([0.0, 0.0, 0.0, 2.0], np.float32)  # Larger than any probability gap.
    route = self.variant(
      lambda l, b: top_k_route(
        l, 2, softmax_order=softmax_order, normalize_gates=normalize_gates, expert_bias_E=b
      )
    )(jnp.asarray(logits), jnp.asarray(bias))
    probs = _softmax(logits)
    indices = np.asarray(route.expert_indices_TxK)
    np.testing.assert_array_equal(indices[:, 0], 3)
    np.testing.assert_array_equal(indices[:, 1], np.argsort(-probs[:, :3], axis=-1, kind="stable")[:, 0])
    chosen = np.take_along_axis(probs, indices, axis=-1)
    renormalized = normalize_gates or softmax_order == "after"
    expected = chosen / chosen.sum(-1, keepdims=True) if renormalized else chosen
    np.testing.assert_allclose(np.asarray(route.gates_TxK), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(route.router_probs_TxE), probs, rtol=1e-5, atol=1e-6)
    # The bias is state, not a parameter: no gradient reaches it.
    grad_bias = jax.grad(
      lambda b: jnp.sum(top_k_route(jnp.asarray(logits), 2, expert_bias_E=b).gates_TxK * jnp.arange(2.0))
    )(jnp.asarray(bias))
    np.testing.assert_array_equal(np.asarray(grad_bias), 0.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_update_expert_bias_formula(self):
    """bias += rate * sign(mean - load): overloaded down, underloaded up, average unchanged."""
    bias = jnp.asarray([0.1, 0.0, -0.2, 0.0])
    load = jnp.asarray([10.0, 2.0, 4.0, 4.0])  # Mean 5.
    new = self.variant(lambda b, l: update_expert_bias(b, l, rate=0.01))(bias, load)
    np.testing.assert_allclose(np.asarray(new), [0.09, 0.01, -0.19, 0.01], rtol=1e-6)
    assert new.dtype == jnp.float32

  def test_update_expert_bias_balances_a_skewed_router(self):
    """On fixed skewed logits, repeated updates move the top-1 load toward balance."""
    num_tokens, num_experts = 64, 4
    rng = np.random.default_rng(6)
    logits = jnp.asarray(rng.normal(size=(num_tokens, num_experts)) + [1.5, 0.5, 0.0, -0.5], jnp.float32)

    def load(bias_E):
      route = top_k_route(logits, 1, expert_bias_E=bias_E)
      return jnp.sum(jax.nn.one_hot(route.expert_indices_TxK[:, 0], num_experts), axis=0)

    def step(bias_E, _):
      load_E = load(bias_E)
      return update_expert_bias(bias_E, load_E, rate=0.01), load_E

    _, loads = jax.jit(lambda b: jax.lax.scan(step, b, length=150))(jnp.zeros(num_experts))
    loads = np.asarray(loads)
    mean = num_tokens / num_experts
    imbalance_start = loads[0].max() / mean
    imbalance_end = loads[-20:].max(axis=-1).mean() / mean
    self.assertGreater(imbalance_start, 1.8)
    self.assertLess(imbalance_end, 1.3)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(("before", 1), ("before", 2), ("after", 2))
  def test_gradients_reach_logits(self, softmax_order, top_k):
    logits = jnp.asarray(np.random.default_rng(7).normal(size=(5, 4)), jnp.float32)
    weights = jnp.asarray(np.random.default_rng(8).normal(size=(5, top_k)), jnp.float32)
    grad = self.variant(
      jax.grad(
        lambda l: jnp.sum(
          top_k_route(
            l,
            top_k,
            softmax_order=softmax_order,
            jitter_key=jax.random.key(0),
            jitter_eps=0.1,
            expert_bias_E=jnp.zeros(4),
          ).gates_TxK
          * weights
        )
      )
    )(logits)
    _assert_finite_nonzero(grad)

  def test_rejects_bad_arguments(self):
    logits = jnp.zeros((2, 3))
    for bad in (0, 4):
      with self.assertRaisesRegex(ValueError, "top_k"):
        top_k_route(logits, bad)
    with self.assertRaisesRegex(ValueError, "softmax_order"):
      top_k_route(logits, 1, softmax_order="middle")
    with self.assertRaisesRegex(ValueError, "jitter_eps"):
      top_k_route(logits, 1, jitter_eps=1.5)


# ---------------------------------------------------------------------------
# Expert choice.


class ExpertChoiceTest(chex.TestCase, parameterized.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1, 3, 6)
  def test_each_expert_takes_exactly_its_top_c_tokens(self, capacity):
    """C distinct tokens per expert, the C best by softmax score; combine equals a loop."""
    num_tokens, num_experts, d_model = 6, 3, 2
    rng = np.random.default_rng(capacity)
    logits = rng.normal(size=(num_tokens, num_experts)).astype(np.float32)
    x = rng.normal(size=(num_tokens, d_model)).astype(np.float32)

    def run(x, logits):
      route = expert_choice_route(logits, capacity)
      x_ExCxD = expert_choice_dispatch(x, route)
      y_ExCxD = jnp.tanh(x_ExCxD) * (1.0 + jnp.arange(num_experts, dtype=jnp.float32))[:, None, None]
      return route, x_ExCxD, y_ExCxD, expert_choice_combine(y_ExCxD, route, num_tokens)

    route, x_ExCxD, y_ExCxD, out = self.variant(run)(jnp.asarray(x), jnp.asarray(logits))
    indices, gates = reference_expert_choice(logits, capacity)
    chex.assert_shape([route.token_indices_ExC, route.gates_ExC, route.kept_ExC], (num_experts, capacity))
    chex.assert_shape(x_ExCxD, (num_experts, capacity, d_model))
    chex.assert_shape(out, (num_tokens, d_model))
    np.testing.assert_array_equal(np.asarray(route.token_indices_ExC), indices)
    for e in range(num_experts):
      self.assertLen(set(indices[e]), capacity)
    np.testing.assert_allclose(np.asarray(route.gates_ExC), gates, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(route.kept_ExC))
    np.testing.assert_allclose(np.asarray(x_ExCxD), x[indices], rtol=1e-6)
    expected = reference_expert_choice_combine(np.asarray(y_ExCxD), indices, gates, num_tokens)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)
    if capacity == num_tokens:
      # Every expert takes every token: the dense softmax mixture.
      dense = dense_softmax_moe(
        jnp.asarray(x),
        jnp.asarray(logits),
        lambda x_ExTxD: jnp.tanh(x_ExTxD) * (1.0 + jnp.arange(num_experts, dtype=jnp.float32))[:, None, None],
      )
      np.testing.assert_allclose(np.asarray(out), np.asarray(dense), rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(2, 6)
  def test_padding_tokens_are_not_picked(self, capacity):
    """With C <= real tokens padding is never picked; beyond that its picks are not kept and add 0."""
    num_tokens, num_experts = 6, 2
    rng = np.random.default_rng(20)
    logits = rng.normal(size=(num_tokens, num_experts)).astype(np.float32)
    logits[1] += 5.0  # Padding that would otherwise win every expert.
    mask = np.array([1, 0, 1, 1, 0, 1], bool)
    x = rng.normal(size=(num_tokens, 3)).astype(np.float32)

    def run(x, logits, mask):
      route = expert_choice_route(logits, capacity, mask)
      return route, expert_choice_combine(expert_choice_dispatch(x, route), route, num_tokens)

    route, out = self.variant(run)(jnp.asarray(x), jnp.asarray(logits), jnp.asarray(mask))
    indices, gates = reference_expert_choice(logits, capacity, mask)
    kept = np.asarray(route.kept_ExC)
    np.testing.assert_array_equal(kept, mask[np.asarray(route.token_indices_ExC)])
    np.testing.assert_array_equal(np.asarray(route.token_indices_ExC)[kept], indices[kept])
    np.testing.assert_allclose(np.asarray(route.gates_ExC), gates, rtol=1e-5, atol=1e-6)
    if capacity <= mask.sum():
      assert kept.all()
    np.testing.assert_array_equal(np.asarray(out)[~mask], 0.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradients_reach_logits(self):
    rng = np.random.default_rng(21)
    logits = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)

    def loss(logits):
      route = expert_choice_route(logits, 2)
      return jnp.sum(expert_choice_combine(jnp.tanh(expert_choice_dispatch(x, route)), route, 5) ** 2)

    _assert_finite_nonzero(self.variant(jax.grad(loss))(logits))

  def test_rejects_bad_capacity(self):
    for bad in (0, 5):
      with self.assertRaisesRegex(ValueError, "capacity"):
        expert_choice_route(jnp.zeros((4, 2)), bad)


# ---------------------------------------------------------------------------
# Batch prioritized routing.


def _route(seed, num_tokens, num_experts, top_k):
  logits = np.random.default_rng(seed).normal(size=(num_tokens, num_experts)).astype(np.float32) * 2
  route = top_k_route(jnp.asarray(logits), top_k)
  return np.asarray(route.router_probs_TxE), np.asarray(route.expert_indices_TxK)


class BatchPrioritizedTest(chex.TestCase, parameterized.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_order_sorts_by_first_choice_probability(self):
    probs, indices = _route(30, 9, 3, 2)
    perm = self.variant(batch_prioritized_order)(jnp.asarray(probs), jnp.asarray(indices))
    priority = probs[np.arange(9), indices[:, 0]]
    np.testing.assert_array_equal(np.asarray(perm), np.argsort(-priority, kind="stable"))
    assert perm.dtype == jnp.int32

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("k1", 1, 2, False), ("k2", 2, 3, False), ("k2_masked", 2, 2, True))
  def test_tight_capacity_matches_slow_loop(self, top_k, capacity, masked):
    num_tokens, num_experts = 10, 3
    probs, indices = _route(31 + top_k, num_tokens, num_experts, top_k)
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], bool) if masked else None
    slots = self.variant(lambda i, p, m: assign_slots_prioritized(i, p, num_experts, capacity, m))(
      jnp.asarray(indices), jnp.asarray(probs), None if mask is None else jnp.asarray(mask)
    )
    slot, kept = reference_prioritized_assign(indices, probs, num_experts, capacity, mask)
    np.testing.assert_array_equal(np.asarray(slots.slot_TxK), slot)
    np.testing.assert_array_equal(np.asarray(slots.kept_TxK), kept)
    self.assertLess(kept.sum(), num_tokens * top_k)  # Capacity really is tight.

  def test_kept_tokens_are_the_most_confident(self):
    """Top-1 with tight capacity: each expert keeps its C most confident tokens, plain order does not."""
    num_tokens, num_experts, capacity = 12, 2, 2
    probs, indices = _route(40, num_tokens, num_experts, 1)
    kept = np.asarray(
      assign_slots_prioritized(jnp.asarray(indices), jnp.asarray(probs), num_experts, capacity).kept_TxK
    )[:, 0]
    kept_plain = np.asarray(assign_slots(jnp.asarray(indices), num_experts, capacity).kept_TxK)[:, 0]
    confidence = probs[np.arange(num_tokens), indices[:, 0]]
    differs = False
    for e in range(num_experts):
      routed = [t for t in range(num_tokens) if indices[t, 0] == e]
      best = set(sorted(routed, key=lambda t: -confidence[t])[:capacity])
      self.assertEqual({t for t in routed if kept[t]}, best)
      differs |= {t for t in routed if kept_plain[t]} != best
    assert differs, "pick a seed where token order and confidence order disagree"

  @chex.variants(with_jit=True, without_jit=True)
  def test_ample_capacity_equals_assign_slots(self):
    """With room for everyone, nothing drops and the layer output equals plain `assign_slots`."""
    num_tokens, num_experts, top_k, d_model = 7, 3, 2, 2
    probs, indices = _route(50, num_tokens, num_experts, top_k)
    x = jnp.asarray(np.random.default_rng(51).normal(size=(num_tokens, d_model)), jnp.float32)
    gates = jnp.asarray(np.take_along_axis(probs, indices, axis=-1))

    def layer(slots):
      buffer = dispatch_tokens(x, slots, num_experts, num_tokens)
      return combine_outputs(
        jnp.sin(buffer) + jnp.arange(num_experts, dtype=jnp.float32)[:, None, None], slots, gates
      )

    prioritized = self.variant(lambda i, p: assign_slots_prioritized(i, p, num_experts, num_tokens))(
      jnp.asarray(indices), jnp.asarray(probs)
    )
    plain = assign_slots(jnp.asarray(indices), num_experts, num_tokens)
    np.testing.assert_array_equal(np.asarray(prioritized.kept_TxK), True)
    chex.assert_trees_all_close(layer(prioritized), layer(plain), rtol=1e-6)
    # Equal confidence everywhere: the stable sort keeps token order, so slots are identical.
    uniform = jnp.full((num_tokens, num_experts), 1.0 / num_experts)
    tied = self.variant(lambda i, p: assign_slots_prioritized(i, p, num_experts, 2))(
      jnp.asarray(indices), uniform
    )
    chex.assert_trees_all_equal(tied, assign_slots(jnp.asarray(indices), num_experts, 2))


# ---------------------------------------------------------------------------
# Guided routing.


class GuidedTest(chex.TestCase, parameterized.TestCase):
  def test_label_to_expert(self):
    owner = label_to_expert(jnp.arange(10), 5)
    np.testing.assert_array_equal(np.asarray(owner), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    assert owner.dtype == jnp.int32
    np.testing.assert_array_equal(
      np.asarray(label_to_expert(np.array([0, 5, 8]), 3, labels_per_expert=3)), [0, 1, 2]
    )
    # Under jit the values cannot be checked, but the map is the same.
    np.testing.assert_array_equal(
      np.asarray(jax.jit(lambda l: label_to_expert(l, 5))(jnp.arange(10))), np.asarray(owner)
    )
    with self.assertRaisesRegex(ValueError, "labels"):
      label_to_expert(jnp.arange(10), 4)  # Labels 8 and 9 would go to expert 4.
    with self.assertRaisesRegex(ValueError, "labels"):
      label_to_expert(jnp.asarray([-1, 0]), 4)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("cross_entropy", "binary_cross_entropy")
  def test_gate_loss_matches_hand_formula(self, kind):
    num_tokens, num_experts = 6, 4
    rng = np.random.default_rng(60)
    logits = (rng.normal(size=(num_tokens, num_experts)) * 2).astype(np.float32)
    owner = rng.integers(0, num_experts, size=num_tokens).astype(np.int32)
    mask = np.array([1, 1, 0, 1, 0, 1], bool)

    def hand(rows):
      values = []
      for t in rows:
        p = _softmax(logits[t])
        if kind == "cross_entropy":
          values.append(-math.log(p[owner[t]]))
        else:
          values.append(
            np.mean([-math.log(p[e]) if e == owner[t] else -math.log(1 - p[e]) for e in range(num_experts)])
          )
      return np.mean(values)

    loss_fn = self.variant(lambda l, o, m: guided_gate_loss(l, o, kind, m))
    loss = loss_fn(jnp.asarray(logits), jnp.asarray(owner), None)
    chex.assert_shape(loss, ())
    np.testing.assert_allclose(float(loss), hand(range(num_tokens)), rtol=1e-5)
    masked = loss_fn(jnp.asarray(logits), jnp.asarray(owner), jnp.asarray(mask))
    np.testing.assert_allclose(float(masked), hand(np.flatnonzero(mask)), rtol=1e-5)
    grad = jax.grad(lambda l: guided_gate_loss(l, jnp.asarray(owner), kind))(jnp.asarray(logits))
    _assert_finite_nonzero(grad)

  @parameterized.parameters("cross_entropy", "binary_cross_entropy")
  def test_gate_loss_is_finite_for_confident_routers(self, kind):
    """Logits far apart (p rounds to 0 or 1 in float32) still give finite losses and gradients."""
    logits = jnp.asarray([[60.0, 0.0, -60.0], [0.0, 60.0, 0.0]])
    owner = jnp.asarray([0, 2])
    loss, grad = jax.value_and_grad(lambda l: guided_gate_loss(l, owner, kind))(logits)
    assert np.isfinite(float(loss)) and float(loss) > 1.0
    _assert_finite_nonzero(grad)
    with self.assertRaisesRegex(ValueError, "kind"):
      guided_gate_loss(logits, owner, "hinge")

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1, 2, 3)
  def test_guided_route_forces_the_owner_first(self, top_k):
    num_tokens, num_experts = 6, 4
    rng = np.random.default_rng(70 + top_k)
    logits = rng.normal(size=(num_tokens, num_experts)).astype(np.float32)
    probs = _softmax(logits).astype(np.float32)
    owner = rng.integers(0, num_experts, size=num_tokens).astype(np.int32)
    route = self.variant(lambda o, p, l: guided_route(o, p, top_k, router_logits_TxE=l))(
      jnp.asarray(owner), jnp.asarray(probs), jnp.asarray(logits)
    )
    chex.assert_shape([route.expert_indices_TxK, route.gates_TxK], (num_tokens, top_k))
    for t in range(num_tokens):
      others = [e for e in np.argsort(-probs[t], kind="stable") if e != owner[t]]
      chosen = [owner[t]] + others[: top_k - 1]
      np.testing.assert_array_equal(np.asarray(route.expert_indices_TxK[t]), chosen)
      expected = [1.0] if top_k == 1 else probs[t, chosen] / probs[t, chosen].sum()
      np.testing.assert_allclose(np.asarray(route.gates_TxK[t]), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(route.router_logits_TxE), logits)
    self.assertEqual(float(routing_agreement(route.expert_indices_TxK, jnp.asarray(owner))), 1.0)

  def test_guided_route_gradients_reach_logits_for_k_above_one(self):
    logits = jnp.asarray(np.random.default_rng(80).normal(size=(5, 4)), jnp.float32)
    owner = jnp.asarray([0, 1, 2, 3, 0])
    weights = jnp.asarray([[1.0, -2.0]] * 5)
    grad = jax.grad(lambda l: jnp.sum(guided_route(owner, jax.nn.softmax(l), 2).gates_TxK * weights))(logits)
    _assert_finite_nonzero(grad)

  @chex.variants(with_jit=True, without_jit=True)
  def test_routing_agreement(self):
    indices = jnp.asarray([[0, 1], [2, 0], [1, 3], [3, 2]])
    owner = jnp.asarray([0, 0, 1, 2])
    agreement = self.variant(routing_agreement)
    # Only tokens 0 and 2 pick their owner first.
    self.assertAlmostEqual(float(agreement(indices, owner)), 0.5)
    mask = jnp.asarray([True, False, True, False])
    self.assertAlmostEqual(float(agreement(indices, owner, mask)), 1.0)


def test_every_registered_router_has_a_layer_path_and_its_facts_are_enforced():
  """The router registry, the layer's paths and the config checks name the same routers."""
  from tmoe_jax.errors import ConfigError
  from tmoe_jax.models.language_model import LanguageModelConfig
  from tmoe_jax.moe.layer import ROUTED_PATHS
  from tmoe_jax.moe.routers import ROUTER_REGISTRY
  from tmoe_jax.moe.settings import MoEConfig

  assert set(ROUTED_PATHS) == set(ROUTER_REGISTRY)
  for name, router in ROUTER_REGISTRY.items():
    if not router.dropless:
      with pytest.raises(ConfigError, match="model.dispatch"):
        MoEConfig(router=name, dispatch="dropless")
    if not router.causal:
      with pytest.raises(ConfigError, match="model.router: .* not causal"):
        LanguageModelConfig.from_flat(vocab_size=5, ffn="moe", router=name)
