"""Tests for dropless top-k MoE dispatch (`tmoe_jax.moe.dropless`).

References are independent of the library: a per-token Python loop over the
chosen experts in float64 numpy for outputs, and for gradients `jax.grad` of
a dense formulation that runs every expert on every token and then selects.
The block loop runs with tiny blocks (8 rows, granule 4) so that small inputs
still cover full blocks, tails and groups that straddle blocks; one test runs
the default sizes.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx
from jax.sharding import PartitionSpec as P

from tmoe_jax.errors import ConfigError
from tmoe_jax.feedforward import ACTIVATIONS
from tmoe_jax.moe import dropless
from tmoe_jax.moe.layer import MoEFeedForward
from tmoe_jax.moe.settings import MoEConfig
from tmoe_jax.parallel.mesh import make_mesh

SMALL_BLOCKS = {"block_size": 8, "granule": 4}
# (name, method, block keyword arguments)
METHODS = [
  ("ragged_dot", "ragged_dot", {}),
  ("block_loop", "block_loop", SMALL_BLOCKS),
  ("block_loop_granule_1", "block_loop", {"block_size": 4, "granule": 1}),
]


def _relu(x):
  return np.maximum(x, 0.0)


def reference_moe(x_TxD, indices_TxK, gates_TxK, w_in, b_in, w_out, b_out, mask_T=None):
  """For each token and choice: gate * (relu(x W_in[e] + b_in[e]) W_out[e] + b_out[e]), summed; float64."""
  x_TxD, gates_TxK = np.asarray(x_TxD, np.float64), np.asarray(gates_TxK, np.float64)
  w_in, b_in, w_out, b_out = (np.asarray(a, np.float64) for a in (w_in, b_in, w_out, b_out))
  out = np.zeros_like(x_TxD)
  for t in range(x_TxD.shape[0]):
    if mask_T is not None and not mask_T[t]:
      continue
    for k in range(indices_TxK.shape[1]):
      e = int(indices_TxK[t, k])
      hidden = _relu(x_TxD[t] @ w_in[e] + b_in[e])
      out[t] += gates_TxK[t, k] * (hidden @ w_out[e] + b_out[e])
  return out


def dense_reference(x_TxD, gates_TxK, w_in, b_in, w_out, b_out, indices_TxK):
  """Every expert on every token, then the chosen outputs weighted by the gates (differentiable)."""
  hidden_TxExF = jax.nn.relu(jnp.einsum("td,edf->tef", x_TxD, w_in) + b_in)
  y_TxExD = jnp.einsum("tef,efd->ted", hidden_TxExF, w_out) + b_out
  chosen_TxKxD = jnp.take_along_axis(y_TxExD, indices_TxK[:, :, None], axis=1)
  return jnp.einsum("tkd,tk->td", chosen_TxKxD, gates_TxK)


def _weights(rng, num_experts, d_model, d_ff):
  return (
    jnp.asarray(rng.normal(size=(num_experts, d_model, d_ff)) / np.sqrt(d_model), jnp.float32),
    jnp.asarray(rng.normal(size=(num_experts, d_ff)) * 0.5, jnp.float32),
    jnp.asarray(rng.normal(size=(num_experts, d_ff, d_model)) / np.sqrt(d_ff), jnp.float32),
    jnp.asarray(rng.normal(size=(num_experts, d_model)) * 0.5, jnp.float32),
  )


def _routing(rng, num_tokens, num_experts, top_k, experts_used=None):
  """Distinct experts per token (as top-k gives), drawn from `experts_used`, and random gates."""
  pool = np.arange(num_experts) if experts_used is None else np.asarray(experts_used)
  indices = np.stack([rng.permutation(pool)[:top_k] for _ in range(num_tokens)]).astype(np.int32)
  gates = rng.uniform(0.1, 1.0, size=(num_tokens, top_k)).astype(np.float32)
  return jnp.asarray(indices), jnp.asarray(gates)


def _problem(seed, num_tokens=13, num_experts=5, top_k=2, d_model=6, d_ff=10, experts_used=None):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(num_tokens, d_model)), jnp.float32)
  indices, gates = _routing(rng, num_tokens, num_experts, top_k, experts_used)
  return x, indices, gates, _weights(rng, num_experts, d_model, d_ff)


def _loss(y_TxD):
  # Non-uniform cotangents so every output element's gradient path is checked.
  return jnp.sum(jnp.sin(y_TxD) * jnp.arange(1, y_TxD.shape[-1] + 1, dtype=y_TxD.dtype))


def _assert_matches_references(fn, x, indices, gates, weights, *, rtol=2e-4, atol=2e-5, jit=True):
  """fn(x, gates, *weights) -> y: forward vs the loop reference, gradients vs the dense reference."""
  argnums = tuple(range(6))

  def loss_and_output(*args):
    y = fn(*args)
    return _loss(y), y

  # One compiled function for output and gradients: the block loop's compile dominates test time.
  value_and_grad = jax.value_and_grad(loss_and_output, argnums, has_aux=True)
  (_, y), grads = (jax.jit(value_and_grad) if jit else value_and_grad)(x, gates, *weights)
  expected = reference_moe(x, np.asarray(indices), gates, *weights)
  np.testing.assert_allclose(np.asarray(y), expected, rtol=rtol, atol=atol)
  dense_grads = jax.jit(jax.grad(lambda *args: _loss(dense_reference(*args, indices)), argnums))(
    x, gates, *weights
  )
  for name, got, want in zip(("x", "gates", "w_in", "b_in", "w_out", "b_out"), grads, dense_grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=atol, err_msg=name)


def _moe_fn(indices, method, blocks, token_mask=None):
  return lambda x, gates, *weights: dropless.dropless_moe(
    x, indices, gates, weights, "relu", token_mask_T=token_mask, method=method, **blocks
  )


# ---------------------------------------------------------------------------
# sort_by_expert.


def test_sort_by_expert_is_a_stable_grouping_with_inverse_ranks():
  """Sorted experts ascend, ties keep token order, group sizes count, rank inverts order."""
  rng = np.random.default_rng(0)
  indices, _ = _routing(rng, 11, 6, 2, experts_used=[0, 2, 3, 5])
  sorted_ = jax.jit(dropless.sort_by_expert, static_argnums=1)(indices, 6)
  flat = np.asarray(indices).reshape(-1)
  order = np.asarray(sorted_.order_A)
  np.testing.assert_array_equal(order, np.argsort(flat, kind="stable"))
  np.testing.assert_array_equal(np.asarray(sorted_.expert_A), flat[order])
  np.testing.assert_array_equal(np.asarray(sorted_.token_A), order // 2)
  np.testing.assert_array_equal(np.asarray(sorted_.group_sizes_E), np.bincount(flat, minlength=6))
  np.testing.assert_array_equal(order[np.asarray(sorted_.rank_TxK).reshape(-1)], np.arange(22))
  assert sorted_.group_sizes_E.dtype == jnp.int32


def test_sort_by_expert_puts_masked_tokens_past_the_groups():
  indices = jnp.asarray([[1, 0], [0, 2], [2, 1]], jnp.int32)
  mask = jnp.asarray([True, False, True])
  sorted_ = dropless.sort_by_expert(indices, 3, mask)
  np.testing.assert_array_equal(np.asarray(sorted_.group_sizes_E), [1, 2, 1])
  np.testing.assert_array_equal(np.asarray(sorted_.token_A), [0, 0, 2, 2, 1, 1])
  np.testing.assert_array_equal(np.asarray(sorted_.expert_A), [0, 1, 1, 2, 3, 3])


# ---------------------------------------------------------------------------
# dropless_moe against the references.


class DroplessMoeTest(chex.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(*METHODS)
  def test_matches_loop_and_dense_gradients(self, method, blocks):
    """Output = the per-token loop; grads (x, gates, all weights) = jax.grad of the dense reference."""
    x, indices, gates, weights = _problem(seed=1)
    _assert_matches_references(_moe_fn(indices, method, blocks), x, indices, gates, weights)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*METHODS[:2])
  def test_jit_and_eager_agree_with_the_references(self, method, blocks):
    """Either way (jit or op by op) output and gradients match the references and each other."""
    x, indices, gates, weights = _problem(seed=2, num_tokens=9, num_experts=3)
    fn = self.variant(_moe_fn(indices, method, blocks))
    _assert_matches_references(fn, x, indices, gates, weights, jit=False)
    value_and_grad = lambda *args: jax.value_and_grad(lambda *a: _loss(fn(*a)), argnums=(0, 1, 2))(*args)
    want = jax.jit(
      jax.value_and_grad(lambda *a: _loss(_moe_fn(indices, method, blocks)(*a)), argnums=(0, 1, 2))
    )
    chex.assert_trees_all_close(
      value_and_grad(x, gates, *weights), want(x, gates, *weights), rtol=1e-5, atol=1e-6
    )

  @parameterized.named_parameters(*METHODS[:2])
  def test_experts_without_tokens_and_one_expert_with_all(self, method, blocks):
    """Empty experts get zero weight gradients; one expert taking every token crosses many blocks."""
    x, indices, gates, weights = _problem(seed=3, num_tokens=21, num_experts=6, experts_used=[1, 4])
    _assert_matches_references(_moe_fn(indices, method, blocks), x, indices, gates, weights)
    x, indices, gates, weights = _problem(seed=4, num_tokens=21, num_experts=4, top_k=1, experts_used=[2])
    _assert_matches_references(_moe_fn(indices, method, blocks), x, indices, gates, weights)

  @parameterized.named_parameters(*METHODS[:2])
  def test_single_expert_gate_one_is_dense_mlp(self, method, blocks):
    x, indices, _, weights = _problem(seed=5, num_tokens=10, num_experts=1, top_k=1)
    y = jax.jit(_moe_fn(indices, method, blocks))(x, jnp.ones((10, 1)), *weights)
    w_in, b_in, w_out, b_out = (w[0] for w in weights)
    chex.assert_trees_all_close(y, jax.nn.relu(x @ w_in + b_in) @ w_out + b_out, rtol=1e-5, atol=1e-5)

  @parameterized.named_parameters(*METHODS[:2])
  def test_masked_tokens_give_zero_and_get_no_gradient(self, method, blocks):
    x, indices, gates, weights = _problem(seed=6, num_tokens=12)
    mask = np.random.default_rng(6).uniform(size=12) < 0.6
    fn = jax.jit(_moe_fn(indices, method, blocks, jnp.asarray(mask)))
    y = fn(x, gates, *weights)
    np.testing.assert_allclose(
      np.asarray(y), reference_moe(x, np.asarray(indices), gates, *weights, mask), rtol=2e-4, atol=2e-5
    )
    dx, dgates = jax.grad(lambda x, g: _loss(fn(x, g, *weights)), argnums=(0, 1))(x, gates)
    np.testing.assert_array_equal(np.asarray(dx)[~mask], 0.0)
    np.testing.assert_array_equal(np.asarray(dgates)[~mask], 0.0)

  def test_default_block_sizes(self):
    """The production schedule (512-row blocks, 32-row tails): experts 1 and 2 get 600 rows each."""
    x, indices, gates, weights = _problem(
      seed=7, num_tokens=600, num_experts=4, d_model=4, d_ff=8, experts_used=[1, 2]
    )
    _assert_matches_references(_moe_fn(indices, "block_loop", {}), x, indices, gates, weights)

  def test_auto_is_block_loop_on_cpu_and_bad_arguments_raise(self):
    assert dropless.resolve_method("auto") == (
      "block_loop" if jax.default_backend() == "cpu" else "ragged_dot"
    )
    x, indices, gates, weights = _problem(seed=8)
    with pytest.raises(ValueError, match="method"):
      dropless.dropless_moe(x, indices, gates, weights, method="dense")
    with pytest.raises(ValueError, match="block_size"):
      dropless.dropless_moe(x, indices, gates, weights, method="block_loop", block_size=6, granule=4)

  def test_bfloat16_stays_close_to_float32(self):
    x, indices, gates, weights = _problem(seed=9)
    y32 = reference_moe(x, np.asarray(indices), gates, *weights)
    as16 = lambda a: a.astype(jnp.bfloat16)
    y16 = jax.jit(_moe_fn(indices, "block_loop", SMALL_BLOCKS))(as16(x), gates, *map(as16, weights))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=0.05, atol=0.05)


@hypothesis.settings(max_examples=6, deadline=None, derandomize=True)
@hypothesis.given(
  num_tokens=st.integers(1, 30),
  num_experts=st.integers(1, 6),
  top_k=st.integers(1, 3),
  used=st.integers(1, 6),
  seed=st.integers(0, 2**16),
)
def test_random_shapes_match_loop(num_tokens, num_experts, top_k, used, seed):
  """Random T, E, K, with only `used` experts receiving tokens (the rest get none)."""
  top_k = min(top_k, num_experts)
  used = max(min(used, num_experts), top_k)
  rng = np.random.default_rng(seed)
  experts_used = rng.permutation(num_experts)[:used]
  x, indices, gates, weights = _problem(seed, num_tokens, num_experts, top_k, 3, 5, experts_used)
  y = jax.jit(_moe_fn(indices, "block_loop", SMALL_BLOCKS))(x, gates, *weights)
  expected = reference_moe(x, np.asarray(indices), gates, *weights)
  np.testing.assert_allclose(np.asarray(y), expected, rtol=2e-4, atol=2e-5)


# ---------------------------------------------------------------------------
# grouped_experts.


@pytest.mark.parametrize("name,method,blocks", METHODS[:2])
def test_grouped_experts_runs_each_group_through_its_mlp(name, method, blocks):
  """Row r of group e gets expert e's MLP; rows past the groups are 0; grads match a dense reference."""
  rng = np.random.default_rng(10)
  group_sizes = jnp.asarray([3, 0, 9, 2], jnp.int32)  # 14 of 17 rows; expert 1 gets none
  x = jnp.asarray(rng.normal(size=(17, 5)), jnp.float32)
  weights = _weights(rng, 4, 5, 7)
  expert_of_row = np.repeat(np.arange(4), np.asarray(group_sizes))
  fn = lambda x, *weights: dropless.grouped_experts(x, group_sizes, weights, "relu", method=method, **blocks)
  y = jax.jit(fn)(x, *weights)
  # The MLP-only spelling is the same computation.
  y_mlp = dropless.grouped_mlp(x, group_sizes, *weights, "relu", method=method, **blocks)
  chex.assert_trees_all_close(y_mlp, y, rtol=1e-6, atol=1e-6)
  ones = np.ones((17, 1), np.float32)
  expected = reference_moe(x[:14], expert_of_row[:, None], ones[:14], *weights)
  np.testing.assert_allclose(np.asarray(y)[:14], expected, rtol=2e-4, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(y)[14:], 0.0)

  def dense(x, *weights):
    rows = dense_reference(x[:14], jnp.asarray(ones[:14]), *weights, jnp.asarray(expert_of_row[:, None]))
    return jnp.concatenate([rows, jnp.zeros((3, 5))])

  argnums = tuple(range(5))
  got = jax.jit(jax.grad(lambda *a: _loss(fn(*a)), argnums))(x, *weights)
  want = jax.jit(jax.grad(lambda *a: _loss(dense(*a)), argnums))(x, *weights)
  chex.assert_trees_all_close(got, want, rtol=2e-4, atol=2e-5)


# ---------------------------------------------------------------------------
# Gated (SwiGLU / GeGLU) experts: y = (act(x W_gate) * x W_up) W_down.

GATED_METHODS = METHODS[:2]
# T=24, K=2 over experts {0, 1, 3}: expert 2 gets no tokens, the others ~16 rows each, so
# 8-row blocks give full blocks, 4-row-granule tails and groups straddling blocks.
GATED_SHAPES = {"num_tokens": 24, "num_experts": 4, "top_k": 2, "d_model": 8, "d_ff": 16}


def _gated_weights(rng, num_experts, d_model, d_ff):
  """(w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD), `EXPERT_PARAMS_BY_TYPE["gated"]` order."""
  return (
    jnp.asarray(rng.normal(size=(num_experts, d_model, d_ff)) / np.sqrt(d_model), jnp.float32),
    jnp.asarray(rng.normal(size=(num_experts, d_model, d_ff)) / np.sqrt(d_model), jnp.float32),
    jnp.asarray(rng.normal(size=(num_experts, d_ff, d_model)) / np.sqrt(d_ff), jnp.float32),
  )


def _gated_problem(seed, num_tokens, num_experts, top_k, d_model, d_ff, experts_used=(0, 1, 3)):
  """x, routing, weights and a token mask with a few masked tokens."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(num_tokens, d_model)), jnp.float32)
  indices, gates = _routing(rng, num_tokens, num_experts, top_k, experts_used)
  mask = np.ones(num_tokens, bool)
  mask[rng.permutation(num_tokens)[:5]] = False
  return x, indices, gates, _gated_weights(rng, num_experts, d_model, d_ff), mask


def reference_gated_moe(x_TxD, gates_TxK, w_gate, w_up, w_down, *, indices_TxK, activation, mask_T=None):
  """for t, for k: gates[t, k] * (act(x[t] W_gate[e]) * (x[t] W_up[e])) W_down[e], e = e[t, k].

  jax ops in a Python loop over the concrete routing, so `jax.grad` gives its gradients.
  """
  act = ACTIVATIONS[activation]
  rows = []
  for t in range(x_TxD.shape[0]):
    y_D = jnp.zeros(x_TxD.shape[1], x_TxD.dtype)
    if mask_T is None or mask_T[t]:
      for k in range(indices_TxK.shape[1]):
        e = int(indices_TxK[t, k])
        hidden_F = act(x_TxD[t] @ w_gate[e]) * (x_TxD[t] @ w_up[e])
        y_D = y_D + gates_TxK[t, k] * (hidden_F @ w_down[e])
    rows.append(y_D)
  return jnp.stack(rows)


def _gated_moe_fn(indices, activation, method, blocks, token_mask=None):
  return lambda x, gates, *weights: dropless.dropless_moe(
    x,
    indices,
    gates,
    weights,
    activation,
    expert_type="gated",
    token_mask_T=token_mask,
    method=method,
    **blocks,
  )


def _output_and_grads(fn, x, gates, weights):
  """fn's output and its gradients in x, the gates and the three weight arrays."""
  loss_and_output = lambda *args: (_loss(fn(*args)), fn(*args))
  (_, y), grads = jax.value_and_grad(loss_and_output, tuple(range(5)), has_aux=True)(x, gates, *weights)
  return y, grads


class GatedDroplessTest(chex.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    (f"{name}_{activation}", method, blocks, activation)
    for name, method, blocks in GATED_METHODS
    for activation in ("silu", "gelu")
  )
  def test_matches_per_token_loop_and_its_gradients(self, method, blocks, activation):
    """Output and gradients (x, gates, w_gate, w_up, w_down) = the loop reference and jax.grad of it.

    With an expert that gets no tokens (zero weight gradients) and masked tokens (no gradient).
    """
    x, indices, gates, weights, mask = _gated_problem(seed=20, **GATED_SHAPES)
    indices_np = np.asarray(indices)
    fn = _gated_moe_fn(indices, activation, method, blocks, jnp.asarray(mask))
    reference = lambda *args: reference_gated_moe(
      *args, indices_TxK=indices_np, activation=activation, mask_T=mask
    )
    got = jax.jit(functools.partial(_output_and_grads, fn))(x, gates, weights)
    want = jax.jit(functools.partial(_output_and_grads, reference))(x, gates, weights)
    chex.assert_trees_all_close(got, want, rtol=2e-4, atol=2e-5)
    _, (dx, dgates, _, _, dw_down) = got
    np.testing.assert_array_equal(np.asarray(dx)[~mask], 0.0)
    np.testing.assert_array_equal(np.asarray(dgates)[~mask], 0.0)
    np.testing.assert_array_equal(np.asarray(dw_down)[2], 0.0)  # expert 2 got no tokens

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*GATED_METHODS)
  def test_jit_and_eager_agree(self, method, blocks):
    x, indices, gates, weights, mask = _gated_problem(seed=21, **GATED_SHAPES)
    fn = _gated_moe_fn(indices, "silu", method, blocks, jnp.asarray(mask))
    got = self.variant(functools.partial(_output_and_grads, fn))(x, gates, weights)
    want = jax.jit(functools.partial(_output_and_grads, fn))(x, gates, weights)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)

  @parameterized.named_parameters(*GATED_METHODS)
  def test_grouped_experts_runs_each_group_through_its_gated_expert(self, method, blocks):
    """Row r of group e gets expert e; rows past the groups are 0; gradients match the reference."""
    rng = np.random.default_rng(22)
    group_sizes = jnp.asarray([3, 0, 9, 2], jnp.int32)  # 14 of 17 rows; expert 1 gets none
    x = jnp.asarray(rng.normal(size=(17, 8)), jnp.float32)
    weights = _gated_weights(rng, 4, 8, 16)
    expert_of_row = np.repeat(np.arange(4), np.asarray(group_sizes))[:, None]

    def grouped(x, *weights):
      return dropless.grouped_experts(
        x, group_sizes, weights, "gelu", expert_type="gated", method=method, **blocks
      )

    def reference(x, *weights):
      rows = reference_gated_moe(
        x[:14], jnp.ones((14, 1)), *weights, indices_TxK=expert_of_row, activation="gelu"
      )
      return jnp.concatenate([rows, jnp.zeros((3, 8))])

    argnums = tuple(range(4))
    value_and_grad = lambda fn: jax.jit(jax.value_and_grad(lambda *a: _loss(fn(*a)), argnums))
    y = jax.jit(grouped)(x, *weights)
    np.testing.assert_array_equal(np.asarray(y)[14:], 0.0)
    chex.assert_trees_all_close(y, reference(x, *weights), rtol=2e-4, atol=2e-5)
    chex.assert_trees_all_close(
      value_and_grad(grouped)(x, *weights), value_and_grad(reference)(x, *weights), rtol=2e-4, atol=2e-5
    )

  def test_weights_that_do_not_fit_the_expert_type_raise(self):
    x, indices, gates, weights, _ = _gated_problem(seed=23, **GATED_SHAPES)
    with pytest.raises(ValueError, match="expert_type 'gated'"):
      dropless.dropless_moe(x, indices, gates, weights[:2], expert_type="gated")
    with pytest.raises(ValueError, match="expert_type 'mlp'"):
      dropless.dropless_moe(x, indices, gates, weights, expert_type="mlp")
    with pytest.raises(ValueError, match="expert_type 'gated'"):
      dropless.dropless_moe(x, indices, gates, weights[0], expert_type="gated")
    with pytest.raises(ValueError, match="expert_type must be one of"):
      dropless.dropless_moe(x, indices, gates, weights, expert_type="lstm")
    with pytest.raises(ValueError, match="expert_type 'gated'"):
      dropless.grouped_experts(x, jnp.asarray([24, 0, 0, 0]), weights[1:], expert_type="gated")


def test_gated_layer_dropless_equals_ample_capacity_forward_and_backward():
  """MoEFeedForward, expert_type gated: dropless = capacity dispatch where nothing drops, grads included."""
  base = MoEConfig(num_experts=4, top_k=2, d_model=8, d_ff=16, expert_type="gated", activation="silu")
  capacity_layer = MoEFeedForward(dataclasses.replace(base, capacity_factor=8.0), rngs=nnx.Rngs(4))
  dropless_layer = MoEFeedForward(dataclasses.replace(base, dispatch="dropless"), rngs=nnx.Rngs(4))
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 6, 8))
  mask = jnp.arange(12).reshape(2, 6) < jnp.asarray([[6], [4]])  # the second sequence is padded

  def loss_and_output(layer):
    y, aux = layer(x, mask, deterministic=False)
    return jnp.sum(jnp.sin(y) * jnp.arange(1, 9)), (y, aux)

  grad_fn = nnx.value_and_grad(loss_and_output, has_aux=True)
  (_, (y_capacity, aux_capacity)), grads_capacity = grad_fn(capacity_layer)
  (_, (y_dropless, aux_dropless)), grads_dropless = grad_fn(dropless_layer)
  assert float(aux_capacity.dropped_fraction) == 0.0 and float(aux_dropless.dropped_fraction) == 0.0
  chex.assert_trees_all_close(y_dropless, y_capacity, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(
    nnx.to_pure_dict(grads_dropless), nnx.to_pure_dict(grads_capacity), rtol=1e-4, atol=1e-5
  )
  assert float(jnp.abs(grads_dropless.experts.w_gate_ExDxF[...]).sum()) > 0


def test_config_allows_dropless_for_both_expert_types_and_not_for_expert_choice():
  base = MoEConfig(num_experts=4, top_k=2, d_model=8, d_ff=16, dispatch="dropless")
  assert dataclasses.replace(base, expert_type="gated").expert_type == "gated"
  with pytest.raises(ConfigError, match="model.dispatch.*top_k"):
    dataclasses.replace(base, router="expert_choice")


@pytest.mark.parametrize("expert_type", ["mlp", "gated"])
def test_block_loop_inside_shard_map_equals_unsharded_with_gradients(expert_type):
  """Tokens split over 'data', weights replicated: the unsharded output and gradients.

  The loops' carries and the custom_vjp's cotangents must take the inputs' varying mesh
  axes; the weight gradients are summed over 'data'.
  """
  mesh = make_mesh(data=2, expert=4)
  x, indices, gates, _, mask = _gated_problem(seed=24, **GATED_SHAPES)
  rng = np.random.default_rng(24)
  weights = _weights(rng, 4, 8, 16) if expert_type == "mlp" else _gated_weights(rng, 4, 8, 16)

  def local(x, indices, gates, mask, weights):
    return dropless.dropless_moe(
      x,
      indices,
      gates,
      weights,
      "silu",
      expert_type=expert_type,
      token_mask_T=mask,
      method="block_loop",
      **SMALL_BLOCKS,
    )

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("data"),) * 4 + (P(),), out_specs=P("data"))

  def output_and_grads(fn):
    def loss_and_output(x, gates, weights):
      y = fn(x, indices, gates, jnp.asarray(mask), weights)
      return _loss(y), y

    return jax.jit(jax.value_and_grad(loss_and_output, (0, 1, 2), has_aux=True))(x, gates, weights)

  chex.assert_trees_all_close(output_and_grads(sharded), output_and_grads(local), rtol=1e-5, atol=1e-6)


def test_every_registered_expert_type_round_trips_its_dropless_parts():
  """The registry entry's parts and their inverse agree with its parameter order (no type is special)."""
  from tmoe_jax.moe.experts import EXPERT_REGISTRY

  for name, entry in EXPERT_REGISTRY.items():
    weights = tuple(jnp.full((2,), float(i)) for i in range(len(entry.parameters)))
    w_in, b_in, w_out, b_out = entry.parts(weights)
    assert len(w_in) == len(b_in) == entry.input_projections, name
    assert (b_out is None) == (not entry.has_biases), name
    chex.assert_trees_all_equal(entry.weights_of_parts(w_in, b_in, w_out, b_out), weights)
