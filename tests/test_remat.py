"""Rematerialisation (`model.remat`, applied in `blocks.ResidualBlock`): same step, less kept.

For every policy, on the Transformer and the language model (tiny, an MoE layer, dropout on),
the loss, the gradients and the updated non-parameter state (the expert bias) of a train
step's objective equal those without remat. What the forward pass keeps for the backward
pass is measured as the leaves of `jax.vjp`'s backward function: it falls with "full".
XLA's compiled temp bytes show the saving only on GPU/TPU: on CPU, XLA merges the
recomputation back into the forward pass (the compiled program recomputes nothing), so that
test is skipped there and the jaxpr is checked to hold the checkpoint instead.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.smoe_lm
import configs.tmoe
from tmoe_jax.errors import ConfigError
from tmoe_jax.models.blocks import REMATS
from tmoe_jax.models.language_model import LanguageModel, LanguageModelConfig
from tmoe_jax.models.transformer import Transformer, TransformerConfig
from tmoe_jax.parallel.mesh import make_mesh
from tmoe_jax.tasks.language_model import language_model_loss
from tmoe_jax.tasks.seq2seq import seq2seq_loss
from tmoe_jax.training import steps
from tmoe_jax.training.workdir import KEYS_ADDED_LATER, read_saved_config_json

POLICIES = tuple(r for r in REMATS if r != "none")
L, VOCAB = 6, 12
COMMON = {"vocab_size": VOCAB, "d_model": 16, "num_heads": 2, "d_ff": 16, "num_experts": 4, "top_k": 2}
COMMON.update(dropout_rate=0.2, max_length=8, expert_bias_rate=0.05)


def _transformer(remat: str, *, mesh=None, batch_size=2, **fields):
  """1 encoder + 2 decoder layers, every FFN MoE (the encoder's feeds cross-attention twice)."""
  settings = {
    **COMMON,
    "num_layers": 1,
    "num_decoder_layers": 2,
    "moe_every": 1,
    "attention_dropout_rate": 0.1,
  }
  config = TransformerConfig.from_flat(remat=remat, **{**settings, **fields})
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, VOCAB, (batch_size, L)), jnp.int32)
  batch = {"source": tokens, "decoder_input": tokens[:, ::-1], "target": tokens}
  return Transformer(config, mesh=mesh, rngs=nnx.Rngs(params=0)), batch, seq2seq_loss


def _language_model(remat: str, *, mesh=None, batch_size=2, **fields):
  config = LanguageModelConfig.from_flat(remat=remat, **{**COMMON, "num_layers": 2, "ffn": "moe", **fields})
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, VOCAB, (batch_size, L + 1)), jnp.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  return LanguageModel(config, mesh=mesh, rngs=nnx.Rngs(params=0)), batch, language_model_loss


def _objective(model, batch, loss_fn):
  """(params, the train step's objective: params -> (loss, updated non-parameter state)), as in
  `steps.train_step` (task loss plus the MoE losses; the forward pass may update the expert bias)."""
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  weights = steps.LossWeights()

  def objective(params):
    model = nnx.merge(graphdef, params, model_state, copy=True)
    task_loss, _, auxes = loss_fn(model, batch, nnx.Rngs(dropout=jax.random.key(7)), jnp.int32(3))
    balance, z = steps.moe_losses(auxes)
    loss = task_loss + weights.load_balancing * balance + weights.router_z * z
    return loss, nnx.state(model, nnx.Not(nnx.Param))

  return params, objective


def _loss_grads_state(build, remat: str, *, mesh=None, **fields):
  model, batch, loss_fn = build(remat, mesh=mesh, **fields)
  params, objective = _objective(model, batch, loss_fn)
  (loss, model_state), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
  return loss, grads, model_state


_REFERENCES: dict = {}


def _reference(build, **fields):
  """The results without remat, computed once per model and fields."""
  key = (build.__name__, tuple(sorted(fields.items())))
  if key not in _REFERENCES:
    _REFERENCES[key] = _loss_grads_state(build, "none", **fields)
  return _REFERENCES[key]


def _assert_same(results, reference):
  loss, grads, model_state = results
  ref_loss, ref_grads, ref_state = reference
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  # atol: gradients are O(0.1); the backward pass may add a gradient's terms in another order
  # (~1e-8 apart), which rtol alone cannot allow for the entries that are ~0 (a key bias).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), grads, ref_grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), model_state, ref_state)


def _expert_biases(model_state) -> list[np.ndarray]:
  return [
    np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(model_state)
    if "expert_bias" in jax.tree_util.keystr(path)
  ]


@pytest.mark.parametrize("remat", POLICIES)
def test_transformer_step_is_the_same_with_remat(remat):
  reference = _reference(_transformer)
  # The forward pass did update the expert bias, and it comes out of the checkpointed blocks.
  assert _expert_biases(reference[2]) and all(np.any(bias != 0) for bias in _expert_biases(reference[2]))
  _assert_same(_loss_grads_state(_transformer, remat), reference)


@pytest.mark.parametrize("remat", POLICIES)
def test_language_model_step_is_the_same_with_remat(remat):
  _assert_same(_loss_grads_state(_language_model, remat), _reference(_language_model))


def test_dropless_transformer_step_is_the_same_with_full_remat():
  _assert_same(
    _loss_grads_state(_transformer, "full", dispatch="dropless"),
    _reference(_transformer, dispatch="dropless"),
  )


def test_expert_parallel_language_model_step_is_the_same_with_remat():
  """The MoE layers' shard_map over a (data 2, expert 4) mesh inside the checkpointed blocks."""
  fields = {"sequences_per_group": 1, "batch_size": 8}  # one sequence per device
  results = _loss_grads_state(_language_model, "full", mesh=make_mesh(2, 4), **fields)
  _assert_same(results, _reference(_language_model, **fields))


def test_smoe_sampling_schedule_is_the_same_with_remat():
  """The sMoE draws its masks from `rngs` at the traced `step`: the recomputation draws the same."""
  fields = {"ffn": "smoe", "smoe_selection": "sample_then_argmax", "smoe_sample_steps": 10}
  _assert_same(_loss_grads_state(_language_model, "full", **fields), _reference(_language_model, **fields))


def _backward_residual_bytes(build, remat: str) -> int:
  """Bytes the forward pass keeps for the backward pass: the leaves of `jax.vjp`'s backward function."""
  model, batch, loss_fn = build(remat)
  params, objective = _objective(model, batch, loss_fn)
  kept = jax.eval_shape(lambda p: jax.tree.leaves(jax.vjp(lambda q: objective(q)[0], p)[1]), params)
  return sum(leaf.size * leaf.dtype.itemsize for leaf in kept)


@pytest.mark.parametrize("build", [_transformer, _language_model])
def test_remat_keeps_less_for_the_backward_pass(build):
  kept = {remat: _backward_residual_bytes(build, remat) for remat in REMATS}
  # Full keeps the blocks' inputs only; saving every matmul keeps more than saving the
  # matmuls without batch dimensions, and both less than keeping everything.
  assert kept["full"] < kept["save_dots_no_batch"] < kept["save_dots"] < kept["none"], kept


@pytest.mark.parametrize("build", [_transformer, _language_model])
def test_the_gradient_holds_a_checkpoint_per_block_only_with_remat(build):
  def checkpoints(remat):
    model, batch, loss_fn = build(remat)
    params, objective = _objective(model, batch, loss_fn)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: objective(p)[0]))(params))
    # The primitive prints as `checkpoint` or `remat2` (the JAX version's name): one per block.
    return len(re.findall(r"\b(?:checkpoint|remat\d*)\[", jaxpr))

  model, _, _ = build("none")
  num_blocks = (
    len(model.layers) if build is _language_model else len(model.encoder_layers) + len(model.decoder_layers)
  )
  assert checkpoints("none") == 0
  assert checkpoints("full") == num_blocks


@pytest.mark.skipif(
  jax.default_backend() == "cpu", reason="XLA on CPU merges the recomputation into the forward pass"
)
def test_full_remat_compiles_to_fewer_temp_bytes():
  tokens = jnp.asarray(np.random.default_rng(2).integers(1, VOCAB, (16, 65)), jnp.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  def temp_bytes(remat):
    fields = {"num_layers": 4, "d_model": 64, "num_heads": 4, "d_ff": 256, "max_length": 64}
    model, _, loss_fn = _language_model(remat, **fields)
    params, objective = _objective(model, batch, loss_fn)
    compiled = jax.jit(jax.grad(lambda p: objective(p)[0])).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp_bytes("full") < temp_bytes("none")


def test_remat_is_checked_at_the_config_boundary():
  with pytest.raises(ConfigError, match="model.remat"):
    TransformerConfig.from_flat(vocab_size=VOCAB, remat="dots")
  with pytest.raises(ConfigError, match="model.remat"):
    LanguageModelConfig.from_flat(vocab_size=VOCAB, remat="everything")
  for module in (configs.tmoe, configs.smoe_lm):
    model = module.get_config().model
    assert model.remat == "none"
    model.remat = "full"
    build = TransformerConfig if module is configs.tmoe else LanguageModelConfig
    assert build.from_config(model, vocab_size=VOCAB).remat == "full"
    with pytest.raises(ConfigError, match="model.remat: expected str"):
      build.from_config({**model.to_dict(), "remat": True}, vocab_size=VOCAB)


@pytest.mark.parametrize("module", [configs.tmoe, configs.smoe_lm])
def test_a_run_saved_before_remat_reads_as_none(tmp_path, module):
  config = json.loads(module.get_config().to_json())
  assert KEYS_ADDED_LATER[config["task"]]["model.remat"] == "none"
  del config["model"]["remat"]
  path = tmp_path / "config.json"
  path.write_text(json.dumps(config))
  assert read_saved_config_json(path)["model"]["remat"] == "none"


def test_a_run_may_resume_with_another_remat_policy(tmp_path):
  """Rematerialisation recomputes the same activations: a workdir accepts another `model.remat`
  on resume, while a change that alters the model is still refused by name."""
  import configs.tmoe
  from tmoe_jax.errors import WorkdirError
  from tmoe_jax.training.workdir import prepare_workdir

  config = configs.tmoe.get_config()
  prepare_workdir(tmp_path, config)
  config.model.remat = "full"
  prepare_workdir(tmp_path, config, write=False)
  config.model.d_model = 64
  with pytest.raises(WorkdirError, match="model.d_model"):
    prepare_workdir(tmp_path, config, write=False)
