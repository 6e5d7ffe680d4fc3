"""Tests for the Single Mixture of Experts (fixed dropout masks of one shared FFN).

References are independent of the library: float64 NumPy with a Python loop
over tokens (router softmax, argmax, masked FFN), the dense `FeedForward`
module for the all-ones-mask case, and `load_balancing_loss` etc. evaluated on
the unpadded subset for the statistics.

Shapes: B batch, L length, T tokens, D model, F hidden, M masks.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from absl.testing import parameterized
from flax import nnx

from tmoe_jax.feedforward import FeedForward
from tmoe_jax.moe.routing import top_k_route
from tmoe_jax.moe.smoe import (
  DropoutMasks,
  SingleMixtureOfExperts,
  draw_dropout_masks,
  masked_ffn,
  sample_then_argmax_route,
)

D, F, M = 6, 16, 4


def _layer(keep_rate=0.5, **kwargs):
  return SingleMixtureOfExperts(D, F, M, keep_rate, rngs=nnx.Rngs(0), **kwargs)


# Jitted: one compilation per shape instead of one per eager op keeps the cold run short.
@nnx.jit
def _apply(layer, x_BxLxD, token_mask_BxL=None):
  return layer(x_BxLxD, token_mask_BxL)


def _x(batch=2, length=5, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, length, D))


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _np_activation(name):
  if name == "relu":
    return lambda h: np.maximum(h, 0.0)
  # jax.nn.gelu's default is the tanh approximation.
  return lambda h: 0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))


# ---------------------------------------------------------------------------
# Slow references.


def reference_masked_ffn(x_TxD, index_T, masks_MxF, w_in, b_in, w_out, b_out, activation, keep_rate):
  """One token at a time, float64: act(x W_in + b_in) * mask / keep_rate, then W_out + b_out."""
  act = _np_activation(activation)
  f64 = lambda a: np.asarray(a, np.float64)
  rows = []
  for t in range(x_TxD.shape[0]):
    hidden_F = act(f64(x_TxD[t]) @ f64(w_in) + f64(b_in))
    hidden_F = hidden_F * f64(masks_MxF[int(index_T[t])]) / keep_rate
    rows.append(hidden_F @ f64(w_out) + f64(b_out))
  return np.stack(rows)


def reference_layer(layer, x_BxLxD, token_mask_BxL=None):
  """The sMoE by loops: route each token (or each sequence's padding-free mean), gate * masked FFN."""
  x = np.asarray(x_BxLxD, np.float64)
  batch, length, _ = x.shape
  valid = np.ones((batch, length), bool) if token_mask_BxL is None else np.asarray(token_mask_BxL)
  router = np.asarray(layer.router.kernel[...], np.float64)
  weights = [
    np.asarray(v[...])
    for v in (layer.hidden.kernel, layer.hidden.bias, layer.output.kernel, layer.output.bias)
  ]
  masks = np.asarray(layer.masks_MxF[...])
  out = np.zeros_like(x)
  for b in range(batch):
    if layer.per_sequence:
      rows = [x[b, l] for l in range(length) if valid[b, l]]
      mean = sum(rows) / len(rows) if rows else np.zeros(x.shape[-1])
      probs = _softmax(mean @ router)
    for l in range(length):
      if not layer.per_sequence:
        probs = _softmax(x[b, l] @ router)
      choice = int(np.argmax(probs))
      ffn = reference_masked_ffn(x[b, l][None], [choice], masks, *weights, layer.activation, layer.keep_rate)
      out[b, l] = probs[choice] * ffn[0]
  return out


# ---------------------------------------------------------------------------
# Masks.


def test_draw_dropout_masks_keep_rate_on_average():
  masks = draw_dropout_masks(jax.random.key(0), 64, 256, 0.3)
  chex.assert_shape(masks, (64, 256))
  chex.assert_type(masks, jnp.bool_)
  # 16384 Bernoulli(0.3) draws: std of the mean is about 0.0036.
  assert abs(float(jnp.mean(masks)) - 0.3) < 0.02


def test_draw_dropout_masks_never_all_zero():
  # At keep_rate 0.05 over 3 units about 86% of raw masks would be empty.
  masks = np.asarray(draw_dropout_masks(jax.random.key(0), 200, 3, 0.05))
  assert masks.any(axis=-1).all()
  # The rescue adds one unit, not more: an empty draw becomes a one-unit mask.
  assert masks.sum(axis=-1).min() == 1
  assert np.asarray(draw_dropout_masks(jax.random.key(0), 5, 7, 1.0)).all()


@pytest.mark.parametrize("num_masks, d_ff, keep_rate", [(0, 4, 0.5), (2, 0, 0.5), (2, 4, 0.0), (2, 4, 1.5)])
def test_draw_dropout_masks_rejects_bad_arguments(num_masks, d_ff, keep_rate):
  with pytest.raises(ValueError):
    draw_dropout_masks(jax.random.key(0), num_masks, d_ff, keep_rate)


def test_masks_depend_only_on_mask_seed():
  a = SingleMixtureOfExperts(D, F, M, 0.5, mask_seed=3, rngs=nnx.Rngs(0))
  b = SingleMixtureOfExperts(D, F, M, 0.5, mask_seed=3, rngs=nnx.Rngs(7))
  c = SingleMixtureOfExperts(D, F, M, 0.5, mask_seed=4, rngs=nnx.Rngs(0))
  chex.assert_trees_all_equal(a.masks_MxF[...], b.masks_MxF[...])
  assert not np.array_equal(a.masks_MxF[...], c.masks_MxF[...])


# ---------------------------------------------------------------------------
# Pure function and layer against references.


class MaskedFfnTest(chex.TestCase, parameterized.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(("relu", 1.0), ("gelu", 0.25))
  def test_masked_ffn_matches_per_token_loop(self, activation, keep_rate):
    keys = jax.random.split(jax.random.key(0), 7)
    x = jax.random.normal(keys[0], (9, D))
    index = jax.random.randint(keys[1], (9,), 0, M)
    masks = draw_dropout_masks(keys[2], M, F, 0.5)
    w_in = jax.random.normal(keys[3], (D, F))
    b_in = jax.random.normal(keys[4], (F,))
    w_out = jax.random.normal(keys[5], (F, D))
    b_out = jax.random.normal(keys[6], (D,))
    fn = self.variant(lambda *a: masked_ffn(*a, activation, keep_rate=keep_rate))
    out = fn(x, index, masks, w_in, b_in, w_out, b_out)
    chex.assert_shape(out, (9, D))
    expected = reference_masked_ffn(x, index, masks, w_in, b_in, w_out, b_out, activation, keep_rate)
    chex.assert_trees_all_close(out, expected.astype(np.float32), rtol=1e-4, atol=1e-4)


def test_all_ones_masks_equal_dense_ffn_times_gate():
  layer = _layer(keep_rate=1.0)
  assert np.asarray(layer.masks_MxF[...]).all()
  dense = FeedForward(D, F, rngs=nnx.Rngs(5))
  # Same weights: the sMoE's `hidden` / `output` mirror FeedForward's.
  layer.hidden.kernel[...] = dense.hidden.kernel[...]
  layer.hidden.bias[...] = jax.random.normal(jax.random.key(2), (F,))
  dense.hidden.bias[...] = layer.hidden.bias[...]
  layer.output.kernel[...] = dense.output.kernel[...]
  layer.output.bias[...] = jax.random.normal(jax.random.key(3), (D,))
  dense.output.bias[...] = layer.output.bias[...]
  x = _x()
  y, _ = _apply(layer, x)
  gate = _softmax(np.asarray(x, np.float64) @ np.asarray(layer.router.kernel[...], np.float64)).max(-1)
  chex.assert_trees_all_close(
    y, (gate[..., None] * np.asarray(dense(x))).astype(np.float32), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize("per_sequence", [False, True])
def test_layer_matches_reference_loop(per_sequence):
  layer = _layer(keep_rate=0.5, per_sequence=per_sequence)
  x = _x()
  token_mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  y, _ = _apply(layer, x, token_mask)
  expected = reference_layer(layer, x, token_mask)
  chex.assert_trees_all_close(y, expected.astype(np.float32), rtol=1e-4, atol=1e-5)


def test_shapes_and_dtypes():
  layer = _layer(dtype=jnp.bfloat16)
  chex.assert_shape(layer.router.kernel[...], (D, M))
  chex.assert_shape(layer.hidden.kernel[...], (D, F))
  chex.assert_shape(layer.output.kernel[...], (F, D))
  chex.assert_shape(layer.masks_MxF[...], (M, F))
  x = _x().astype(jnp.bfloat16)
  y, aux = layer(x)
  chex.assert_shape(y, x.shape)
  chex.assert_type(y, jnp.bfloat16)
  chex.assert_shape(
    [aux.load_balancing_loss, aux.router_z_loss, aux.dropped_fraction, aux.router_entropy], ()
  )
  chex.assert_shape(aux.expert_fraction_E, (M,))
  chex.assert_type(aux.expert_fraction_E, jnp.float32)
  chex.assert_tree_all_finite((y, aux))


def test_deterministic_without_rngs():
  layer = _layer()
  x = _x()
  y1, aux1 = layer(x, deterministic=False)
  y2, aux2 = layer(x, deterministic=True, drop_tokens=False)
  chex.assert_trees_all_equal((y1, aux1), (y2, aux2))


class JitTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_equals_eager(self):
    layer = _layer(per_sequence=False)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    x = _x()
    token_mask = jnp.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool)

    def apply(params, rest, x, token_mask):
      return nnx.merge(graphdef, params, rest)(x, token_mask)

    got = self.variant(apply)(params, rest, x, token_mask)
    chex.assert_trees_all_close(got, layer(x, token_mask), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# Routing statistics.


def test_statistics_ignore_padding_tokens():
  layer = _layer()
  x = _x(batch=1, length=5)
  token_mask = jnp.array([[1, 1, 0, 1, 0]], bool)
  _, aux = _apply(layer, x, token_mask)
  # Same statistics as running only the non-padding tokens.
  _, aux_subset = _apply(layer, x[:, np.asarray(token_mask[0])])
  chex.assert_trees_all_close(aux, aux_subset, rtol=1e-5, atol=1e-6)
  assert float(aux.dropped_fraction) == 0.0
  chex.assert_trees_all_close(jnp.sum(aux.expert_fraction_E), 1.0, rtol=1e-6)


def test_expert_fraction_counts_chosen_masks():
  layer = _layer()
  x = _x()
  _, aux = _apply(layer, x)
  logits = np.asarray(x, np.float64).reshape(-1, D) @ np.asarray(layer.router.kernel[...], np.float64)
  counts = np.bincount(np.argmax(logits, -1), minlength=M)
  chex.assert_trees_all_close(aux.expert_fraction_E, (counts / counts.sum()).astype(np.float32))


# ---------------------------------------------------------------------------
# Per-sequence routing.


def test_per_sequence_padding_does_not_change_choice_or_output():
  layer = _layer(per_sequence=True)
  x = _x(batch=2, length=5)
  token_mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], bool)
  noisy = jnp.where(token_mask[..., None], x, 100.0 * _x(batch=2, length=5, seed=9))
  y, aux = _apply(layer, x, token_mask)
  y_noisy, aux_noisy = _apply(layer, noisy, token_mask)
  valid = np.asarray(token_mask)
  chex.assert_trees_all_close(np.asarray(y)[valid], np.asarray(y_noisy)[valid], rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(aux, aux_noisy, rtol=1e-6, atol=1e-6)


def test_per_sequence_every_token_uses_the_sequence_mask():
  layer = _layer(per_sequence=True)
  masks = np.asarray(layer.masks_MxF[...])
  assert len({m.tobytes() for m in masks}) == M  # distinct masks, so outputs identify the choice
  x = _x(batch=2, length=6)
  y, aux = _apply(layer, x)
  weights = [
    layer.hidden.kernel[...],
    layer.hidden.bias[...],
    layer.output.kernel[...],
    layer.output.bias[...],
  ]
  for b in range(2):
    probs = _softmax(np.asarray(x[b], np.float64).mean(0) @ np.asarray(layer.router.kernel[...], np.float64))
    choice = int(np.argmax(probs))
    per_mask = [
      probs[m] * reference_masked_ffn(x[b], [m] * 6, masks, *weights, "relu", layer.keep_rate)
      for m in range(M)
    ]
    errors = [np.abs(np.asarray(y[b]) - ffn).max(axis=-1) for ffn in per_mask]
    # Every token is best explained by the sequence's mask and matches it.
    assert (np.argmin(np.stack(errors), axis=0) == choice).all()
    assert errors[choice].max() < 1e-4
  # One routing decision per sequence.
  chex.assert_trees_all_close(jnp.sum(aux.expert_fraction_E), 1.0)
  assert set(np.asarray(aux.expert_fraction_E).tolist()) <= {0.0, 0.5, 1.0}


# ---------------------------------------------------------------------------
# Masks as non-trainable state.


def test_masks_are_not_params_and_get_no_gradient():
  layer = _layer()
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  param_paths = {path for path, _ in nnx.to_flat_state(params)}
  rest_flat = dict(nnx.to_flat_state(rest))
  assert ("masks_MxF",) not in param_paths
  assert isinstance(rest_flat[("masks_MxF",)], DropoutMasks)
  assert ("masks_MxF",) in {path for path, _ in nnx.to_flat_state(nnx.state(layer, DropoutMasks))}

  def loss(params):
    y, aux = nnx.merge(graphdef, params, rest)(_x())
    return jnp.sum(y**2) + aux.load_balancing_loss

  grads = jax.jit(jax.grad(loss))(params)
  assert {path for path, _ in nnx.to_flat_state(grads)} == param_paths
  # An optimizer built on the params never holds (or updates) the masks.
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)
  assert all(leaf.dtype != jnp.bool_ for leaf in jax.tree.leaves(opt_state))
  updates, _ = jax.jit(optimizer.update)(grads, opt_state, params)
  new_model = nnx.merge(graphdef, jax.jit(optax.apply_updates)(params, updates), rest)
  chex.assert_trees_all_equal(new_model.masks_MxF[...], layer.masks_MxF[...])


@pytest.mark.parametrize("per_sequence", [False, True])
def test_gradients_reach_router_and_ffn(per_sequence):
  layer = _layer(per_sequence=per_sequence)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  token_mask = jnp.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], bool)

  def loss(params):
    y, _ = nnx.merge(graphdef, params, rest)(_x(), token_mask)
    return jnp.sum(jnp.sin(y))

  grads = dict(nnx.to_flat_state(jax.jit(jax.grad(loss))(params)))
  for path in [
    ("router", "kernel"),
    ("hidden", "kernel"),
    ("hidden", "bias"),
    ("output", "kernel"),
    ("output", "bias"),
  ]:
    grad = grads[path][...]
    chex.assert_tree_all_finite(grad)
    assert float(jnp.max(jnp.abs(grad))) > 0.0, path


def test_masks_survive_split_merge_and_orbax_round_trip(tmp_path):
  layer = _layer()
  x = _x()
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  merged = nnx.merge(graphdef, params, rest)
  chex.assert_trees_all_equal(merged.masks_MxF[...], layer.masks_MxF[...])

  checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  checkpointer.save(tmp_path / "rest", args=ocp.args.StandardSave(rest))
  # Restore into a model whose own masks differ (other mask_seed): the checkpoint must win.
  other = SingleMixtureOfExperts(D, F, M, 0.5, mask_seed=11, rngs=nnx.Rngs(0))
  _, _, other_rest = nnx.split(other, nnx.Param, ...)
  assert not np.array_equal(other.masks_MxF[...], layer.masks_MxF[...])
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, other_rest)
  restored = checkpointer.restore(tmp_path / "rest", args=ocp.args.StandardRestore(abstract))
  restored_model = nnx.merge(graphdef, params, restored)
  assert isinstance(nnx.state(restored_model, DropoutMasks)["masks_MxF"], DropoutMasks)
  chex.assert_trees_all_equal(restored_model.masks_MxF[...], layer.masks_MxF[...])
  chex.assert_trees_all_equal(_apply(restored_model, x), _apply(layer, x))


# ---------------------------------------------------------------------------
# Mask scaling by each mask's realised keep share (the original sMoE).


def test_mask_mean_scaling_matches_reference_loop():
  layer = _layer(keep_rate=0.5, mask_scaling="mask_mean")
  masks = np.asarray(layer.masks_MxF[...], np.float64)
  assert len(set(masks.mean(-1).tolist())) > 1  # the realised shares differ, so the test can tell
  x = _x()
  y, _ = _apply(layer, x)
  router = np.asarray(layer.router.kernel[...], np.float64)
  weights = [
    np.asarray(v[...], np.float64)
    for v in (layer.hidden.kernel, layer.hidden.bias, layer.output.kernel, layer.output.bias)
  ]
  expected = np.zeros(x.shape)
  for b in range(x.shape[0]):
    for l in range(x.shape[1]):
      probs = _softmax(np.asarray(x[b, l], np.float64) @ router)
      m = int(np.argmax(probs))
      hidden = np.maximum(np.asarray(x[b, l], np.float64) @ weights[0] + weights[1], 0.0)
      hidden = hidden * masks[m] / masks[m].mean()
      expected[b, l] = probs[m] * (hidden @ weights[2] + weights[3])
  chex.assert_trees_all_close(y, expected.astype(np.float32), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# The sample-then-argmax selection schedule.


def test_sample_then_argmax_route_follows_router_probabilities():
  probs_M = np.array([0.5, 0.3, 0.15, 0.05])
  num_units = 20_000
  logits_NxM = jnp.broadcast_to(jnp.log(jnp.asarray(probs_M, jnp.float32)), (num_units, 4))
  route = jax.jit(sample_then_argmax_route)(logits_NxM, jax.random.key(0), jnp.array(True))
  chosen = np.asarray(route.expert_indices_TxK[:, 0])
  frequency_M = np.bincount(chosen, minlength=4) / num_units
  # Binomial standard error sqrt(p (1 - p) / N) <= 0.0036: 5 sigma.
  tolerance_M = 5 * np.sqrt(probs_M * (1 - probs_M) / num_units)
  assert np.all(np.abs(frequency_M - probs_M) <= tolerance_M), (frequency_M, probs_M)
  # The gate is the probability of the mask actually drawn, not of the argmax.
  np.testing.assert_allclose(np.asarray(route.gates_TxK[:, 0]), probs_M[chosen], rtol=1e-5)


def test_sample_then_argmax_route_without_sampling_is_argmax():
  logits_NxM = jax.random.normal(jax.random.key(1), (50, M)) * 3.0
  route = sample_then_argmax_route(logits_NxM, jax.random.key(2), jnp.array(False))
  chex.assert_trees_all_equal(route, top_k_route(logits_NxM, 1))


PROBS_M = np.array([0.4, 0.3, 0.2, 0.1])


def _sampling_layer(per_sequence=False, sample_steps=10):
  layer = _layer(per_sequence=per_sequence, selection="sample_then_argmax", sample_steps=sample_steps)
  # Input unit vector e_0 gets router probabilities PROBS_M: argmax would always pick mask 0.
  layer.router.kernel[...] = layer.router.kernel[...].at[0].set(jnp.log(jnp.asarray(PROBS_M, jnp.float32)))
  return layer


def _e0(batch, length):
  return jnp.zeros((batch, length, D)).at[..., 0].set(1.0)


@nnx.jit
def _train_call(layer, x_BxLxD, step, key):
  return layer(x_BxLxD, deterministic=False, rngs=nnx.Rngs(dropout=key), step=step)


@pytest.mark.parametrize("per_sequence", [False, True])
def test_sampling_frequencies_follow_router_before_the_switch_step(per_sequence):
  layer = _sampling_layer(per_sequence=per_sequence)
  # 4000 routing units: tokens, or sequences of 2 tokens.
  x = _e0(4000, 2) if per_sequence else _e0(400, 10)
  y, aux = _train_call(layer, x, jnp.int32(9), jax.random.key(3))
  # Binomial standard error sqrt(p (1 - p) / N) <= 0.008: 5 sigma.
  tolerance_M = 5 * np.sqrt(PROBS_M * (1 - PROBS_M) / 4000)
  frequency_M = np.asarray(aux.expert_fraction_E)
  assert np.all(np.abs(frequency_M - PROBS_M) <= tolerance_M), frequency_M
  # Each unit's output is its drawn mask's FFN scaled by that mask's probability.
  weights = [
    layer.hidden.kernel[...],
    layer.hidden.bias[...],
    layer.output.kernel[...],
    layer.output.bias[...],
  ]
  per_mask_MxD = np.stack(
    [
      PROBS_M[m] * reference_masked_ffn(x[0, :1], [m], layer.masks_MxF[...], *weights, "relu", 0.5)[0]
      for m in range(M)
    ]
  )
  errors_TxM = np.abs(np.asarray(y).reshape(-1, 1, D) - per_mask_MxD[None]).max(-1)
  assert errors_TxM.min(-1).max() < 1e-4
  chosen_T = errors_TxM.argmin(-1)
  np.testing.assert_allclose(np.bincount(chosen_T, minlength=M) / len(chosen_T), frequency_M, atol=1e-6)


@pytest.mark.parametrize("per_sequence", [False, True])
def test_from_the_switch_step_on_and_in_evaluation_the_choice_is_argmax(per_sequence):
  layer = _sampling_layer(per_sequence=per_sequence)
  gated = _layer(per_sequence=per_sequence)
  nnx.update(gated, nnx.state(layer))  # same weights and masks, gated_top1 selection
  for x in (_x(), _e0(4, 5)):
    expected = _apply(gated, x)
    for step in (10, 11, 5000):
      chex.assert_trees_all_close(
        _train_call(layer, x, jnp.int32(step), jax.random.key(step)), expected, rtol=1e-6, atol=1e-6
      )
    # Evaluation never samples, whatever the step.
    chex.assert_trees_all_close(layer(x, deterministic=True, step=0), expected, rtol=1e-6, atol=1e-6)
  # Before the switch, sampling moves some of the e_0 units off the argmax mask 0.
  _, aux = _train_call(layer, _e0(4, 5), jnp.int32(9), jax.random.key(4))
  assert float(aux.expert_fraction_E[0]) < 1.0
  chex.assert_trees_all_close(expected[1].expert_fraction_E, jnp.array([1.0, 0, 0, 0]))


def test_sampling_training_call_needs_rngs_and_step():
  layer = _sampling_layer()
  with pytest.raises(ValueError, match="needs `rngs` and `step`"):
    layer(_x(), deterministic=False, step=0)
  with pytest.raises(ValueError, match="needs `rngs` and `step`"):
    layer(_x(), deterministic=False, rngs=nnx.Rngs(dropout=0))


@pytest.mark.parametrize("kwargs", [{"selection": "sample"}, {"mask_scaling": "mean"}, {"sample_steps": -1}])
def test_rejects_unknown_selection_scaling_and_negative_sample_steps(kwargs):
  with pytest.raises(ValueError):
    _layer(**kwargs)


def test_smoe_needs_no_expert_count_divisible_by_the_expert_axis():
  """sMoE has no expert-sharded weights, so any number of masks works on any mesh."""
  import configs.tmoe
  from tmoe_jax.errors import ConfigError
  from tmoe_jax.models.transformer import Transformer, TransformerConfig
  from tmoe_jax.parallel.mesh import make_mesh

  model_config = configs.tmoe.get_config().model
  model_config.update(num_experts=3, top_k=1, moe_layer="smoe")
  mesh = make_mesh(2, 4)
  build = lambda: Transformer(
    TransformerConfig.from_config(model_config, vocab_size=12), mesh=mesh, rngs=nnx.Rngs(0)
  )
  assert nnx.eval_shape(build).config.moe.num_experts == 3
  model_config.moe_layer = "sparse"
  with pytest.raises(ConfigError, match="model.num_experts: must be divisible by mesh.expert=4"):
    nnx.eval_shape(build)
