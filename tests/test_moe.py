"""Tests for MoE routing, auxiliary losses, fixed-capacity dispatch and the MoE layer.

References are independent of the library: Python loops over tokens and
experts for the losses and for slot assignment, the one-hot einsum (GShard)
formulation for dispatch/combine, and a per-token loop over experts for the
whole layer.
"""

from __future__ import annotations

import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

from tmoe_jax.moe import (
  assign_slots,
  combine_outputs,
  dispatch_tokens,
  load_balancing_loss,
  router_z_loss,
  top_k_route,
)
from tmoe_jax.moe.layer import MoEFeedForward
from tmoe_jax.moe.settings import MoEConfig


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------
# Slow references.


def reference_load_balancing_loss(probs_TxE, indices_TxK, mask_T=None):
  """E * sum_e f_e * P_e with f_e = count_e / (tokens * k) and P_e the mean probability, by loops."""
  num_tokens, num_experts = probs_TxE.shape
  top_k = indices_TxK.shape[1]
  tokens = [t for t in range(num_tokens) if mask_T is None or mask_T[t]]
  loss = 0.0
  for e in range(num_experts):
    count = sum(1 for t in tokens for k in range(top_k) if indices_TxK[t, k] == e)
    fraction = count / (len(tokens) * top_k)
    probability = sum(float(probs_TxE[t, e]) for t in tokens) / len(tokens)
    loss += fraction * probability
  return num_experts * loss


def reference_z_loss(logits_TxE, mask_T=None):
  """mean over (unmasked) tokens of log(sum_e exp(logit_e))^2, with plain `math`."""
  values = []
  for t, row in enumerate(np.asarray(logits_TxE, np.float64)):
    if mask_T is not None and not mask_T[t]:
      continue
    peak = max(row)
    log_z = peak + math.log(sum(math.exp(v - peak) for v in row))
    values.append(log_z**2)
  return sum(values) / len(values)


def reference_assign(indices_TxK, num_experts, capacity, mask_T=None):
  """Choice-major slot filling: all k=0 choices in token order, then k=1, ...; full experts drop.

  Returns (slot [T, K] with E*C for dropped/masked, kept [T, K] bool).
  """
  indices_TxK = np.asarray(indices_TxK)
  num_tokens, top_k = indices_TxK.shape
  fill = [0] * num_experts
  slot = np.full((num_tokens, top_k), num_experts * capacity, np.int64)
  kept = np.zeros((num_tokens, top_k), bool)
  for k in range(top_k):
    for t in range(num_tokens):
      if mask_T is not None and not mask_T[t]:
        continue
      e = int(indices_TxK[t, k])
      if fill[e] < capacity:
        slot[t, k] = e * capacity + fill[e]
        kept[t, k] = True
        fill[e] += 1
  return slot, kept


def gshard_dispatch_combine(
  x_TxD, indices_TxK, gates_TxK, slot_TxK, kept_TxK, num_experts, capacity, expert_fn
):
  """The one-hot GShard formulation: dispatch/combine tensors [T, E, C] and two einsums."""
  num_tokens = x_TxD.shape[0]
  dispatch = np.zeros((num_tokens, num_experts, capacity))
  combine = np.zeros((num_tokens, num_experts, capacity))
  for t in range(num_tokens):
    for k in range(indices_TxK.shape[1]):
      if kept_TxK[t, k]:
        e, c = divmod(int(slot_TxK[t, k]), capacity)
        assert e == indices_TxK[t, k]
        dispatch[t, e, c] = 1.0
        combine[t, e, c] += gates_TxK[t, k]
  buffer_ExCxD = np.einsum("tec,td->ecd", dispatch, np.asarray(x_TxD, np.float64))
  out_TxD = np.einsum("tec,ecd->td", combine, expert_fn(buffer_ExCxD))
  return buffer_ExCxD, out_TxD


def _random_routing(rng, num_tokens, num_experts, top_k):
  """Distinct experts per token (as top-k gives) and random gates."""
  indices = np.stack([rng.permutation(num_experts)[:top_k] for _ in range(num_tokens)]).astype(np.int32)
  gates = rng.uniform(0.1, 1.0, size=(num_tokens, top_k)).astype(np.float32)
  return indices, gates


# ---------------------------------------------------------------------------
# Routing and losses (pure functions, with and without jit).


class RoutingAndLossTest(chex.TestCase, parameterized.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1, 2, 3)
  def test_top_k_route_gates_are_top_k_of_softmax(self, top_k):
    """Gates are the k largest softmax probabilities, sorted descending; renormalised for k > 1."""
    logits = np.random.default_rng(top_k).normal(size=(7, 5)).astype(np.float32)
    route = self.variant(lambda x: top_k_route(x, top_k, normalize_gates=True))(jnp.asarray(logits))
    probs = _softmax(logits)
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    expected_gates = np.take_along_axis(probs, order, axis=-1)
    if top_k > 1:
      expected_gates = expected_gates / expected_gates.sum(axis=-1, keepdims=True)
    chex.assert_shape([route.expert_indices_TxK, route.gates_TxK], (7, top_k))
    np.testing.assert_array_equal(np.asarray(route.expert_indices_TxK), order)
    np.testing.assert_allclose(np.asarray(route.gates_TxK), expected_gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(route.router_probs_TxE), probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(route.router_logits_TxE), logits)
    assert route.expert_indices_TxK.dtype == jnp.int32
    # Probabilities, hence gates, are sorted best first.
    assert np.all(np.diff(np.asarray(route.gates_TxK), axis=-1) <= 0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_top_k_route_unnormalized_keeps_raw_probabilities(self):
    """normalize_gates=False (and k=1 always) keeps the raw softmax probability as the gate."""
    logits = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    probs = _softmax(logits)
    top2 = self.variant(lambda x: top_k_route(x, 2, normalize_gates=False))(jnp.asarray(logits))
    np.testing.assert_allclose(np.asarray(top2.gates_TxK), -np.sort(-probs, axis=-1)[:, :2], rtol=1e-5)
    top1 = self.variant(lambda x: top_k_route(x, 1, normalize_gates=True))(jnp.asarray(logits))
    np.testing.assert_allclose(np.asarray(top1.gates_TxK)[:, 0], probs.max(axis=-1), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_top_k_route_is_float32_for_bfloat16_logits(self):
    """bfloat16 logits still give float32 probabilities, gates and logits."""
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6)), jnp.bfloat16)
    route = self.variant(lambda x: top_k_route(x, 2))(logits)
    for array in (route.gates_TxK, route.router_probs_TxE, route.router_logits_TxE):
      assert array.dtype == jnp.float32
    expected = _softmax(np.asarray(logits.astype(jnp.float32)))
    np.testing.assert_allclose(np.asarray(route.router_probs_TxE), expected, rtol=1e-5, atol=1e-6)

  def test_top_k_route_rejects_bad_k(self):
    """k must be in [1, num_experts]."""
    for bad in (0, 4):
      with self.assertRaisesRegex(ValueError, "top_k"):
        top_k_route(jnp.zeros((2, 3)), bad)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1, 2)
  def test_load_balancing_loss_matches_loop(self, top_k):
    """The library loss equals the loop formula E * sum_e f_e * P_e on random routing."""
    rng = np.random.default_rng(10 + top_k)
    probs = _softmax(rng.normal(size=(9, 4))).astype(np.float32)
    indices, _ = _random_routing(rng, 9, 4, top_k)
    loss = self.variant(load_balancing_loss)(jnp.asarray(probs), jnp.asarray(indices))
    chex.assert_shape(loss, ())
    np.testing.assert_allclose(float(loss), reference_load_balancing_loss(probs, indices), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_load_balancing_loss_is_one_when_balanced(self):
    """A uniform router with a perfectly even assignment scores exactly 1.0."""
    num_experts = 4
    probs = jnp.full((8, num_experts), 1.0 / num_experts)
    indices = jnp.asarray(np.arange(16).reshape(8, 2) % num_experts, jnp.int32)
    loss = self.variant(load_balancing_loss)(probs, indices)
    self.assertEqual(float(loss), 1.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_load_balancing_loss_collapsed_router_is_about_num_experts(self):
    """All tokens to expert 0 with probability ~1 gives ~E, far above the balanced 1.0."""
    num_experts = 4
    logits = jnp.zeros((6, num_experts)).at[:, 0].set(30.0)
    probs = jax.nn.softmax(logits, axis=-1)
    indices = jnp.zeros((6, 1), jnp.int32)
    loss = float(self.variant(load_balancing_loss)(probs, indices))
    self.assertGreater(loss, 1.0)
    np.testing.assert_allclose(loss, num_experts, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_load_balancing_loss_mask_equals_unmasked_subset(self):
    """Masked tokens are ignored: the loss equals the loss on the unmasked rows alone."""
    rng = np.random.default_rng(3)
    probs = _softmax(rng.normal(size=(10, 5))).astype(np.float32)
    indices, _ = _random_routing(rng, 10, 5, 2)
    mask = np.array([1, 0, 1, 1, 0, 0, 1, 1, 0, 1], bool)
    masked = self.variant(load_balancing_loss)(jnp.asarray(probs), jnp.asarray(indices), jnp.asarray(mask))
    subset = load_balancing_loss(jnp.asarray(probs[mask]), jnp.asarray(indices[mask]))
    np.testing.assert_allclose(float(masked), float(subset), rtol=1e-6)
    np.testing.assert_allclose(float(masked), reference_load_balancing_loss(probs, indices, mask), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_router_z_loss_matches_formula(self):
    """z-loss is mean(logsumexp(logits)^2), also over the unmasked tokens only."""
    logits = (np.random.default_rng(4).normal(size=(7, 3)) * 3).astype(np.float32)
    loss = self.variant(router_z_loss)(jnp.asarray(logits))
    np.testing.assert_allclose(float(loss), reference_z_loss(logits), rtol=1e-5)
    mask = np.array([0, 1, 1, 0, 1, 0, 1], bool)
    masked = self.variant(router_z_loss)(jnp.asarray(logits), jnp.asarray(mask))
    np.testing.assert_allclose(float(masked), reference_z_loss(logits, mask), rtol=1e-5)

  def test_router_z_loss_is_float32_for_bfloat16_logits(self):
    """The z-loss is computed in float32 even for bfloat16 logits."""
    logits = jnp.asarray([[10.0, 9.0, -3.0]], jnp.bfloat16)
    loss = router_z_loss(logits)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), reference_z_loss(np.asarray(logits, np.float32)), rtol=1e-6)


# ---------------------------------------------------------------------------
# Dispatch.


class DispatchTest(chex.TestCase, parameterized.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("tight_k1", 1, 2), ("tight_k2", 2, 3), ("ample_k3", 3, 12), ("one_slot", 2, 1)
  )
  def test_dispatch_combine_matches_loop_and_gshard_einsum(self, top_k, capacity):
    """Kept masks and slots equal the choice-major loop; buffers and outputs equal the one-hot einsums."""
    rng = np.random.default_rng(top_k * 100 + capacity)
    num_tokens, num_experts, d_model = 12, 4, 3
    indices, gates = _random_routing(rng, num_tokens, num_experts, top_k)
    # Half the tokens pick expert 1 first, so tight capacities really drop something.
    for t in range(num_tokens // 2):
      others = rng.permutation([e for e in range(num_experts) if e != 1])
      indices[t] = np.concatenate([[1], others])[:top_k]
    x = rng.normal(size=(num_tokens, d_model)).astype(np.float32)
    scale = rng.normal(size=(num_experts, 1, d_model))
    expert_fn = lambda buf: np.tanh(buf) * scale  # any per-expert function of the buffer

    @self.variant
    def run(x, indices, gates):
      slots = assign_slots(indices, num_experts, capacity)
      buffer = dispatch_tokens(x, slots, num_experts, capacity)
      y = jnp.tanh(buffer) * jnp.asarray(scale, jnp.float32)
      return slots, buffer, combine_outputs(y, slots, gates)

    slots, buffer, out = run(jnp.asarray(x), jnp.asarray(indices), jnp.asarray(gates))
    ref_slot, ref_kept = reference_assign(indices, num_experts, capacity)
    np.testing.assert_array_equal(np.asarray(slots.kept_TxK), ref_kept)
    np.testing.assert_array_equal(np.asarray(slots.slot_TxK), ref_slot)
    ref_buffer, ref_out = gshard_dispatch_combine(
      x, indices, gates, ref_slot, ref_kept, num_experts, capacity, expert_fn
    )
    chex.assert_shape(buffer, (num_experts, capacity, d_model))
    chex.assert_shape(out, (num_tokens, d_model))
    np.testing.assert_allclose(np.asarray(buffer), ref_buffer, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-5, atol=1e-5)
    if capacity >= num_tokens:
      self.assertTrue(ref_kept.all())
    elif capacity <= 3:
      self.assertFalse(ref_kept.all())  # the tight cases do drop

  @chex.variants(with_jit=True, without_jit=True)
  def test_first_choices_outrank_later_second_choices(self):
    """A late token's first choice beats an early token's second choice for the last slot."""
    indices = jnp.asarray([[0, 1], [1, 0]], jnp.int32)
    slots = self.variant(lambda i: assign_slots(i, 2, 1))(indices)
    np.testing.assert_array_equal(np.asarray(slots.kept_TxK), [[True, False], [True, False]])
    np.testing.assert_array_equal(np.asarray(slots.slot_TxK), [[0, 2], [1, 2]])

  @chex.variants(with_jit=True, without_jit=True)
  def test_masked_tokens_take_no_slots(self):
    """Masked tokens are never kept and do not use capacity that real tokens need."""
    rng = np.random.default_rng(5)
    indices, gates = _random_routing(rng, 10, 3, 2)
    indices[:, 0] = 2
    mask = np.array([0, 0, 1, 0, 1, 1, 0, 1, 1, 1], bool)
    slots = self.variant(lambda i, m: assign_slots(i, 3, 3, m))(jnp.asarray(indices), jnp.asarray(mask))
    ref_slot, ref_kept = reference_assign(indices, 3, 3, mask)
    np.testing.assert_array_equal(np.asarray(slots.kept_TxK), ref_kept)
    np.testing.assert_array_equal(np.asarray(slots.slot_TxK), ref_slot)
    self.assertFalse(np.asarray(slots.kept_TxK)[~mask].any())
    x = jnp.asarray(rng.normal(size=(10, 2)), jnp.float32)
    out = combine_outputs(dispatch_tokens(x, slots, 3, 3), slots, jnp.asarray(gates))
    np.testing.assert_array_equal(np.asarray(out)[~mask], 0.0)


@jax.jit(static_argnums=(2, 3))
def _permute_unpermute(x_TxD, indices_TxK, num_experts, capacity, gates_TxK):
  slots = assign_slots(indices_TxK, num_experts, capacity)
  buffer = dispatch_tokens(x_TxD, slots, num_experts, capacity)
  return slots.kept_TxK, combine_outputs(buffer, slots, gates_TxK)


@hypothesis.settings(max_examples=8, deadline=None, derandomize=True)
@hypothesis.given(
  num_tokens=st.integers(1, 9),
  num_experts=st.integers(1, 5),
  top_k=st.integers(1, 5),
  d_model=st.integers(1, 4),
  seed=st.integers(0, 2**16),
)
def test_unpermute_permute_is_identity_with_ample_capacity(num_tokens, num_experts, top_k, d_model, seed):
  """Identity experts, capacity = tokens and gates summing to 1: combine(dispatch(x)) == x."""
  top_k = min(top_k, num_experts)
  rng = np.random.default_rng(seed)
  indices, _ = _random_routing(rng, num_tokens, num_experts, top_k)
  gates = _softmax(rng.normal(size=(num_tokens, top_k))).astype(np.float32)
  x = rng.normal(size=(num_tokens, d_model)).astype(np.float32)
  kept, out = _permute_unpermute(
    jnp.asarray(x), jnp.asarray(indices), num_experts, num_tokens, jnp.asarray(gates)
  )
  assert bool(kept.all())
  chex.assert_trees_all_close(out, jnp.asarray(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# The MoE layer.


def _moe(num_experts, top_k, *, d_model=6, d_ff=8, seed=0, **kwargs):
  """A layer built from MoEConfig with random NumPy parameters (nonzero biases, decisive router).

  The module is constructed abstractly (nnx.eval_shape) and its parameters
  filled in afterwards: concrete initialisation compiles an initializer per
  shape, which costs seconds per configuration on CPU and tests nothing here
  (`test_moe_layer_shapes` covers the real initialisation).
  """
  config = MoEConfig(num_experts=num_experts, top_k=top_k, d_model=d_model, d_ff=d_ff, **kwargs)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MoEFeedForward(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    scale = (
      d_model**-0.5 if "w_in" in name else d_ff**-0.5 if "w_out" in name else 1.0 if "router" in name else 0.5
    )
    return jnp.asarray(rng.normal(size=leaf.shape) * scale, leaf.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))


@nnx.jit(static_argnames="deterministic")
def _apply(layer, x, mask, *, deterministic=True):
  return layer(x, mask, deterministic=deterministic)


def _expert_np(layer, e, x_D):
  """Expert e as an ordinary dense MLP in float64 NumPy."""
  w_in = np.asarray(layer.experts.w_in_ExDxF[...], np.float64)[e]
  b_in = np.asarray(layer.experts.b_in_ExF[...], np.float64)[e]
  w_out = np.asarray(layer.experts.w_out_ExFxD[...], np.float64)[e]
  b_out = np.asarray(layer.experts.b_out_ExD[...], np.float64)[e]
  return np.maximum(x_D @ w_in + b_in, 0.0) @ w_out + b_out


def reference_moe(layer, x_BxLxD, mask_BxL, capacity):
  """Per token: softmax router, top-k, gates (renormalised if k > 1), slot loop, sum gate * expert(x)."""
  config = layer.config
  x_TxD = np.asarray(x_BxLxD, np.float64).reshape(-1, config.d_model)
  mask_T = None if mask_BxL is None else np.asarray(mask_BxL).reshape(-1)
  probs = _softmax(x_TxD @ np.asarray(layer.router.kernel[...], np.float64))
  indices = np.argsort(-probs, axis=-1, kind="stable")[:, : config.top_k]
  gates = np.take_along_axis(probs, indices, axis=-1)
  if config.normalize_gates and config.top_k > 1:
    gates = gates / gates.sum(axis=-1, keepdims=True)
  _, kept = reference_assign(indices, config.num_experts, capacity, mask_T)
  out = np.zeros_like(x_TxD)
  for t in range(x_TxD.shape[0]):
    for k in range(config.top_k):
      if kept[t, k]:
        out[t] += gates[t, k] * _expert_np(layer, indices[t, k], x_TxD[t])
  dropped = (~kept).sum() if mask_T is None else (~kept[mask_T]).sum()
  total = kept.size if mask_T is None else mask_T.sum() * config.top_k
  return out.reshape(x_BxLxD.shape), probs, indices, dropped / total


def test_moe_layer_shapes():
  """Really initialised layer: output [B, L, D]; aux scalars; expert_fraction_E [E] summing to 1.

  Also checks the parameter shapes the experts are documented to have.
  """
  layer = MoEFeedForward(MoEConfig(num_experts=4, top_k=2, d_model=6, d_ff=8), rngs=nnx.Rngs(0))
  chex.assert_shape(layer.router.kernel[...], (6, 4))
  chex.assert_shape(layer.experts.w_in_ExDxF[...], (4, 6, 8))
  chex.assert_shape(layer.experts.w_out_ExFxD[...], (4, 8, 6))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 6)), jnp.float32)
  y, aux = _apply(layer, x, None)
  chex.assert_shape(y, (2, 3, 6))
  assert y.dtype == jnp.float32
  chex.assert_shape(
    [aux.load_balancing_loss, aux.router_z_loss, aux.dropped_fraction, aux.router_entropy], ()
  )
  chex.assert_shape(aux.expert_fraction_E, (4,))
  np.testing.assert_allclose(float(aux.expert_fraction_E.sum()), 1.0, rtol=1e-6)
  assert 0.0 <= float(aux.router_entropy) <= math.log(4) + 1e-6


def test_single_expert_layer_is_dense_mlp():
  """E=1, k=1 with ample capacity: the gate is 1.0 and the layer is the expert's dense MLP."""
  layer = _moe(1, 1, seed=1)
  x = np.random.default_rng(1).normal(size=(2, 4, 6)).astype(np.float32)
  y, aux = _apply(layer, jnp.asarray(x), None)
  w_in, b_in = layer.experts.w_in_ExDxF[...][0], layer.experts.b_in_ExF[...][0]
  w_out, b_out = layer.experts.w_out_ExFxD[...][0], layer.experts.b_out_ExD[...][0]
  dense = jax.nn.relu(x @ w_in + b_in) @ w_out + b_out
  chex.assert_trees_all_close(y, dense, rtol=1e-5, atol=1e-5)
  assert float(aux.dropped_fraction) == 0.0


@pytest.mark.parametrize(
  "num_experts,top_k,normalize_gates,deterministic,capacity_factor",
  [
    (4, 2, True, True, 1.25),  # eval capacity (factor 2.0): no drops
    (4, 2, True, False, 0.5),  # tight training capacity: drops
    (4, 2, False, False, 1.0),
    (3, 1, True, False, 0.75),
    (5, 3, True, True, 1.25),
  ],
)
def test_moe_layer_matches_per_token_reference(
  num_experts, top_k, normalize_gates, deterministic, capacity_factor
):
  """The layer output equals a per-token loop over kept top-k experts of gate * expert(x).

  Covers ample and tight capacity (train vs eval factor), a padding mask, and
  the aux losses / dropped fraction computed from the same reference routing.
  """
  layer = _moe(
    num_experts,
    top_k,
    seed=num_experts + top_k,
    normalize_gates=normalize_gates,
    capacity_factor=capacity_factor,
  )
  rng = np.random.default_rng(7)
  x = rng.normal(size=(2, 5, 6)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool)
  y, aux = _apply(layer, jnp.asarray(x), jnp.asarray(mask), deterministic=deterministic)
  capacity = layer.config.capacity(10, training=not deterministic)
  expected, probs, indices, dropped = reference_moe(layer, x, mask, capacity)
  chex.assert_trees_all_close(y, expected.astype(np.float32), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(y)[~mask], 0.0)
  np.testing.assert_allclose(float(aux.dropped_fraction), dropped, rtol=1e-6)
  np.testing.assert_allclose(
    float(aux.load_balancing_loss), reference_load_balancing_loss(probs, indices, mask.reshape(-1)), rtol=1e-4
  )


@pytest.mark.parametrize("num_experts,top_k", [(4, 2), (4, 1)])
def test_gradients_reach_the_router(num_experts, top_k):
  """The task loss has a nonzero gradient on the router kernel (via the gates), k=2 normalised and k=1."""
  layer = _moe(num_experts, top_k, seed=11)
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32)

  def loss_fn(model):
    y, _ = model(x)
    return jnp.sum(y * target)

  grads = nnx.jit(nnx.grad(loss_fn))(layer)
  router_grad = np.asarray(grads["router"]["kernel"][...])
  chex.assert_shape(router_grad, (6, num_experts))
  assert np.all(np.isfinite(router_grad))
  assert np.abs(router_grad).max() > 1e-4
  for name in ("w_in_ExDxF", "w_out_ExFxD"):
    assert np.abs(np.asarray(grads["experts"][name][...])).max() > 1e-4


# ---------------------------------------------------------------------------
# Capacity.


@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (4, 1), (4, 2), (8, 2), (3, 3)])
@pytest.mark.parametrize("num_tokens", [1, 2, 7, 16, 100])
def test_capacity_formula(num_experts, top_k, num_tokens):
  """capacity = ceil(factor * tokens * k / E) clipped to [1, tokens]; train and eval factors differ."""
  config = MoEConfig(
    num_experts=num_experts, top_k=top_k, d_model=4, d_ff=4, capacity_factor=1.25, eval_capacity_factor=2.0
  )
  for training, factor in ((True, 1.25), (False, 2.0)):
    # Exact rational arithmetic: 1.25 = 5/4, 2.0 = 2.
    numerator = (5 if training else 8) * num_tokens * top_k
    raw = -(-numerator // (4 * num_experts))
    assert factor * 4 == (5 if training else 8)
    assert config.capacity(num_tokens, training=training) == max(1, min(raw, num_tokens))


def test_capacity_clips_to_one_and_to_tokens():
  """A tiny factor still gives one slot; a huge one never exceeds the token count."""
  config = MoEConfig(
    num_experts=8, top_k=1, d_model=4, d_ff=4, capacity_factor=0.01, eval_capacity_factor=100.0
  )
  assert config.capacity(10, training=True) == 1
  assert config.capacity(10, training=False) == 10


def test_capacity_is_exact_for_decimal_factors():
  """ceil(1.1 * 90 * 1 / 3) is exactly 33; the documented formula should not gain a slot from rounding."""
  config = MoEConfig(num_experts=3, top_k=1, d_model=4, d_ff=4, capacity_factor=1.1)
  assert config.capacity(90, training=True) == 33
