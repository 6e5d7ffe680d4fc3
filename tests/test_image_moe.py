"""Tests for the image MoE (`tmoe_jax.models.image_moe`) against NumPy references and hand-computed values."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tmoe_jax.errors import ConfigError
from tmoe_jax.models import image_moe
from tmoe_jax.models.image_moe import ImageMoE, ImageMoEConfig
from tmoe_jax.moe import guided

RTOL = 1e-5
ATOL = 1e-5


def np_softmax(x, axis=-1):
  z = np.exp(x - x.max(axis=axis, keepdims=True))
  return z / z.sum(axis=axis, keepdims=True)


def tiny_config(**overrides) -> ImageMoEConfig:
  values = {
    "image_height": 6,
    "image_width": 6,
    "num_classes": 4,
    "num_experts": 3,
    "hidden_dims": (5, 7),
    "cnn_channels": (2, 3),
    "cnn_dense_dim": 6,
    "gate_temperature": 0.5,
  }
  values.update(overrides)
  return ImageMoEConfig(**values)


def images(batch=4, height=6, width=6, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, height, width)), jnp.float32)


def np_mlp(layers, x_BxP):
  """One expert's MLP, layer by layer (ReLU between layers)."""
  h = x_BxP
  for i, (w, b) in enumerate(layers):
    h = h @ w + b
    if i < len(layers) - 1:
      h = np.maximum(h, 0.0)
  return h


def test_gate_is_softmax_of_logits_over_temperature():
  model = ImageMoE(tiny_config(gate_temperature=0.5), rngs=nnx.Rngs(params=0))
  x = images()
  w = np.asarray(model.gate.logits.kernel[...])
  b = np.asarray(model.gate.logits.bias[...])
  expected = np_softmax((np.asarray(x).reshape(4, -1) @ w + b) / 0.5)
  output = model(x)
  np.testing.assert_allclose(np.asarray(output.router_probs_BxE), expected, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.asarray(output.gates_BxE), expected, rtol=RTOL, atol=ATOL)  # dense gating
  assert float(model.gate.temperature) == pytest.approx(0.5)


def test_temperature_is_learned_only_when_asked():
  learned = ImageMoE(tiny_config(learn_temperature=True), rngs=nnx.Rngs(params=0))
  fixed = ImageMoE(tiny_config(learn_temperature=False), rngs=nnx.Rngs(params=0))
  assert isinstance(learned.gate.log_temperature, nnx.Param)
  assert not isinstance(fixed.gate.log_temperature, nnx.Param)
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(images()).log_probs_BxC[:, 0])))(learned)
  assert float(jnp.abs(grads.gate.log_temperature[...])) > 0


@pytest.mark.parametrize("combine", ["probabilities", "logits"])
def test_output_is_the_gate_weighted_mixture(combine):
  model = ImageMoE(tiny_config(combine=combine), rngs=nnx.Rngs(params=1))
  output = model(images())
  logits_ExBxC = np.asarray(output.expert_logits_ExBxC, np.float64)
  gates_BxE = np.asarray(output.router_probs_BxE, np.float64)
  if combine == "probabilities":
    expected = np.log(np.einsum("be,ebc->bc", gates_BxE, np_softmax(logits_ExBxC)))
  else:
    expected = np.log(np_softmax(np.einsum("be,ebc->bc", gates_BxE, logits_ExBxC)))
  np.testing.assert_allclose(np.asarray(output.log_probs_BxC), expected, rtol=RTOL, atol=ATOL)


def test_combine_by_hand():
  # Two experts, one example, two classes: expert logits give p_0 = (1/2, 1/2), p_1 = (1/5, 4/5).
  logits_ExBxC = jnp.asarray([[[0.0, 0.0]], [[0.0, math.log(4.0)]]])
  log_gates_BxE = jnp.log(jnp.asarray([[0.25, 0.75]]))
  mixture = image_moe.combine_experts(logits_ExBxC, log_gates_BxE, "probabilities")
  np.testing.assert_allclose(np.exp(mixture), [[0.25 * 0.5 + 0.75 * 0.2, 0.25 * 0.5 + 0.75 * 0.8]], rtol=1e-6)
  weighted = image_moe.combine_experts(logits_ExBxC, log_gates_BxE, "logits")
  mixed_logit = 0.75 * math.log(4.0)  # class 1; class 0 is 0
  np.testing.assert_allclose(np.exp(weighted), [np_softmax(np.array([0.0, mixed_logit]))], rtol=1e-6)


def test_stacked_mlp_experts_equal_each_expert_alone():
  model = ImageMoE(tiny_config(), rngs=nnx.Rngs(params=2))
  x = images()
  stacked = np.asarray(model.experts(x))
  layers = [(np.asarray(layer.w_ExIxO[...]), np.asarray(layer.b_ExO[...])) for layer in model.experts.layers]
  assert [w.shape for w, _ in layers] == [(3, 36, 5), (3, 5, 7), (3, 7, 4)]
  for e in range(3):
    alone = np_mlp([(w[e], b[e]) for w, b in layers], np.asarray(x).reshape(4, -1))
    np.testing.assert_allclose(stacked[e], alone, rtol=RTOL, atol=ATOL)


def np_conv_same(x_BxHxWxCi, kernel_SxSxCixCo, bias_Co, stride):
  """Direct 'SAME' cross-correlation, loop over output pixels and kernel taps (TensorFlow/XLA padding)."""
  batch, height, width, _ = x_BxHxWxCi.shape
  size = kernel_SxSxCixCo.shape[0]
  out_h, out_w = -(-height // stride), -(-width // stride)
  pad_h = max((out_h - 1) * stride + size - height, 0)
  pad_w = max((out_w - 1) * stride + size - width, 0)
  out = np.zeros((batch, out_h, out_w, kernel_SxSxCixCo.shape[-1])) + bias_Co
  for r in range(out_h):
    for c in range(out_w):
      for i in range(size):
        for j in range(size):
          y, x = r * stride + i - pad_h // 2, c * stride + j - pad_w // 2
          if 0 <= y < height and 0 <= x < width:
            out[:, r, c] += x_BxHxWxCi[:, y, x] @ kernel_SxSxCixCo[i, j]
  return out


def np_max_pool(x_BxHxWxC):
  batch, height, width, channels = x_BxHxWxC.shape
  x = x_BxHxWxC[:, : height // 2 * 2, : width // 2 * 2]
  return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


@pytest.mark.parametrize(
  "stride, size, shape", [(1, 3, (7, 5)), (2, 3, (7, 5)), (2, 5, (6, 6)), (1, 4, (5, 6))]
)
def test_conv2d_same_matches_direct_convolution(stride, size, shape):
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, *shape, 3)).astype(np.float32)
  kernel = rng.standard_normal((size, size, 3, 4)).astype(np.float32)
  bias = rng.standard_normal(4).astype(np.float32)
  ours = np.asarray(
    image_moe.conv2d_same(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias), stride=stride)
  )
  np.testing.assert_allclose(ours, np_conv_same(x, kernel, bias, stride), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("downsample", ["max_pool", "stride"])
@pytest.mark.parametrize("shape", [(6, 6), (7, 5)])
def test_stacked_cnn_experts_equal_each_expert_alone(downsample, shape):
  config = tiny_config(
    expert_type="cnn", cnn_downsample=downsample, image_height=shape[0], image_width=shape[1]
  )
  model = ImageMoE(config, rngs=nnx.Rngs(params=4))
  x = images(3, *shape)
  stacked = np.asarray(model.experts(x))
  assert stacked.shape == (3, 3, 4)  # [E, B, C]
  experts = model.experts
  assert experts.dense.w_ExIxO.shape == (3, config.cnn_flat_dim, 6)
  for e in range(3):
    h = np.asarray(x)[..., None]
    for conv in experts.convs:
      kernel, bias = (np.asarray(a)[e] for a in conv.weights)
      if downsample == "max_pool":
        h = np_max_pool(np.maximum(np_conv_same(h, kernel, bias, 1), 0.0))
      else:
        h = np.maximum(np_conv_same(h, kernel, bias, 2), 0.0)
    flat = h.reshape(len(h), -1)
    assert flat.shape[1] == config.cnn_flat_dim
    alone = np_mlp(
      [(np.asarray(w)[e], np.asarray(b)[e]) for w, b in (experts.dense.weights, experts.output.weights)], flat
    )
    np.testing.assert_allclose(stacked[e], alone, rtol=1e-4, atol=1e-4)


def test_cnn_flat_dim_for_odd_sizes():
  # 28 -> 14 -> 7 either way; 7x5 pools to 3x2 -> 1x1, strides to 4x3 -> 2x2.
  assert tiny_config(image_height=28, image_width=28, expert_type="cnn").cnn_flat_dim == 7 * 7 * 3
  assert tiny_config(image_height=7, image_width=5, expert_type="cnn").cnn_flat_dim == 1 * 1 * 3
  assert (
    tiny_config(image_height=7, image_width=5, expert_type="cnn", cnn_downsample="stride").cnn_flat_dim
    == 2 * 2 * 3
  )


def test_top_k_keeps_the_k_largest_gates_renormalised_and_gradients_finite():
  model = ImageMoE(tiny_config(num_experts=4, top_k=2), rngs=nnx.Rngs(params=5))
  x = images()
  output = model(x)
  probs = np.asarray(output.router_probs_BxE)
  top2 = np.argsort(-probs, axis=1)[:, :2]
  expected = np.zeros_like(probs)
  for b in range(len(probs)):
    expected[b, top2[b]] = probs[b, top2[b]] / probs[b, top2[b]].sum()
  np.testing.assert_allclose(np.asarray(output.gates_BxE), expected, rtol=RTOL, atol=1e-6)
  np.testing.assert_array_equal(np.sort(np.asarray(output.expert_indices_BxK), 1), np.sort(top2, 1))
  grads = nnx.jit(nnx.grad(lambda m: -jnp.mean(m(x).log_probs_BxC[:, 0])))(model)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(nnx.state(grads)))


def test_guided_masking_routes_each_image_to_its_owner():
  model = ImageMoE(tiny_config(), rngs=nnx.Rngs(params=6))
  x = images()
  owner = jnp.asarray([2, 0, 1, 2])
  output = model(x, owner_expert_B=owner)
  np.testing.assert_array_equal(np.asarray(output.gates_BxE), np.eye(3)[[2, 0, 1, 2]])
  owner_log_probs = jax.nn.log_softmax(output.expert_logits_ExBxC[owner, jnp.arange(4)], axis=-1)
  np.testing.assert_allclose(
    np.asarray(output.log_probs_BxC), np.asarray(owner_log_probs), rtol=RTOL, atol=ATOL
  )
  # The learned gate is reported unmasked.
  np.testing.assert_allclose(
    np.asarray(output.router_probs_BxE), np.asarray(model(x).router_probs_BxE), rtol=RTOL
  )
  # Only the owner expert gets gradient from the task loss.
  grads = nnx.jit(nnx.grad(lambda m: -jnp.sum(m(x[:1], owner_expert_B=owner[:1]).log_probs_BxC[:, 0])))(model)
  w_last = np.asarray(grads.experts.layers[2].w_ExIxO[...])
  assert np.abs(w_last[2]).sum() > 0 and np.abs(w_last[[0, 1]]).sum() == 0
  assert np.abs(np.asarray(grads.gate.logits.kernel[...])).sum() == 0


def test_guided_masking_with_top_2_keeps_owner_and_best_other():
  model = ImageMoE(tiny_config(num_experts=4, top_k=2), rngs=nnx.Rngs(params=7))
  x = images()
  owner = jnp.asarray([0, 1, 2, 3])
  output = model(x, owner_expert_B=owner)
  probs = np.asarray(output.router_probs_BxE)
  for b in range(4):
    others = [e for e in range(4) if e != b]
    best_other = others[int(np.argmax(probs[b, others]))]
    expected = np.zeros(4)
    expected[[b, best_other]] = probs[b, [b, best_other]] / probs[b, [b, best_other]].sum()
    np.testing.assert_allclose(np.asarray(output.gates_BxE[b]), expected, rtol=RTOL, atol=1e-6)


def set_gate_logits(model: ImageMoE, logits_E) -> None:
  """Makes the gate output `logits_E` (already divided by T) for every image: zero weights, bias = logits * T."""
  model.gate.logits.kernel[...] = jnp.zeros_like(model.gate.logits.kernel[...])
  model.gate.logits.bias[...] = jnp.asarray(logits_E, jnp.float32) * model.gate.temperature


def test_guided_gate_losses_by_hand():
  model = ImageMoE(tiny_config(gate_temperature=2.0), rngs=nnx.Rngs(params=8))
  # Gate probabilities 1/8, 2/8, 5/8 for every image; owner expert 2.
  set_gate_logits(model, [0.0, math.log(2.0), math.log(5.0)])
  output = model(images(2))
  np.testing.assert_allclose(np.asarray(output.router_probs_BxE), [[1 / 8, 2 / 8, 5 / 8]] * 2, rtol=1e-6)
  owner = jnp.asarray([2, 2])
  ce = guided.guided_gate_loss(output.router_logits_BxE, owner, "cross_entropy")
  bce = guided.guided_gate_loss(output.router_logits_BxE, owner, "binary_cross_entropy")
  assert float(ce) == pytest.approx(-math.log(5 / 8), rel=1e-5)
  assert float(bce) == pytest.approx(-(math.log(7 / 8) + math.log(6 / 8) + math.log(5 / 8)) / 3, rel=1e-5)


def test_dropout_only_with_a_key():
  model = ImageMoE(tiny_config(dropout_rate=0.5), rngs=nnx.Rngs(params=9))
  x = images()
  a, b = model(x).log_probs_BxC, model(x).log_probs_BxC
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  dropped = model(x, dropout_key=jax.random.PRNGKey(0)).log_probs_BxC
  assert not np.allclose(np.asarray(dropped), np.asarray(a))


def test_routing_aux_counts_top_choices():
  model = ImageMoE(tiny_config(num_experts=4, top_k=2), rngs=nnx.Rngs(params=10))
  output = model(images(8))
  aux = image_moe.routing_aux(output)
  fraction = np.asarray(aux.expert_fraction_E)
  counts = np.bincount(np.asarray(output.expert_indices_BxK).ravel(), minlength=4)
  np.testing.assert_allclose(fraction, counts / 16, rtol=1e-6)
  probs = np.asarray(output.router_probs_BxE)
  entropy = -np.mean(np.sum(probs * np.log(probs), axis=1))
  assert float(aux.router_entropy) == pytest.approx(entropy, rel=1e-5)


def model_section(**overrides) -> dict:
  """The default config's model section as a dict (so a test can give a field a wrong type)."""
  from configs import mnist_moe

  return {**mnist_moe.get_config().model.to_dict(), **overrides}


@pytest.mark.parametrize(
  "overrides, field",
  [
    ({"top_k": 6}, "model.top_k"),
    ({"expert_type": "rnn"}, "model.expert_type"),
    ({"combine": "sum"}, "model.combine"),
    ({"hidden_dims": (256, 0)}, "model.hidden_dims"),
    ({"gate_temperature": 0.0}, "model.gate_temperature"),
    ({"dropout_rate": 1.0}, "model.dropout_rate"),
    ({"cnn_downsample": "avg"}, "model.cnn_downsample"),
    ({"num_experts": "5"}, "model.num_experts"),
  ],
)
def test_config_errors_name_the_field(overrides, field):
  model = model_section(**overrides)
  with pytest.raises(ConfigError, match=field):
    ImageMoEConfig.from_config(model, image_height=28, image_width=28, num_classes=10)


def test_too_many_cnn_stages_for_the_image():
  with pytest.raises(ConfigError, match="model.cnn_channels"):
    tiny_config(expert_type="cnn", cnn_channels=(2, 2, 2), image_height=4, image_width=4)
