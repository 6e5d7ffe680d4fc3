"""Tests for the sequence experts (MLP / GRU / LSTM / CNN stacks) and SequenceMoE.

References are independent of the library: NumPy float64 loops over experts,
sequences and time steps that run each expert on the unpadded sequence alone
(the GRU/LSTM equations step by step, the convolution window by window, the
pools by summing), and a per-sequence loop over experts for the mixture.

Shapes: B batch, L length, D input width, H hidden, E experts, K top-k, W kernel width.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tmoe_jax.moe.sequence_experts import (
  SEQUENCE_EXPERT_PARAMS_BY_TYPE,
  SEQUENCE_EXPERT_TYPES,
  ConvExperts,
  GruExperts,
  LstmExperts,
)
from tmoe_jax.moe.sequence_moe import SequenceMoE

E, B, L, D, H = 3, 4, 5, 4, 6
# Full, partial, single-token and all-padding rows (right padding).
LENGTHS_B = np.array([5, 3, 1, 0])
EXPERT_TYPES = ("mlp", "gru", "lstm", "cnn")


# ---------------------------------------------------------------------------
# Slow references: one expert, one unpadded sequence x_NxD (N real tokens, maybe 0).


def _sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


def reference_gru(x_NxD, w_input_Dx3H, w_hidden_Hx3H, b_input_3H, b_hidden_3H):
  hidden = w_hidden_Hx3H.shape[0]
  h = np.zeros(hidden)
  for x_D in x_NxD:
    gi = x_D @ w_input_Dx3H + b_input_3H
    gh = h @ w_hidden_Hx3H + b_hidden_3H
    r = _sigmoid(gi[:hidden] + gh[:hidden])
    z = _sigmoid(gi[hidden : 2 * hidden] + gh[hidden : 2 * hidden])
    n = np.tanh(gi[2 * hidden :] + r * gh[2 * hidden :])
    h = (1 - z) * n + z * h
  return h


def reference_lstm(x_NxD, w_input_Dx4H, w_hidden_Hx4H, b_4H):
  hidden = w_hidden_Hx4H.shape[0]
  h, c = np.zeros(hidden), np.zeros(hidden)
  for x_D in x_NxD:
    g = x_D @ w_input_Dx4H + h @ w_hidden_Hx4H + b_4H
    i, f, cand, o = (g[k * hidden : (k + 1) * hidden] for k in range(4))
    c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(cand)
    h = _sigmoid(o) * np.tanh(c)
  return h


def reference_conv(x_NxD, w_WxDxH, b_H):
  """'SAME' zero padding of (W-1)//2 before and W-1-(W-1)//2 after, ReLU, max over positions."""
  width, d_in, hidden = w_WxDxH.shape
  num = len(x_NxD)
  if num == 0:
    return np.zeros(hidden)
  before = (width - 1) // 2
  padded = np.zeros((num + width - 1, d_in))
  padded[before : before + num] = x_NxD
  best = np.full(hidden, -np.inf)
  for pos in range(num):
    out = b_H.copy()
    for w in range(width):
      out += padded[pos + w] @ w_WxDxH[w]
    best = np.maximum(best, np.maximum(out, 0.0))
  return best


def reference_mlp(x_NxD, w_in_DxH, b_in_H, w_out_HxH, b_out_H):
  mean_D = x_NxD.sum(axis=0) / max(len(x_NxD), 1)
  return np.maximum(mean_D @ w_in_DxH + b_in_H, 0.0) @ w_out_HxH + b_out_H


REFERENCES = {"mlp": reference_mlp, "gru": reference_gru, "lstm": reference_lstm, "cnn": reference_conv}


def reference_experts(expert_type, params, x_ExBxLxD, lengths_B):
  """[E, B, H] by looping over experts and sequences; params: name -> [E, ...] arrays."""
  x = np.asarray(x_ExBxLxD, np.float64)
  names = SEQUENCE_EXPERT_PARAMS_BY_TYPE[expert_type]
  out = []
  for e in range(x.shape[0]):
    weights = [np.asarray(params[name][e], np.float64) for name in names]
    out.append([REFERENCES[expert_type](x[e, b, : lengths_B[b]], *weights) for b in range(x.shape[1])])
  return np.array(out)


# ---------------------------------------------------------------------------
# Helpers.


def _mask(lengths_B=LENGTHS_B, length=L):
  return jnp.asarray(np.arange(length)[None, :] < lengths_B[:, None])


def _randomize(module, seed, scale=0.5):
  """Every Param to N(0, scale^2): nonzero biases, so the references check them too."""
  # NumPy draws: no per-shape JAX compilations in a test file that builds many modules.
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(nnx.state(module, nnx.Param))
  new = [jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) for x in leaves]
  nnx.update(module, jax.tree.unflatten(treedef, new))


def _params(experts, expert_type):
  return {
    name: np.asarray(getattr(experts, name)[...]) for name in SEQUENCE_EXPERT_PARAMS_BY_TYPE[expert_type]
  }


def _make_experts(expert_type, seed=0, **kwargs):
  experts = SEQUENCE_EXPERT_TYPES[expert_type](E, D, H, rngs=nnx.Rngs(seed), **kwargs)
  _randomize(experts, seed + 1)
  return experts


def _inputs(seed=0, shape=(E, B, L, D)):
  return jnp.asarray(np.random.default_rng(100 + seed).standard_normal(shape), jnp.float32)


# Jitted application (one compilation per module structure and shapes): eager
# dispatch of the many tiny ops costs more than compiling them once.
_apply = nnx.jit(lambda module, x, mask: module(x, mask))


# ---------------------------------------------------------------------------
# Expert stacks.


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_expert_stack_matches_reference(expert_type):
  experts = _make_experts(expert_type)
  # A different input per expert: expert e must read slice e.
  x_ExBxLxD = _inputs()
  y_ExBxH = _apply(experts, x_ExBxLxD, _mask())
  chex.assert_shape(y_ExBxH, (E, B, H))
  expected = reference_experts(expert_type, _params(experts, expert_type), x_ExBxLxD, LENGTHS_B)
  np.testing.assert_allclose(y_ExBxH, expected, rtol=1e-5, atol=1e-5)
  # No mask means every position is real.
  full = np.full((B,), L)
  np.testing.assert_allclose(
    _apply(experts, x_ExBxLxD, None),
    reference_experts(expert_type, _params(experts, expert_type), x_ExBxLxD, full),
    atol=1e-5,
  )


@pytest.mark.parametrize("kernel_width", [1, 2, 4])
def test_conv_kernel_widths_and_same_padding(kernel_width):
  experts = _make_experts("cnn", kernel_width=kernel_width)
  x_ExBxLxD = _inputs(1)
  params = _params(experts, "cnn")
  chex.assert_shape(params["w_ExWxDxH"], (E, kernel_width, D, H))
  expected = reference_experts("cnn", params, x_ExBxLxD, LENGTHS_B)
  np.testing.assert_allclose(_apply(experts, x_ExBxLxD, _mask()), expected, rtol=1e-5, atol=1e-5)
  # The reference's padding convention is JAX's 'SAME' (asymmetric for even W).
  conv_BxLxH = jax.lax.conv_general_dilated(
    x_ExBxLxD[0], params["w_ExWxDxH"][0], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
  )
  pooled_BxH = jnp.max(jax.nn.relu(conv_BxLxH + params["b_ExH"][0]), axis=1)
  np.testing.assert_allclose(
    pooled_BxH, reference_experts("cnn", params, x_ExBxLxD, np.full((B,), L))[0], rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_padded_positions_change_nothing(expert_type):
  experts = _make_experts(expert_type)
  x_ExBxLxD = _inputs(2)
  mask_BxL = _mask()
  garbage_ExBxLxD = jnp.where(mask_BxL[None, :, :, None], x_ExBxLxD, jnp.nan)
  chex.assert_trees_all_equal(
    _apply(experts, garbage_ExBxLxD, mask_BxL), _apply(experts, x_ExBxLxD, mask_BxL)
  )

  # NaN padding must not reach the weight gradients either.
  def loss(module):
    return jnp.sum(module(garbage_ExBxLxD, mask_BxL) ** 2)

  grads = nnx.jit(nnx.grad(loss))(experts)
  chex.assert_tree_all_finite(grads)


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_stacked_experts_are_independent_and_jit_matches_eager(expert_type):
  experts = _make_experts(expert_type)
  x_ExBxLxD = _inputs(3)
  mask_BxL = _mask()
  before_ExBxH = experts(x_ExBxLxD, mask_BxL)
  jitted_ExBxH = _apply(experts, x_ExBxLxD, mask_BxL)
  np.testing.assert_allclose(jitted_ExBxH, before_ExBxH, rtol=1e-6, atol=1e-6)

  for name in SEQUENCE_EXPERT_PARAMS_BY_TYPE[expert_type]:
    param = getattr(experts, name)
    param[...] = param[...].at[0].add(0.3)
  after_ExBxH = _apply(experts, x_ExBxLxD, mask_BxL)
  # Rows with a real token (every expert type reacts to its weights there).
  assert not np.allclose(after_ExBxH[0, :3], before_ExBxH[0, :3])
  # Both jitted: bitwise equality does not depend on eager vs fused rounding.
  chex.assert_trees_all_equal(after_ExBxH[1:], jitted_ExBxH[1:])


def test_recurrent_init_orthogonal_blocks_and_forget_bias():
  gru = GruExperts(E, D, H, rngs=nnx.Rngs(0))
  lstm = LstmExperts(E, D, H, rngs=nnx.Rngs(0))
  for w_ExHxG, gates in ((gru.w_hidden_ExHx3H[...], 3), (lstm.w_hidden_ExHx4H[...], 4)):
    chex.assert_shape(w_ExHxG, (E, H, gates * H))
    for e in range(E):
      for g in range(gates):
        block = np.asarray(w_ExHxG[e, :, g * H : (g + 1) * H])
        np.testing.assert_allclose(block @ block.T, np.eye(H), atol=1e-5)
  bias_ExGxH = np.asarray(lstm.b_Ex4H[...]).reshape(E, 4, H)
  np.testing.assert_array_equal(bias_ExGxH[:, 1], 1.0)
  np.testing.assert_array_equal(bias_ExGxH[:, [0, 2, 3]], 0.0)
  with pytest.raises(ValueError, match="kernel_width"):
    ConvExperts(E, D, H, kernel_width=0, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------
# SequenceMoE.


def _softmax(v):
  v = np.asarray(v, np.float64)
  ex = np.exp(v - v.max(axis=-1, keepdims=True))
  return ex / ex.sum(axis=-1, keepdims=True)


def _make_moe(expert_type, seed=0, **kwargs):
  model = SequenceMoE(expert_type, E, D, H, rngs=nnx.Rngs(seed), **kwargs)
  _randomize(model, seed + 1)
  return model


def reference_router_logits(model, x_BxLxD, lengths_B):
  """[B, E]: router on the mean of each sequence's real tokens (0 for empty rows)."""
  x = np.asarray(x_BxLxD, np.float64)
  logits = []
  for b in range(x.shape[0]):
    summary = x[b, : lengths_B[b]].sum(axis=0) / max(lengths_B[b], 1)
    if model.router_hidden is not None:
      kernel, bias = (
        np.asarray(p[...], np.float64) for p in (model.router_hidden.kernel, model.router_hidden.bias)
      )
      summary = np.maximum(summary @ kernel + bias, 0.0)
    logits.append(summary @ np.asarray(model.router.kernel[...], np.float64))
  return np.array(logits)


def reference_moe(model, x_BxLxD, lengths_B, gating, top_k=None, normalize=True):
  """[B, H] as sum over chosen experts e of gate_e * expert_e(sequence), per sequence."""
  x_ExBxLxD = np.broadcast_to(np.asarray(x_BxLxD), (E, *x_BxLxD.shape))
  experts_ExBxH = reference_experts(
    model.expert_type, _params(model.experts, model.expert_type), x_ExBxLxD, lengths_B
  )
  probs_BxE = _softmax(reference_router_logits(model, x_BxLxD, lengths_B))
  y = np.zeros((x_BxLxD.shape[0], H))
  for b in range(x_BxLxD.shape[0]):
    chosen = range(E) if gating == "dense" else np.argsort(-probs_BxE[b], kind="stable")[:top_k]
    total = sum(probs_BxE[b, e] for e in chosen) if normalize and gating == "top_k" and top_k > 1 else 1.0
    for e in chosen:
      y[b] += probs_BxE[b, e] / total * experts_ExBxH[e, b]
  return y, probs_BxE


@pytest.mark.parametrize(
  "expert_type, router_hidden_size", [("mlp", None), ("gru", 5), ("lstm", None), ("cnn", 5)]
)
def test_dense_gating_matches_softmax_weighted_loop(expert_type, router_hidden_size):
  model = _make_moe(expert_type, gating="dense", router_hidden_size=router_hidden_size)
  x_BxLxD = _inputs(4, (B, L, D))
  y_BxH, aux = _apply(model, x_BxLxD, _mask())
  chex.assert_shape(y_BxH, (B, H))
  expected, probs_BxE = reference_moe(model, x_BxLxD, LENGTHS_B, "dense")
  np.testing.assert_allclose(y_BxH, expected, rtol=1e-5, atol=1e-5)

  # Statistics over the sequences with a real token, each assigned to its argmax expert.
  real = [b for b in range(B) if LENGTHS_B[b] > 0]
  fraction_E = np.array([sum(np.argmax(probs_BxE[b]) == e for b in real) / len(real) for e in range(E)])
  mean_prob_E = probs_BxE[real].mean(axis=0)
  chex.assert_shape(aux.expert_fraction_E, (E,))
  np.testing.assert_allclose(aux.expert_fraction_E, fraction_E, atol=1e-6)
  np.testing.assert_allclose(aux.load_balancing_loss, E * np.sum(fraction_E * mean_prob_E), rtol=1e-5)
  logits_BxE = reference_router_logits(model, x_BxLxD, LENGTHS_B)
  log_z = [math.log(np.exp(logits_BxE[b]).sum()) for b in real]
  np.testing.assert_allclose(aux.router_z_loss, np.mean(np.square(log_z)), rtol=1e-5)
  entropy = np.mean([-np.sum(probs_BxE[b] * np.log(probs_BxE[b])) for b in real])
  np.testing.assert_allclose(aux.router_entropy, entropy, rtol=1e-5)
  assert float(aux.dropped_fraction) == 0.0


def test_top_k_matches_loop_and_equals_dense_at_k_equals_e():
  x_BxLxD = _inputs(5, (B, L, D))
  mask_BxL = _mask()
  dense = _make_moe("cnn", gating="dense")
  full = _make_moe("cnn", gating="top_k", top_k=E, normalize_gates=False)
  chex.assert_trees_all_equal(nnx.state(dense, nnx.Param), nnx.state(full, nnx.Param))
  np.testing.assert_allclose(
    _apply(full, x_BxLxD, mask_BxL)[0], _apply(dense, x_BxLxD, mask_BxL)[0], rtol=1e-6, atol=1e-6
  )

  for top_k, normalize in ((1, True), (2, True), (2, False)):
    model = _make_moe("cnn", gating="top_k", top_k=top_k, normalize_gates=normalize)
    y_BxH, aux = _apply(model, x_BxLxD, mask_BxL)
    expected, _ = reference_moe(model, x_BxLxD, LENGTHS_B, "top_k", top_k, normalize)
    np.testing.assert_allclose(y_BxH, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jnp.sum(aux.expert_fraction_E), 1.0, rtol=1e-6)


@pytest.mark.parametrize("expert_type, gating", [("gru", "dense"), ("lstm", "top_k")])
def test_gradients_reach_router_and_experts(expert_type, gating):
  model = _make_moe(expert_type, gating=gating, top_k=1, router_hidden_size=5)
  x_BxLxD = _inputs(6, (B, L, D))
  mask_BxL = _mask()

  def loss(module):
    y_BxH, aux = module(x_BxLxD, mask_BxL)
    return jnp.mean(y_BxH**2) + 0.01 * aux.load_balancing_loss + 0.001 * aux.router_z_loss

  grads = nnx.jit(nnx.grad(loss))(model)
  chex.assert_tree_all_finite(grads)
  for leaf in (grads.router.kernel, grads.router_hidden.kernel):
    assert np.any(np.asarray(leaf[...]) != 0)
  if gating == "dense":
    used_E = np.ones(E, bool)
  else:
    # Top-1: only the experts some real sequence picked get a task gradient.
    used_E = np.asarray(_apply(model, x_BxLxD, mask_BxL)[1].expert_fraction_E) > 0
  for name in SEQUENCE_EXPERT_PARAMS_BY_TYPE[expert_type]:
    g_E = np.abs(np.asarray(getattr(grads.experts, name)[...])).reshape(E, -1).sum(axis=1)
    np.testing.assert_array_equal(g_E > 0, used_E, err_msg=name)


def test_moe_jit_padding_dropout_and_validation():
  model = _make_moe("lstm", gating="top_k", top_k=2, dropout_rate=0.5)
  x_BxLxD = _inputs(7, (B, L, D))
  mask_BxL = _mask()
  y_BxH, aux = model(x_BxLxD, mask_BxL)
  jitted = _apply(model, x_BxLxD, mask_BxL)
  chex.assert_trees_all_close(jitted, (y_BxH, aux), rtol=1e-6, atol=1e-6)

  garbage_BxLxD = jnp.where(mask_BxL[..., None], x_BxLxD, jnp.nan)
  chex.assert_trees_all_equal(_apply(model, garbage_BxLxD, mask_BxL), jitted)

  dropped_BxH, _ = model(x_BxLxD, mask_BxL, deterministic=False, rngs=nnx.Rngs(dropout=0))
  dropped_BxH = np.asarray(dropped_BxH)
  zeroed = dropped_BxH == 0
  assert zeroed.any() and not zeroed.all()
  np.testing.assert_allclose(dropped_BxH[~zeroed], 2.0 * np.asarray(y_BxH)[~zeroed], rtol=1e-6)

  with pytest.raises(ValueError, match="expert_type"):
    SequenceMoE("transformer", E, D, H, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="gating"):
    SequenceMoE("mlp", E, D, H, gating="sparse", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="top_k"):
    SequenceMoE("mlp", E, D, H, gating="top_k", top_k=E + 1, rngs=nnx.Rngs(0))
