"""The shared residual block and the feed-forward protocol (`tmoe_jax.models.blocks`)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tmoe_jax.attention import causal_mask
from tmoe_jax.errors import ConfigError
from tmoe_jax.models import blocks
from tmoe_jax.models.language_model import LanguageModelConfig
from tmoe_jax.models.transformer import Transformer, TransformerConfig
from tmoe_jax.moe.smoe import SingleMixtureOfExperts

B, L, D = 2, 6, 8


def _lm_settings(ffn: str, **fields) -> LanguageModelConfig:
  values = {"vocab_size": 11, "d_model": D, "num_heads": 2, "num_layers": 1, "d_ff": 8, "ffn": ffn}
  values.update({"num_experts": 4, "top_k": 2, "smoe_keep_rate": 0.5, **fields})
  return LanguageModelConfig.from_flat(**values)


@pytest.mark.parametrize("kind", blocks.FEED_FORWARDS)
def test_every_feed_forward_kind_has_the_one_call(kind):
  """Each builder's layer takes (x, token_mask, deterministic, rngs, step, drop_tokens) -> (y, aux)."""
  settings = _lm_settings(kind)
  layer = blocks.FEED_FORWARD_BUILDERS[kind](settings, 8, 0.0, 0, None, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (B, L, D))
  mask = jnp.ones((B, L), bool).at[1, 4:].set(False)
  y, aux = layer(x, mask, deterministic=True, rngs=None, step=3, drop_tokens=False)
  chex.assert_shape(y, (B, L, D))
  chex.assert_tree_all_finite(y)
  assert (aux is None) == (kind == "dense")
  if aux is not None:
    chex.assert_shape(aux.expert_fraction_E, (4,))


def test_an_unknown_feed_forward_kind_is_refused_by_name():
  with pytest.raises(ValueError, match="feed-forward kind must be one of"):
    blocks.build_block(_lm_settings("dense"), 0, kind="sparse", hidden_width=8, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_cached_decoding_equals_the_full_causal_block(kind):
  """`decode_step` position by position gives the outputs of one causal `__call__` (no dropout)."""
  block = blocks.build_block(_lm_settings(kind), 0, kind=kind, hidden_width=8, rngs=nnx.Rngs(2))
  x_BxLxD = jax.random.normal(jax.random.key(3), (B, L, D))
  # drop_tokens=False in decoding: give the full pass enough capacity to drop nothing either.
  full, _ = block(x_BxLxD, causal_mask(L), deterministic=True, rngs=None)
  cache = block.init_cache(B, L, jnp.float32)
  steps = []
  for position in range(L):
    y_Bx1xD, cache = block.decode_step(x_BxLxD[:, position : position + 1], cache, position)
    steps.append(y_Bx1xD)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)


def test_the_transformer_smoe_follows_the_sampling_schedule():
  """The train step reaches the Transformer's sMoE: masks are sampled before `smoe_sample_steps`,
  the router's argmax from then on (so training then matches evaluation without dropout)."""
  config = TransformerConfig.from_flat(
    vocab_size=13,
    d_model=D,
    num_heads=2,
    num_layers=1,
    num_decoder_layers=1,
    d_ff=16,
    dropout_rate=0.0,
    moe_every=1,
    moe_layer="smoe",
    num_experts=8,
    smoe_selection="sample_then_argmax",
    smoe_sample_steps=5,
  )
  model = Transformer(config, rngs=nnx.Rngs(0))
  assert isinstance(model.encoder_layers[0].ffn, SingleMixtureOfExperts)
  # A uniform router: its argmax is mask 0, and sampling picks another for most tokens.
  for layer in (*model.encoder_layers, *model.decoder_layers):
    layer.ffn.router.kernel[...] = layer.ffn.router.kernel[...] * 0.0
  source = jnp.asarray(np.random.default_rng(0).integers(1, 13, size=(4, 7)), jnp.int32)
  target = jnp.asarray(np.random.default_rng(1).integers(1, 13, size=(4, 5)), jnp.int32)
  evaluated, _ = model(source, target, deterministic=True)

  def trained(step):
    logits, _ = model(source, target, deterministic=False, rngs=nnx.Rngs(dropout=7), step=step)
    return logits

  np.testing.assert_allclose(trained(5), evaluated, rtol=1e-6)
  assert np.max(np.abs(np.asarray(trained(0)) - np.asarray(evaluated))) > 1e-3


def test_smoe_settings_are_checked_by_their_key_in_every_model():
  with pytest.raises(ConfigError, match="model.smoe_selection"):
    TransformerConfig.from_flat(vocab_size=5, smoe_selection="sample")
  with pytest.raises(ConfigError, match="model.smoe_keep_rate"):
    _lm_settings("smoe", smoe_keep_rate=0.0)
  # Each model keeps its own defaults: the Transformer's sMoE those of old runs.
  assert TransformerConfig.from_flat(vocab_size=5).smoe.mask_scaling == "keep_rate"
  assert LanguageModelConfig.from_flat(vocab_size=5).smoe.mask_scaling == "mask_mean"


def test_the_old_moe_layer_name_reads_as_the_new_one():
  assert TransformerConfig.from_flat(vocab_size=5, moe_layer="sparse").moe_layer == "moe"
  with pytest.raises(ConfigError, match="model.moe_layer"):
    TransformerConfig.from_flat(vocab_size=5, moe_layer="dense")
