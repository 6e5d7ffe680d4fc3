"""Tests of the regression experiment: the notebook's softmax MoE, its equal-size dense MLP, the data, the task.

References are independent of the library: float64 NumPy loops over points and
experts for both gatings, brute-force searches for the equal-parameter width,
and parameter counts read off the built modules.
Shapes: N points, I inputs, H hidden, E experts, K experts per point.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import regression as regression_config
from tmoe_jax.errors import ConfigError, DataError
from tmoe_jax.models.regression import (
  DenseMlp,
  MixtureOfMlps,
  RegressionModelConfig,
  dense_mlp_parameter_count,
  equal_parameter_hidden,
  moe_parameter_count,
)
from tmoe_jax.tasks.regression import RegressionTask, held_out_points, train_points
from tmoe_jax.training import loop
from tmoe_jax.training.optimizer import make_optimizer
from tmoe_jax.training.state import count_params, create_train_state


def _model(gating="dense", kind="moe", seed=0, **kwargs):
  config = RegressionModelConfig(input_dim=10, kind=kind, gating=gating, **kwargs)
  model = (MixtureOfMlps if kind == "moe" else DenseMlp)(config, rngs=nnx.Rngs(params=seed))
  if kind == "moe":
    # A router far from uniform, so that a wrong gate shows in the outputs.
    model.router.kernel[...] = jax.random.normal(jax.random.key(seed + 1), model.router.kernel.shape)
    model.b_in_ExH[...] = jax.random.normal(jax.random.key(seed + 2), model.b_in_ExH.shape)
    model.b_out_ExO[...] = jax.random.normal(jax.random.key(seed + 3), model.b_out_ExO.shape)
  return model


def _reference_mixture(model: MixtureOfMlps, x_NxI: np.ndarray, top_k: int | None) -> np.ndarray:
  """Point by point, expert by expert, float64: softmax gate (top-k renormalised) times expert MLPs."""
  f64 = lambda v: np.asarray(v[...], np.float64)
  router, w_in, b_in, w_out, b_out = (
    f64(model.router.kernel),
    f64(model.w_in_ExIxH),
    f64(model.b_in_ExH),
    f64(model.w_out_ExHxO),
    f64(model.b_out_ExO),
  )
  outputs = []
  for x in np.asarray(x_NxI, np.float64):
    logits = x @ router
    gates = np.exp(logits - logits.max())
    gates /= gates.sum()
    if top_k is not None:
      chosen = np.argsort(-gates)[:top_k]
      kept = np.zeros_like(gates)
      # Renormalised over the chosen K; K = 1 keeps the raw probability (Switch), so the router still learns.
      kept[chosen] = gates[chosen] / gates[chosen].sum() if top_k > 1 else gates[chosen]
      gates = kept
    y = 0.0
    for e in range(len(gates)):
      hidden = np.maximum(x @ w_in[e] + b_in[e], 0.0)
      y += gates[e] * (hidden @ w_out[e] + b_out[e])[0]
    outputs.append(y)
  return np.array(outputs)


# ---------------------------------------------------------------------------
# The models against slow references.


@pytest.mark.parametrize("gating, top_k", [("dense", None), ("top_k", 2), ("top_k", 1)])
def test_mixture_matches_numpy_loop(gating, top_k):
  model = _model(gating, top_k=top_k or 2)
  x = np.asarray(jax.random.normal(jax.random.key(7), (33, 10)))
  y, auxes = nnx.jit(lambda m, x: m(x))(model, x)
  assert y.shape == (33,) and y.dtype == jnp.float32
  np.testing.assert_allclose(y, _reference_mixture(model, x, top_k), rtol=1e-4, atol=1e-4)
  (aux,) = auxes
  np.testing.assert_allclose(np.sum(aux.expert_fraction_E), 1.0, rtol=1e-6)
  assert float(aux.dropped_fraction) == 0.0
  if gating == "dense":
    assert float(aux.load_balancing_loss) == 0.0  # nothing to balance: every expert runs


def test_dense_mlp_matches_numpy():
  model = _model(kind="dense_mlp")
  x = np.asarray(jax.random.normal(jax.random.key(8), (9, 10)), np.float64)
  y, auxes = model(x)
  assert auxes == ()
  f64 = lambda v: np.asarray(v[...], np.float64)
  hidden = np.maximum(x @ f64(model.hidden.kernel) + f64(model.hidden.bias), 0.0)
  expected = (hidden @ f64(model.output.kernel) + f64(model.output.bias))[:, 0]
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Equal parameter counts.


def test_parameter_counts_of_the_notebook_sizes():
  # Router 10 x 5 (no bias) + 5 experts of (10*32 + 32 + 32*1 + 1) = 50 + 5 * 385.
  assert moe_parameter_count(10, 5, 32) == 1975
  # A dense MLP 10 -> W -> 1 has 12 W + 1: W = 164 and 165 are equally close (1969, 1981).
  assert equal_parameter_hidden(10, 5, 32) in (164, 165)
  moe = _model()
  dense = _model(kind="dense_mlp")
  assert count_params(nnx.state(moe, nnx.Param)) == 1975
  assert count_params(nnx.state(dense, nnx.Param)) == dense_mlp_parameter_count(10, dense.hidden.out_features)
  assert abs(count_params(nnx.state(dense, nnx.Param)) - 1975) <= 6


@pytest.mark.parametrize("input_dim, num_experts, hidden", [(10, 5, 32), (3, 2, 4), (10, 8, 64), (1, 1, 1)])
def test_equal_parameter_hidden_is_the_closest_width(input_dim, num_experts, hidden):
  target = moe_parameter_count(input_dim, num_experts, hidden)
  width = equal_parameter_hidden(input_dim, num_experts, hidden)
  best = min(abs(dense_mlp_parameter_count(input_dim, w) - target) for w in range(1, 10 * target))
  assert abs(dense_mlp_parameter_count(input_dim, width) - target) == best
  config = RegressionModelConfig(
    input_dim=input_dim, kind="dense_mlp", num_experts=num_experts, hidden=hidden, top_k=1
  )
  assert count_params(nnx.state(DenseMlp(config, rngs=nnx.Rngs(0)), nnx.Param)) == dense_mlp_parameter_count(
    input_dim, width
  )


# ---------------------------------------------------------------------------
# Data.


def test_training_batches_are_a_pure_function_of_seed_and_step():
  a, b = train_points(3, 17, 64, 10), train_points(3, 17, 64, 10)
  np.testing.assert_array_equal(a["x"], b["x"])
  assert a["x"].shape == (64, 10) and a["x"].dtype == np.float32 and a["y"].shape == (64,)
  np.testing.assert_allclose(a["y"], np.sum(a["x"].astype(np.float64) ** 2, axis=-1), rtol=1e-6)
  assert not np.allclose(a["x"], train_points(3, 18, 64, 10)["x"])
  assert not np.allclose(a["x"], train_points(4, 17, 64, 10)["x"])
  # Roughly standard normal.
  big = train_points(0, 0, 20_000, 10)["x"]
  assert abs(big.mean()) < 0.02 and abs(big.std() - 1.0) < 0.02


def test_held_out_points_come_from_another_stream():
  test = held_out_points(0, 1000, 10)
  np.testing.assert_array_equal(test["x"], held_out_points(0, 1000, 10)["x"])
  train_rows = np.concatenate([train_points(0, step, 1000, 10)["x"] for step in range(3)])
  assert not np.isin(test["x"][:, 0], train_rows[:, 0]).any()


def _tiny_config(**model):
  config = regression_config.get_config()
  config.train.num_steps = 3
  config.train.batch_size = 16
  config.train.log_every = 1
  config.train.eval_every = 2
  config.train.checkpoint_every = 0
  config.train.progress_bar = False
  config.eval.batch_size = 48
  config.eval.num_examples_during_training = 64
  config.data.num_test = 100
  config.model.update(model)
  return config


def test_task_batch_rows_are_slices_of_the_global_batch():
  task = RegressionTask(_tiny_config())
  full = task.train_batch(5, slice(None))
  halves = [task.train_batch(5, slice(0, 8)), task.train_batch(5, slice(8, 16))]
  np.testing.assert_array_equal(np.concatenate([h["x"] for h in halves]), full["x"])


def test_task_rejects_bad_fields_naming_them():
  with pytest.raises(ConfigError, match="model.kind"):
    RegressionTask(_tiny_config(kind="mixture"))
  with pytest.raises(ConfigError, match="model.gating"):
    RegressionTask(_tiny_config(gating="sparse"))
  with pytest.raises(ConfigError, match="model.top_k"):
    RegressionTask(_tiny_config(top_k=6))
  config = _tiny_config()
  config.data.num_test = 0
  with pytest.raises(ConfigError, match="data.num_test"):
    RegressionTask(config)


# ---------------------------------------------------------------------------
# Through the training loop.


@pytest.mark.parametrize("model", [{}, {"gating": "top_k"}, {"kind": "dense_mlp"}])
def test_each_variant_trains_and_reports(tmp_path, model):
  config = _tiny_config(**model)
  task = RegressionTask(config)
  loop.train_and_evaluate(config, tmp_path, task)
  lines = dict(line.split(": ", 1) for line in (tmp_path / "results.txt").read_text().splitlines())
  for key in ("test_mse", "test_examples", "model", "final_train_loss", "steps", "parameters"):
    assert key in lines, key
  assert int(lines["test_examples"]) == 100 and int(lines["steps"]) == 3
  assert np.isfinite(float(lines["test_mse"]))
  assert (tmp_path / "loss_curve.png").stat().st_size > 0
  assert (tmp_path / "checkpoints" / "3").is_dir()


def test_an_expert_mesh_axis_is_refused_where_experts_cannot_be_split(tmp_path):
  """No silent replication: this model has no expert-parallel layer, so mesh.expert > 1 is an error."""
  config = _tiny_config()
  config.mesh.data, config.mesh.expert = 1, 2
  with pytest.raises(ConfigError, match="mesh.expert: the .* model keeps its experts replicated"):
    loop.train_and_evaluate(config, tmp_path, RegressionTask(config))
  assert not list(tmp_path.iterdir())  # refused before writing anything


@pytest.mark.parametrize("model", [{}, {"kind": "dense_mlp"}])
def test_evaluator_is_the_mean_over_held_out_points_without_padding(model):
  config = _tiny_config(**model)  # 100 points in eval batches of 48: the last batch is padded
  task = RegressionTask(config)
  graphdef, state = create_train_state(task.build_model(None), make_optimizer(config.train), 0)
  points = task.splits["test"]
  prediction, _ = nnx.merge(graphdef, state.params, state.model_state)(points["x"])
  squared = (np.asarray(prediction, np.float64) - points["y"]) ** 2
  evaluator = task.make_evaluator(graphdef)
  result = evaluator(state, "test", None)
  assert result["num_examples"] == 100
  np.testing.assert_allclose(result["mse"], squared.mean(), rtol=1e-5)
  assert result["loss"] == result["mse"]
  np.testing.assert_allclose(evaluator(state, "test", 10)["mse"], squared[:10].mean(), rtol=1e-5)
  with pytest.raises(DataError, match="'train'"):
    evaluator(state, "train", None)


def test_validation_points_are_another_stream_of_the_same_size():
  task = RegressionTask(_tiny_config())
  validation, test = task.splits["validation"], task.splits["test"]
  chex.assert_equal_shape([validation["x"], test["x"]])
  assert not np.any(np.isclose(validation["x"][:, None, :], test["x"][None]).all(-1))
  assert task.validation_split == "validation" and task.eval_split == "test"
