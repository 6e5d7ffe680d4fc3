"""The MNIST experiments (configs/mnist_moe.py, configs/mnist_guided.py) end to end on tiny synthetic IDX data,
gates.csv across a resume, the guided loss by hand, and a short run on the real MNIST when it is present."""

from __future__ import annotations

import csv
import gzip
import math
import pathlib
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import mnist_cnn_moe, mnist_guided, mnist_moe
from tmoe_jax.errors import ConfigError, DataError
from tmoe_jax.tasks import gate_reports
from tmoe_jax.tasks.image_classification import (
  GuidedImageClassificationTask,
  ImageClassificationTask,
  Predictions,
  guided_split_metrics,
  shift_images,
  split_metrics,
)
from tmoe_jax.training import loop

MNIST_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"

NUM_TRAIN, NUM_TEST, SIZE, NUM_CLASSES = 96, 40, 8, 10
VALIDATION_SIZE = 16
BATCH = 8  # divisible by the 8 virtual devices of conftest
STEPS = 4
GATES_EVERY = 2

HEADLINE_KEYS = {
  "test_accuracy",
  "test_loss",
  "test_examples",
  "test_gate_entropy",
  "test_expert_usage",
  "test_expert_top1_fraction",
  "test_accuracy_by_top_expert",
  "gate_temperature",
  "validation_accuracy",
  "validation_loss",
}
GUIDED_KEYS = {"test_routing_agreement", "test_expert_accuracy", "validation_routing_agreement"}


def write_idx(path: pathlib.Path, array: np.ndarray) -> None:
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_synthetic_mnist(directory: pathlib.Path) -> pathlib.Path:
  """Tiny 8x8 'digits': class c lights up row c % 8 (and column c // 8), plus noise."""
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for prefix, num in (("train", NUM_TRAIN), ("t10k", NUM_TEST)):
    labels = np.arange(num) % NUM_CLASSES
    images = rng.integers(0, 60, size=(num, SIZE, SIZE))
    images[np.arange(num), labels % SIZE, :] = 255
    images[np.arange(num), :, labels // SIZE] = 255
    write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
  return directory


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
  return write_synthetic_mnist(tmp_path_factory.mktemp("mnist") / "idx")


def tiny(config, data_dir: pathlib.Path, **model_overrides):
  """The config shrunk to a few steps of a tiny model on the synthetic data."""
  config.model.hidden_dims = (8,)
  config.model.cnn_channels = (2, 2)
  config.model.cnn_dense_dim = 4
  config.model.update(model_overrides)
  if config.model.gate_hidden_dim:
    config.model.gate_hidden_dim = 4
  config.train.update(
    num_steps=STEPS,
    batch_size=BATCH,
    warmup_steps=1,
    log_every=1,
    eval_every=2,
    checkpoint_every=2,
    progress_bar=False,
  )
  # Evaluation batches of the training batch's shape: one compilation of the forward pass.
  config.eval.update(batch_size=BATCH, num_examples_during_training=16, gates_every=GATES_EVERY)
  config.data.update(dir=str(data_dir), validation_size=VALIDATION_SIZE, max_shift=1)
  return config


def read_results(workdir: pathlib.Path) -> dict[str, str]:
  lines = (workdir / "results.txt").read_text().splitlines()
  return dict(line.split(": ", 1) for line in lines)


def read_gates(workdir: pathlib.Path) -> list[dict[str, str]]:
  with (workdir / gate_reports.GATES_FILE).open(newline="") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == gate_reports.GATES_COLUMNS
    return list(reader)


def check_run(workdir: pathlib.Path, num_experts: int = 5) -> list[dict[str, str]]:
  """Common checks of a finished tiny run; returns the gates.csv rows."""
  rows = read_gates(workdir)
  train_rows = [r for r in rows if r["epoch"] != gate_reports.TEST_EPOCH]
  test_rows = [r for r in rows if r["epoch"] == gate_reports.TEST_EPOCH]
  logged_batches = list(range(0, STEPS, GATES_EVERY))
  assert sorted({int(r["batch"]) for r in train_rows}) == logged_batches
  assert len(train_rows) == len(logged_batches) * BATCH * num_experts
  assert len(test_rows) == NUM_TEST * num_experts
  assert sorted({int(r["sample"]) for r in test_rows}) == list(range(NUM_TEST))
  # Train rows: epoch = batch * batch_size // train examples (80 here, so all in epoch 0).
  num_train = NUM_TRAIN - VALIDATION_SIZE
  assert all(int(r["epoch"]) == int(r["batch"]) * BATCH // num_train for r in train_rows)
  # Each example's gate probabilities over the experts sum to 1.
  sums: dict[tuple, float] = {}
  for r in rows:
    key = (r["epoch"], r["batch"], r["sample"])
    sums[key] = sums.get(key, 0.0) + float(r["probability"])
  np.testing.assert_allclose(list(sums.values()), 1.0, atol=1e-4)
  for name in gate_reports.PLOT_FILES:
    assert (workdir / name).stat().st_size > 0, name
  return rows


def test_mnist_moe_cnn_top_k_smoke(tmp_path, data_dir):
  config = tiny(mnist_moe.get_config(), data_dir, expert_type="cnn", top_k=2, load_balancing_weight=0.01)
  workdir = tmp_path / "run"
  results = loop.train_and_evaluate(config, workdir, ImageClassificationTask(config))
  assert results["steps"] == STEPS
  written = read_results(workdir)
  assert HEADLINE_KEYS <= set(written)
  assert 0.0 <= float(written["test_accuracy"]) <= 1.0
  assert int(written["test_examples"]) == NUM_TEST
  assert len(eval(written["test_expert_usage"])) == 5
  check_run(workdir)
  # The top-k router's MoEAux reaches metrics.jsonl.
  assert '"expert_fraction"' in (workdir / "metrics.jsonl").read_text()


def test_mnist_guided_smoke(tmp_path, data_dir):
  config = tiny(mnist_guided.get_config(), data_dir, guided_gate_loss="binary_cross_entropy")
  workdir = tmp_path / "run"
  loop.train_and_evaluate(config, workdir, GuidedImageClassificationTask(config))
  written = read_results(workdir)
  assert HEADLINE_KEYS | GUIDED_KEYS <= set(written)
  assert 0.0 <= float(written["test_routing_agreement"]) <= 1.0
  assert (
    len(eval(written["test_expert_accuracy"])) == 5
  )  # a float, or None for an expert owning no test label
  check_run(workdir)


def test_mnist_moe_smoke_and_gates_csv_survives_resume(tmp_path, data_dir):
  """The default (MLP) config end to end; then the same run resumed from an earlier checkpoint
  ends with the gates.csv of the uninterrupted one."""
  config = tiny(mnist_moe.get_config(), data_dir)
  straight = tmp_path / "straight"
  loop.train_and_evaluate(config, straight, ImageClassificationTask(config))
  assert HEADLINE_KEYS <= set(read_results(straight))
  check_run(straight)
  expected = (straight / gate_reports.GATES_FILE).read_text()

  resumed = tmp_path / "resumed"
  shutil.copytree(straight, resumed)
  # As if killed after step 3 logged its rows but before the step-4 checkpoint: newest checkpoint 2,
  # a row of batch 2 (to be trained again), a half-written line.
  shutil.rmtree(resumed / "checkpoints" / str(STEPS))
  gates_path = resumed / gate_reports.GATES_FILE
  train_lines = [line for line in expected.splitlines() if not line.startswith(gate_reports.TEST_EPOCH)]
  gates_path.write_text("\n".join(train_lines) + "\n0,2,3,1,1,0,0.2")
  results = loop.train_and_evaluate(config, resumed, ImageClassificationTask(config))
  assert results["steps_per_second_this_run"] > 0  # it trained steps 3 and 4 again
  assert gates_path.read_text() == expected


@pytest.mark.parametrize("config_module", [mnist_moe, mnist_cnn_moe, mnist_guided])
def test_shipped_configs_build_and_compute_a_loss(data_dir, config_module):
  """Every MNIST config at its real sizes: the task validates it, builds the model, and the loss is finite."""
  config = config_module.get_config()
  config.data.dir = str(data_dir)
  config.data.validation_size = VALIDATION_SIZE
  task_class = (
    GuidedImageClassificationTask if config.task == "guided_image_classification" else ImageClassificationTask
  )
  task = task_class(config)
  model = task.build_model(mesh=None)
  batch = {k: jnp.asarray(v[:4]) for k, v in task.train_batch(0, slice(None)).items()}
  # One compilation instead of an op-by-op eager pass.
  loss_fn = nnx.jit(lambda m, b: task.loss(m, b, nnx.Rngs(dropout=0), jnp.zeros((), jnp.int32)))
  loss, metrics, auxes = loss_fn(model, batch)
  assert np.isfinite(float(loss)) and len(auxes) == 1
  assert metrics["expert_usage"].shape == (5,)


def test_guided_loss_by_hand(data_dir):
  config = tiny(
    mnist_guided.get_config(), data_dir, gate_hidden_dim=0, guided_gate_loss_weight=0.5, dropout_rate=0.0
  )
  task = GuidedImageClassificationTask(config)
  model = task.build_model(mesh=None)
  # Gate probabilities (1/8, 2/8, 5/8, 0, 0) for every image: zero weights, bias = logits * T.
  logits_E = jnp.asarray([0.0, math.log(2.0), math.log(5.0), -jnp.inf, -jnp.inf])
  model.gate.logits.kernel[...] = jnp.zeros_like(model.gate.logits.kernel[...])
  model.gate.logits.bias[...] = jnp.where(jnp.isfinite(logits_E), logits_E, -1e4) * model.gate.temperature
  batch = {k: jnp.asarray(v) for k, v in task.train_batch(0, slice(None)).items()}
  batch["label"] = jnp.asarray([4, 5, 4, 5, 4, 5, 4, 5])  # owner expert 2 for every image
  loss, metrics, _ = task.loss(model, batch, nnx.Rngs(dropout=0), jnp.zeros((), jnp.int32))
  # Teacher forcing: the mixture is expert 2 alone.
  expert_log_probs = jax.nn.log_softmax(model(batch["image"]).expert_logits_ExBxC[2], axis=-1)
  nll = -float(jnp.mean(expert_log_probs[jnp.arange(BATCH), batch["label"]]))
  assert float(metrics["classification_loss"]) == pytest.approx(nll, rel=1e-5)
  assert float(metrics["gate_loss"]) == pytest.approx(-math.log(5 / 8), rel=1e-4)
  assert float(loss) == pytest.approx(nll + 0.5 * -math.log(5 / 8), rel=1e-4)
  assert float(metrics["routing_agreement"]) == 1.0


def test_train_batch_is_a_pure_function_of_step(data_dir):
  task = ImageClassificationTask(tiny(mnist_moe.get_config(), data_dir))
  first, again, other = (
    task.train_batch(3, slice(None)),
    task.train_batch(3, slice(None)),
    task.train_batch(4, slice(None)),
  )
  np.testing.assert_array_equal(first["image"], again["image"])
  assert not np.array_equal(first["image"], other["image"])
  halves = [task.train_batch(3, slice(0, 4))["image"], task.train_batch(3, slice(4, 8))["image"]]
  np.testing.assert_array_equal(np.concatenate(halves), first["image"])


def test_split_metrics_by_hand():
  # 4 examples, 2 experts, 4 classes (expert e owns labels {2e, 2e+1}).
  gates_NxE = np.asarray([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
  labels_N = np.asarray([0, 1, 2, 3])
  predicted_N = np.asarray([0, 2, 2, 3])  # the second example is wrong
  log_probs_NxC = np.log(np.full((4, 4), 0.1))
  log_probs_NxC[np.arange(4), predicted_N] = np.log(0.7)
  expert_predictions_ExN = np.asarray([[0, 1, 0, 0], [3, 3, 2, 2]])
  predictions = Predictions(log_probs_NxC, gates_NxE, expert_predictions_ExN, labels_N)
  metrics = split_metrics(predictions)
  assert metrics["accuracy"] == 0.75
  assert metrics["loss"] == pytest.approx(-(3 * math.log(0.7) + math.log(0.1)) / 4)
  np.testing.assert_allclose(metrics["expert_usage"], [0.65, 0.35])
  np.testing.assert_allclose(metrics["expert_top1_fraction"], [0.75, 0.25])
  # Expert 0 tops examples 0, 1, 3 (2 of 3 right); expert 1 tops example 2 (right).
  np.testing.assert_allclose(metrics["accuracy_by_top_expert"], [2 / 3, 1.0])
  entropy = -np.mean(np.sum(gates_NxE * np.log(gates_NxE), axis=1))
  assert metrics["gate_entropy"] == pytest.approx(entropy)
  guided_metrics = guided_split_metrics(predictions, labels_per_expert=2)
  # Owners 0, 0, 1, 1; top experts 0, 0, 1, 0.
  assert guided_metrics["routing_agreement"] == 0.75
  # Expert 0 on labels {0, 1}: predicts 0, 1 (both right); expert 1 on labels {2, 3}: 2, 2 (one right).
  assert guided_metrics["expert_accuracy"] == [1.0, 0.5]
  all_to_expert_0 = np.tile([1.0, 0.0], (4, 1))
  nobody = split_metrics(Predictions(log_probs_NxC, all_to_expert_0, expert_predictions_ExN, labels_N))
  assert nobody["accuracy_by_top_expert"][1] is None


def test_shift_images_against_roll():
  images = np.arange(2 * 5 * 6).reshape(2, 5, 6) + 1
  shifts = np.asarray([[1, -2], [0, 0]])
  shifted = shift_images(images, shifts)
  expected = np.roll(images[0], (1, -2), axis=(0, 1))
  expected[0, :] = 0  # the row shifted in from the top
  expected[:, -2:] = 0  # the columns shifted in from the right
  np.testing.assert_array_equal(shifted[0], expected)
  np.testing.assert_array_equal(shifted[1], images[1])


def test_errors_name_the_problem(data_dir):
  config = tiny(mnist_moe.get_config(), data_dir)
  config.data.dir = ""
  with pytest.raises(DataError, match="--config.data.dir"):
    ImageClassificationTask(config)
  config = tiny(mnist_guided.get_config(), data_dir, labels_per_expert=1)
  with pytest.raises(ConfigError, match="model.labels_per_expert"):
    GuidedImageClassificationTask(config)
  config = tiny(mnist_moe.get_config(), data_dir)
  config.data.max_shift = SIZE
  with pytest.raises(ConfigError, match="data.max_shift"):
    ImageClassificationTask(config)
  task = ImageClassificationTask(tiny(mnist_moe.get_config(), data_dir))
  with pytest.raises(DataError, match="unknown split"):
    task.split_arrays("dev")


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"real MNIST not found at {MNIST_DIR}")
def test_real_mnist_short_run(tmp_path):
  config = mnist_moe.get_config()
  config.train.update(
    num_steps=50, batch_size=64, warmup_steps=10, eval_every=0, checkpoint_every=0, progress_bar=False
  )
  config.mesh.data = 1  # one device: the multi-device path is exercised by the tiny runs
  config.eval.gates_every = 25
  config.data.dir = str(MNIST_DIR)
  results = loop.train_and_evaluate(config, tmp_path / "run", ImageClassificationTask(config))
  assert results["test_examples"] == 10_000
  assert results["test_accuracy"] > 0.6  # chance is 0.1; 50 steps reach about 0.85
