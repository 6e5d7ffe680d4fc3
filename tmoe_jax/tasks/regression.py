"""The regression task of the original notebook: learn the sum of squares of Gaussian inputs.

Shapes: N points, I input dimension.

Training draws a fresh batch of `train.batch_size` points x ~ N(0, I_I) at
every step, a pure function of (train.seed, step); the target is
y = sum_i x_i^2 and the loss the mean squared error. The held-out test set is
`data.num_test` points from a different random stream, keyed by `data.seed`
alone, so it is the same whatever the training seed; it is evaluated once, at
the end, in float32 and reported as `test_mse`. Evaluations during training
use as many validation points from a third stream.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmoe_jax.data import batching
from tmoe_jax.errors import DataError
from tmoe_jax.models.regression import RegressionModelConfig, build_model
from tmoe_jax.training.run_fields import MOE_LOSS_FIELDS
from tmoe_jax.training.state import TrainState
from tmoe_jax.training.task import Task
from tmoe_jax.validation import validate_fields

# Random streams: the first word of every seed sequence, so train, test and validation draws never coincide.
TRAIN_STREAM = 0
TEST_STREAM = 1
VALIDATION_STREAM = 2
SPLITS = ("validation", "test")

REGRESSION_FIELDS = (
  ("data.input_dim", int, lambda v: v >= 1, ">= 1"),
  ("data.num_test", int, lambda v: v >= 1, ">= 1"),
  ("data.seed", int, lambda v: v >= 0, ">= 0"),
)


def sum_of_squares_points(rng: np.random.Generator, num_points: int, input_dim: int) -> dict[str, np.ndarray]:
  """x float32 [N, I] standard normal, y float32 [N] = sum_i x_i^2 (summed in float64)."""
  x_NxI = rng.standard_normal((num_points, input_dim))
  return {"x": x_NxI.astype(np.float32), "y": np.sum(x_NxI**2, axis=-1).astype(np.float32)}


def train_points(seed: int, step: int, batch_size: int, input_dim: int) -> dict[str, np.ndarray]:
  """The training batch of `step`: a pure function of (seed, step)."""
  return sum_of_squares_points(np.random.default_rng([TRAIN_STREAM, seed, step]), batch_size, input_dim)


def held_out_points(
  seed: int, num_points: int, input_dim: int, stream: int = TEST_STREAM
) -> dict[str, np.ndarray]:
  """The held-out points of `stream` (test or validation), which no training step draws from."""
  return sum_of_squares_points(np.random.default_rng([stream, seed]), num_points, input_dim)


def squared_error_sum(model, batch: dict[str, jax.Array], num_valid: jax.Array) -> jax.Array:
  """float32 sum of (prediction - y)^2 over the first `num_valid` rows (the rest is padding)."""
  prediction_N, _ = model(batch["x"])
  valid_N = jnp.arange(batch["y"].shape[0]) < num_valid
  error_N = (prediction_N.astype(jnp.float32) - batch["y"].astype(jnp.float32)) ** 2
  return jnp.sum(jnp.where(valid_N, error_N, 0.0))


class RegressionTask(Task):
  validation_split = "validation"

  def __init__(self, config):
    super().__init__(config)
    validate_fields(config, MOE_LOSS_FIELDS + REGRESSION_FIELDS)
    self.model_config = RegressionModelConfig.from_config(config.model, input_dim=config.data.input_dim)
    data = config.data
    self.splits = {
      split: held_out_points(data.seed, data.num_test, data.input_dim, stream)
      for split, stream in (("validation", VALIDATION_STREAM), ("test", TEST_STREAM))
    }

  def build_model(self, mesh):
    del mesh  # a few thousand parameters: replicated on every device
    return build_model(self.model_config, self.config.train.seed)

  def train_batch(self, step: int, rows: slice) -> dict[str, np.ndarray]:
    train = self.config.train
    batch = train_points(train.seed, step, train.batch_size, self.config.data.input_dim)
    return {name: values[rows] for name, values in batch.items()}

  def loss(self, model, batch, rngs, step):
    del rngs, step
    prediction_N, auxes = model(batch["x"])
    mse = jnp.mean((prediction_N - batch["y"]) ** 2)
    return mse, {}, auxes

  def make_evaluator(self, graphdef):
    @jax.jit
    def error_sum(params, model_state, batch, num_valid):
      return squared_error_sum(nnx.merge(graphdef, params, model_state), batch, num_valid)

    batch_size = self.config.eval.batch_size

    def evaluator(state: TrainState, split: str, num_examples: int | None) -> dict[str, Any]:
      if split not in self.splits:
        raise DataError(f"split {split!r}: the regression task has only {SPLITS}")
      points = self.splits[split]
      total = len(points["y"])
      count = total if num_examples is None else min(num_examples, total)
      sum_squares = 0.0
      for indices, num_valid in batching.sequential_batches(count, batch_size):
        batch = {name: values[indices] for name, values in points.items()}
        sum_squares += float(error_sum(state.params, state.model_state, batch, num_valid))
      mse = sum_squares / max(count, 1)
      return {"loss": mse, "mse": mse, "num_examples": count}

    return evaluator

  def headline_results(self, evaluation: dict[str, Any]) -> dict[str, Any]:
    model = self.model_config
    variant = f"moe/{model.gating}" if model.kind == "moe" else f"dense_mlp/hidden={model.dense_hidden}"
    return {"test_mse": evaluation["mse"], "test_examples": evaluation["num_examples"], "model": variant}
