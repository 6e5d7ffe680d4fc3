"""MoEFeedForward's variants wired through the config: shared experts, expert bias, expert choice, BPR, jitter."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tmoe_jax.errors import ConfigError
from tmoe_jax.models.transformer import TransformerConfig
from tmoe_jax.moe.layer import ExpertBias, MoEFeedForward
from tmoe_jax.moe.settings import MoEConfig

BASE = MoEConfig(num_experts=4, top_k=2, d_model=8, d_ff=16, eval_capacity_factor=4.0)


def inputs(batch=2, length=5, d_model=8, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, length, d_model))


def expert_mlp(layer, e, x):
  experts = layer.experts
  hidden = jax.nn.relu(x @ experts.w_in_ExDxF[e] + experts.b_in_ExF[e])
  return hidden @ experts.w_out_ExFxD[e] + experts.b_out_ExD[e]


def test_shared_experts_add_a_dense_ffn_to_the_routed_output():
  layer = MoEFeedForward(dataclasses.replace(BASE, num_shared_experts=2), rngs=nnx.Rngs(0))
  x = inputs()
  y, _ = layer(x)
  routed_only = MoEFeedForward(BASE, rngs=nnx.Rngs(0))
  routed_only.router, routed_only.experts = layer.router, layer.experts
  y_routed, _ = routed_only(x)
  chex.assert_trees_all_close(y, y_routed + layer.shared_experts(x), atol=1e-5)
  chex.assert_shape(layer.shared_experts.hidden.kernel[...], (8, 32))  # 2 experts of width 16


def test_expert_bias_is_state_updated_in_training_only():
  layer = MoEFeedForward(dataclasses.replace(BASE, expert_bias_rate=0.1), rngs=nnx.Rngs(0))
  _, params, rest = nnx.split(layer, nnx.Param, ...)
  assert "expert_bias" not in params and "expert_bias" in rest
  x = inputs()
  layer(x, deterministic=True)
  np.testing.assert_array_equal(layer.expert_bias[...], np.zeros(4))
  _, aux = layer(x, deterministic=False)
  fraction = np.asarray(aux.expert_fraction_E)
  expected = 0.1 * np.sign(fraction.mean() - fraction)
  np.testing.assert_allclose(layer.expert_bias[...], expected, atol=1e-7)
  assert isinstance(layer.expert_bias, ExpertBias)


def test_expert_bias_balances_a_skewed_router_over_steps():
  """A router that sends everything to expert 0 gets balanced by the bias alone."""
  config = dataclasses.replace(BASE, top_k=1, expert_bias_rate=0.05, capacity_factor=8.0)
  layer = MoEFeedForward(config, rngs=nnx.Rngs(0))
  # Token-dependent logits with a large common lead for expert 0.
  kernel = 0.5 * jax.random.normal(jax.random.PRNGKey(1), (8, 4))
  layer.router.kernel[...] = kernel.at[0, 0].set(1.0)
  x = inputs(batch=8, length=16).at[..., 0].add(4.0)
  _, aux = layer(x, deterministic=False)
  assert float(aux.expert_fraction_E[0]) > 0.9
  for _ in range(60):
    _, aux = layer(x, deterministic=False)
  assert float(jnp.max(aux.expert_fraction_E)) < 0.5, aux.expert_fraction_E


def test_expert_choice_layer_equals_a_loop_over_experts_and_their_top_tokens():
  config = dataclasses.replace(BASE, router="expert_choice", top_k=1, capacity_factor=1.0)
  layer = MoEFeedForward(config, rngs=nnx.Rngs(1))
  x = inputs(batch=2, length=4)
  y, aux = layer(x, deterministic=False)
  x_TxD = np.asarray(x).reshape(8, 8)
  probs = np.asarray(jax.nn.softmax(layer.router(jnp.asarray(x_TxD)), axis=-1))
  capacity = config.capacity(8, training=True)  # ceil(1.0 * 8 * 1 / 4) = 2
  assert capacity == 2
  expected = np.zeros_like(x_TxD)
  for e in range(4):
    for t in np.argsort(-probs[:, e], kind="stable")[:capacity]:
      expected[t] += probs[t, e] * np.asarray(expert_mlp(layer, e, jnp.asarray(x_TxD[t])))
  np.testing.assert_allclose(np.asarray(y).reshape(8, 8), expected, atol=1e-5)
  np.testing.assert_allclose(aux.expert_fraction_E, np.full(4, 0.25))
  assert float(aux.load_balancing_loss) == 0.0


def test_batch_prioritized_equals_plain_routing_with_ample_capacity():
  x = inputs()
  plain = MoEFeedForward(BASE, rngs=nnx.Rngs(2))
  prioritized = MoEFeedForward(dataclasses.replace(BASE, batch_prioritized=True), rngs=nnx.Rngs(2))
  chex.assert_trees_all_close(plain(x)[0], prioritized(x)[0], atol=1e-6)


def test_jitter_needs_a_key_in_training_and_is_off_at_evaluation():
  layer = MoEFeedForward(dataclasses.replace(BASE, router_jitter=0.5), rngs=nnx.Rngs(0))
  x = inputs()
  with pytest.raises(ValueError, match="router_jitter"):
    layer(x, deterministic=False)
  first, _ = layer(x, deterministic=False, rngs=nnx.Rngs(dropout=3))
  again, _ = layer(x, deterministic=False, rngs=nnx.Rngs(dropout=3))
  chex.assert_trees_all_equal(first, again)
  plain = MoEFeedForward(BASE, rngs=nnx.Rngs(0))
  chex.assert_trees_all_close(layer(x)[0], plain(x)[0])


def test_expert_choice_in_the_decoder_is_refused():
  with pytest.raises(ConfigError, match="model.router: expert_choice is not causal"):
    TransformerConfig.from_flat(vocab_size=10, router="expert_choice", moe_every=1)
  # Encoder-only MoE (moe_every beyond the decoder depth) is fine.
  TransformerConfig.from_flat(
    vocab_size=10, router="expert_choice", moe_every=3, num_layers=3, num_decoder_layers=2
  )


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("router", "soft", "model.router: must be one of"),
    ("softmax_order", "during", "model.softmax_order: must be one of"),
    ("router_jitter", 1.5, "model.router_jitter: must be in [0, 1)"),
    ("expert_bias_rate", -1.0, "model.expert_bias_rate: must be >= 0"),
    ("num_shared_experts", -1, "model.num_shared_experts: must be >= 0"),
  ],
)
def test_bad_variant_settings_name_the_field(field, value, message):
  with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
    dataclasses.replace(BASE, **{field: value})


@pytest.mark.parametrize("moe_layer", ["moe", "smoe"])
def test_transformer_builds_each_moe_layer_kind_and_trains_one_step(moe_layer):
  import optax

  import configs.tmoe
  from tmoe_jax.models.transformer import Transformer
  from tmoe_jax.moe.smoe import SingleMixtureOfExperts
  from tmoe_jax.tasks.seq2seq import seq2seq_loss
  from tmoe_jax.training import steps
  from tmoe_jax.training.state import create_train_state

  model_config = configs.tmoe.get_config().model
  model_config.update(d_model=16, num_heads=2, d_ff=16, num_layers=1, num_decoder_layers=1, moe_every=1)
  model_config.moe_layer = moe_layer
  config = TransformerConfig.from_config(model_config, vocab_size=12)
  model = Transformer(config, rngs=nnx.Rngs(0))
  expected = SingleMixtureOfExperts if moe_layer == "smoe" else MoEFeedForward
  assert isinstance(model.encoder_layers[0].ffn, expected)
  optimizer = optax.adam(1e-2)
  graphdef, state = create_train_state(model, optimizer, seed=0)
  source = jnp.array([[4, 5, 6, 2], [7, 8, 2, 0]])
  target = jnp.array([[9, 10, 2], [11, 2, 0]])
  batch = {"source": source, "decoder_input": jnp.array([[1, 9, 10], [1, 11, 2]]), "target": target}
  step = jax.jit(
    lambda s, b: steps.train_step(
      s,
      b,
      graphdef=graphdef,
      optimizer=optimizer,
      schedule=lambda _: 1e-2,
      loss_weights=steps.LossWeights(),
      loss_fn=seq2seq_loss,
    )
  )
  losses = []
  for _ in range(5):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
  chex.assert_shape(metrics["expert_fraction"], (2, 4))


def test_gated_experts_compute_swiglu_per_expert():
  from tmoe_jax.moe.experts import GatedMlpExperts

  experts = GatedMlpExperts(3, 4, 6, activation="silu", rngs=nnx.Rngs(0))
  x_ExCxD = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 4))
  y = experts(x_ExCxD)
  for e in range(3):
    x = np.asarray(x_ExCxD[e], np.float64)
    gate = x @ np.asarray(experts.w_gate_ExDxF[e], np.float64)
    silu = gate / (1.0 + np.exp(-gate))
    expected = (silu * (x @ np.asarray(experts.w_up_ExDxF[e], np.float64))) @ np.asarray(
      experts.w_down_ExFxD[e], np.float64
    )
    np.testing.assert_allclose(np.asarray(y[e]), expected, rtol=1e-5, atol=1e-5)
  layer = MoEFeedForward(dataclasses.replace(BASE, expert_type="gated", activation="silu"), rngs=nnx.Rngs(0))
  assert isinstance(layer.experts, GatedMlpExperts)
  chex.assert_shape(layer(inputs())[0], (2, 5, 8))
  with pytest.raises(ConfigError, match="model.expert_type"):
    dataclasses.replace(BASE, expert_type="lstm")


def test_dropless_dispatch_equals_capacity_dispatch_with_ample_capacity_and_never_drops():
  x = inputs(batch=2, length=6)
  ample = dataclasses.replace(BASE, capacity_factor=8.0)
  capacity_layer = MoEFeedForward(ample, rngs=nnx.Rngs(4))
  dropless_layer = MoEFeedForward(
    dataclasses.replace(BASE, dispatch="dropless", capacity_factor=0.25), rngs=nnx.Rngs(4)
  )
  y_capacity, _ = capacity_layer(x, deterministic=False)
  y_dropless, aux = dropless_layer(x, deterministic=False)
  chex.assert_trees_all_close(y_dropless, y_capacity, atol=1e-5)
  assert float(aux.dropped_fraction) == 0.0
  grads = nnx.grad(lambda layer: jnp.sum(layer(x, deterministic=False)[0] ** 2))(dropless_layer)
  assert float(jnp.abs(grads.router.kernel[...]).sum()) > 0
  assert float(jnp.abs(grads.experts.w_in_ExDxF[...]).sum()) > 0
  with pytest.raises(ConfigError, match="model.dispatch"):
    dataclasses.replace(BASE, dispatch="dropless", router="expert_choice")
