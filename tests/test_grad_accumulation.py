"""Gradient accumulation equals the one-batch update (`tmoe_jax.training.grad_accumulation`).

With dropout and jitter off, N microbatches of whole routing groups must give the
update of the whole batch: the task loss pooled over its tokens, each layer's z-loss
over its tokens and the balancing loss with the whole batch's expert load.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tmoe_jax.models.language_model import LanguageModel, LanguageModelConfig
from tmoe_jax.models.transformer import Transformer, TransformerConfig
from tmoe_jax.tasks.language_model import language_model_loss
from tmoe_jax.tasks.seq2seq import seq2seq_loss
from tmoe_jax.training import grad_accumulation, steps
from tmoe_jax.training.state import create_train_state

BATCH, GROUP = 8, 2
WEIGHTS = steps.LossWeights(load_balancing=0.1, router_z=0.01)


def _seq2seq(dispatch: str):
  config = TransformerConfig.from_flat(
    vocab_size=17,
    d_model=16,
    num_heads=2,
    num_layers=1,
    num_decoder_layers=1,
    d_ff=16,
    dropout_rate=0.0,
    moe_every=1,
    num_experts=4,
    top_k=2,
    capacity_factor=0.5,  # capacity binds: drops must follow the whole batch's groups
    dispatch=dispatch,
    sequences_per_group=GROUP,
  )
  rng = np.random.default_rng(0)
  source = rng.integers(1, 17, size=(BATCH, 7))
  target = rng.integers(1, 17, size=(BATCH, 6))
  # Ragged lengths: microbatches hold different numbers of tokens.
  source[np.arange(BATCH), rng.integers(2, 7, size=BATCH)] = 0
  target[:, 3:] *= (rng.random((BATCH, 3)) < 0.5).astype(target.dtype)
  batch = {
    "source": jnp.asarray(np.where(np.cumsum(source == 0, 1) > 0, 0, source), jnp.int32),
    "decoder_input": jnp.asarray(np.concatenate([np.ones((BATCH, 1)), target[:, :-1]], 1), jnp.int32),
    "target": jnp.asarray(target, jnp.int32),
  }
  return Transformer(config, rngs=nnx.Rngs(0)), batch, seq2seq_loss


def _language_model(dispatch: str):
  config = LanguageModelConfig.from_flat(
    vocab_size=13,
    d_model=16,
    num_heads=2,
    num_layers=2,
    d_ff=16,
    ffn="moe",
    max_length=16,
    num_experts=4,
    top_k=2,
    capacity_factor=0.5,
    dispatch=dispatch,
    sequences_per_group=GROUP,
  )
  tokens = np.random.default_rng(1).integers(1, 13, size=(BATCH, 9))
  tokens[:3, 6:] = 0  # padded windows: microbatches differ in token count
  batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}
  return LanguageModel(config, rngs=nnx.Rngs(0)), batch, language_model_loss


def _step(model, loss_fn, microbatches):
  # SGD: the update is linear in the gradient. (Adam's first step is lr * sign(g) for every
  # element, so gradients that are 0 up to rounding, as of attention key biases, would
  # compare their noise.)
  optimizer = optax.sgd(0.5)
  graphdef, state = create_train_state(model, optimizer, seed=0)
  step = jax.jit(
    functools.partial(
      steps.train_step,
      graphdef=graphdef,
      optimizer=optimizer,
      schedule=optax.constant_schedule(0.5),
      loss_weights=WEIGHTS,
      loss_fn=loss_fn,
      microbatches=microbatches,
      group_rows=GROUP,
    )
  )
  return state, step


@pytest.mark.parametrize(
  "build,dispatch,microbatches",
  [(_seq2seq, "capacity", 4), (_language_model, "capacity", 2), (_language_model, "dropless", 4)],
  ids=["seq2seq-capacity", "language_model-capacity", "language_model-dropless"],
)
def test_microbatches_give_the_one_batch_update(build, dispatch, microbatches):
  model, batch, loss_fn = build(dispatch)
  state, one_batch = _step(model, loss_fn, 1)
  expected_state, expected = one_batch(state, batch)
  state, accumulated = _step(model, loss_fn, microbatches)
  new_state, metrics = accumulated(state, batch)
  for name in ("loss", "aux_loss", "load_balancing_loss", "router_z_loss", "grad_norm", "expert_fraction"):
    np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=name)
  np.testing.assert_allclose(metrics["dropped_fraction"], expected["dropped_fraction"], atol=1e-6)
  assert float(metrics["num_tokens"]) == float(expected["num_tokens"])
  chex.assert_trees_all_close(new_state.params, expected_state.params, rtol=1e-5, atol=1e-6)
  if dispatch == "capacity":
    assert float(jnp.max(expected["dropped_fraction"])) > 0.05  # capacity bound in this test


def test_microbatches_hold_whole_routing_groups_spread_over_the_batch():
  batch = {"x": jnp.arange(12)}
  split = grad_accumulation.split_microbatches(batch, 2, group_rows=3)
  np.testing.assert_array_equal(split["x"], [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11]])
  with pytest.raises(ValueError, match="whole routing groups"):
    grad_accumulation.split_microbatches(batch, 4, group_rows=2)


def test_python_m_train_accumulates_to_the_same_losses(tmp_path):
  """`--config.train.grad_accum_steps=4` on a 2-device mesh logs the one-batch run's losses."""
  from mesh_equality import _train

  no_dropout = ("--config.model.dropout_rate=0", "--config.train.num_steps=4")
  reference = _train(tmp_path / "one", 1, 1, *no_dropout)
  accumulated = _train(tmp_path / "four", 2, 1, *no_dropout, "--config.train.grad_accum_steps=4")
  assert sorted(reference) == [1, 2, 3, 4]
  for step, row in reference.items():
    for name in ("loss", "aux_loss", "grad_norm"):
      np.testing.assert_allclose(accumulated[step][name], row[name], rtol=1e-5, err_msg=f"{name} {step}")


def test_a_plan_that_cannot_keep_the_update_is_refused_by_name():
  import ml_collections

  import configs.tmoe
  from tmoe_jax.errors import ConfigError
  from tmoe_jax.parallel.mesh import make_mesh

  mesh = make_mesh(1, 1)
  config = configs.tmoe.get_config()
  config.train.grad_accum_steps = 4
  assert grad_accumulation.microbatch_plan(config, mesh) == (4, 4)
  for field, change in [
    ("train.grad_accum_steps", {"train": {"grad_accum_steps": 5}}),
    ("model.sequences_per_group", {"model": {"sequences_per_group": 3}}),
    ("model.sequences_per_group", {"model": {"sequences_per_group": 0}}),
    ("model.expert_bias_rate", {"model": {"expert_bias_rate": 0.01}}),
  ]:
    changed = ml_collections.ConfigDict(config.to_dict())
    changed.update_from_flattened_dict(
      {f"{section}.{key}": value for section, values in change.items() for key, value in values.items()}
    )
    with pytest.raises(ConfigError, match=field):
      grad_accumulation.microbatch_plan(changed, mesh)
