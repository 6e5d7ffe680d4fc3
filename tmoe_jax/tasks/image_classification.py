"""Image classification with the image MoE (`models.image_moe`): the original MNIST experiments.

Two tasks:
  "image_classification" (`ImageClassificationTask`): the gate and the experts
    learn together from the mixture's negative log-likelihood (+ the optional
    Switch balancing and z losses on the gate).
  "guided_image_classification" (`GuidedImageClassificationTask`): expert i owns
    labels {i * labels_per_expert, ...} (MNIST: {2i, 2i+1}); in training the gate
    is pushed toward the owner by `moe.guided.guided_gate_loss` and, with
    `model.mask_gate_by_label`, the mixture is teacher-forced to the owner; at
    evaluation the learned gate decides alone.

Shapes: B batch, N examples of a split, H x W image, E experts, C classes.

Images are uint8 in memory, scaled to [0, 1] and standardised with the training
split's pixel mean and standard deviation per batch. Training batches can be
augmented by random translations of up to `data.max_shift` pixels (zero fill),
drawn from (train.seed, step) like the batch itself, so a resumed run sees the
same batches. Every split is evaluated in file order; the final (full) evaluation
of the test split also evaluates the validation split, so results.txt holds
`validation_accuracy` (and loss, and for the guided task routing agreement)
beside the `test_*` figures.

Besides metrics.jsonl and results.txt the run writes gates.csv (every
`eval.gates_every`-th training batch and the final test pass; see
`tasks.gate_reports`) and the gate plots into the workdir.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmoe_jax.data import batching
from tmoe_jax.data.images import ImageClassificationData, load_image_classification
from tmoe_jax.errors import ConfigError, DataError
from tmoe_jax.models.image_moe import ImageMoE, ImageMoEConfig, routing_aux
from tmoe_jax.moe import guided
from tmoe_jax.tasks import gate_reports
from tmoe_jax.training.losses import classification_loss
from tmoe_jax.training.run_fields import DATA_SOURCE_FIELDS, MOE_LOSS_FIELDS
from tmoe_jax.training.state import TrainState
from tmoe_jax.training.task import Task
from tmoe_jax.validation import require, validate_fields

GUIDED_GATE_LOSSES = ("cross_entropy", "binary_cross_entropy")
SPLITS = ("train", "validation", "test")

IMAGE_FIELDS = (
  *DATA_SOURCE_FIELDS,
  ("data.validation_size", int, lambda v: v >= 0, ">= 0"),
  ("data.max_shift", int, lambda v: v >= 0, ">= 0 (0 = no augmentation)"),
  ("eval.gates_every", int, lambda v: v >= 0, ">= 0 (0 = no training rows in gates.csv)"),
)
GUIDED_FIELDS = (
  ("model.guided_gate_loss", str, lambda v: v in GUIDED_GATE_LOSSES, f"one of {GUIDED_GATE_LOSSES}"),
  ("model.guided_gate_loss_weight", (int, float), lambda v: v >= 0, ">= 0"),
  ("model.mask_gate_by_label", bool, lambda v: True, "True or False"),
  ("model.labels_per_expert", int, lambda v: v >= 1, ">= 1"),
)


@dataclasses.dataclass(frozen=True)
class Predictions:
  """A split's model outputs, in split order: log_probs_NxC (mixture), gate_probs_NxE (learned
  gate softmax), expert_predictions_ExN (each expert's own argmax class), labels_N."""

  log_probs_NxC: np.ndarray
  gate_probs_NxE: np.ndarray
  expert_predictions_ExN: np.ndarray
  labels_N: np.ndarray

  @property
  def predictions_N(self) -> np.ndarray:
    return np.argmax(self.log_probs_NxC, axis=1)


def shift_images(images_BxHxW: np.ndarray, shifts_Bx2: np.ndarray) -> np.ndarray:
  """Each image translated by its (rows, columns) shift, the uncovered border filled with 0."""
  batch, height, width = images_BxHxW.shape
  pad = int(np.max(np.abs(shifts_Bx2))) if shifts_Bx2.size else 0
  if pad == 0:
    return images_BxHxW
  padded = np.pad(images_BxHxW, ((0, 0), (pad, pad), (pad, pad)))
  # Output pixel (r, c) of image b reads input pixel (r - dy, c - dx): padded (r - dy + pad, ...).
  rows_BxH = np.arange(height)[None] - shifts_Bx2[:, :1] + pad
  cols_BxW = np.arange(width)[None] - shifts_Bx2[:, 1:] + pad
  return padded[np.arange(batch)[:, None, None], rows_BxH[:, :, None], cols_BxW[:, None, :]]


def accuracy_where(correct_N: np.ndarray, where_N: np.ndarray) -> float | None:
  """Mean of `correct_N` over `where_N`; None (JSON null) when nothing is selected."""
  count = int(np.sum(where_N))
  return float(np.sum(correct_N & where_N) / count) if count else None


def split_metrics(predictions: Predictions) -> dict[str, Any]:
  """Loss, accuracy and routing figures of a split: mean NLL, accuracy, example count, mean gate
  entropy (nats), per expert the mean gate probability (usage), the share of examples whose top
  gate it is, and the accuracy on those examples (None for an expert that tops none)."""
  labels_N = predictions.labels_N
  num_examples = len(labels_N)
  num_experts = predictions.gate_probs_NxE.shape[1]
  correct_N = predictions.predictions_N == labels_N
  gates_NxE = predictions.gate_probs_NxE
  top_expert_N = np.argmax(gates_NxE, axis=1)
  entropy_N = -np.sum(gates_NxE * np.log(np.maximum(gates_NxE, 1e-9)), axis=1)
  nll_N = -predictions.log_probs_NxC[np.arange(num_examples), labels_N]
  return {
    "loss": float(np.mean(nll_N)),
    "accuracy": float(np.mean(correct_N)),
    "num_examples": num_examples,
    "gate_entropy": float(np.mean(entropy_N)),
    "expert_usage": np.mean(gates_NxE, axis=0).tolist(),
    "expert_top1_fraction": (
      np.bincount(top_expert_N, minlength=num_experts) / max(num_examples, 1)
    ).tolist(),
    "accuracy_by_top_expert": [accuracy_where(correct_N, top_expert_N == e) for e in range(num_experts)],
  }


def guided_split_metrics(predictions: Predictions, labels_per_expert: int) -> dict[str, Any]:
  """Guided extras: how often the learned gate's top expert owns the label, and each expert's own
  accuracy on the examples whose labels it owns."""
  owner_N = predictions.labels_N // labels_per_expert
  top_expert_N = np.argmax(predictions.gate_probs_NxE, axis=1)
  num_experts = predictions.gate_probs_NxE.shape[1]
  expert_correct_ExN = predictions.expert_predictions_ExN == predictions.labels_N[None]
  return {
    "routing_agreement": float(np.mean(top_expert_N == owner_N)),
    "expert_accuracy": [accuracy_where(expert_correct_ExN[e], owner_N == e) for e in range(num_experts)],
  }


class ImageClassificationTask(Task):
  """MNIST-style image classification with the image MoE (task name "image_classification")."""

  def __init__(self, config):
    super().__init__(config)
    validate_fields(config, MOE_LOSS_FIELDS + IMAGE_FIELDS)
    data_config = config.data
    self.data: ImageClassificationData = load_image_classification(
      name=data_config.name,
      data_dir=data_config.dir,
      tfds_data_dir=data_config.tfds_data_dir,
      validation_size=data_config.validation_size,
      seed=data_config.seed,
    )
    train_images = self.data.train_images_NxHxW
    height, width = train_images.shape[1:]
    require(
      data_config.max_shift < min(height, width),
      "data.max_shift",
      f"must be smaller than the {height}x{width} images, got {data_config.max_shift}",
    )
    self.model_config = ImageMoEConfig.from_config(
      config.model, image_height=height, image_width=width, num_classes=self.data.num_classes
    )
    # Standardisation constants of the [0, 1]-scaled training pixels.
    scaled = train_images.astype(np.float32) / 255.0
    self.pixel_mean = float(scaled.mean())
    self.pixel_std = float(max(scaled.std(), 1e-6))
    self.splits = {
      "train": (self.data.train_images_NxHxW, self.data.train_labels_N),
      "validation": (self.data.validation_images_NxHxW, self.data.validation_labels_N),
      "test": (self.data.test_images_NxHxW, self.data.test_labels_N),
    }
    # Evaluated during training: the part of train held out (data.validation_size), never test.
    self.validation_split = "validation" if len(self.data.validation_labels_N) else None
    self._forward = None  # jitted (params, model_state, images) -> outputs, set by make_evaluator
    self._full_predictions: dict[str, Predictions] = {}  # split -> outputs of its last full evaluation
    self._gates: gate_reports.GatesCsv | None = None  # main process only (set by write_files)
    self._gates_synced = False

  # --------------------------------------------------------------------------- data

  def normalize(self, images_BxHxW: np.ndarray) -> np.ndarray:
    return ((images_BxHxW.astype(np.float32) / 255.0 - self.pixel_mean) / self.pixel_std).astype(np.float32)

  def train_batch(self, step: int, rows: slice) -> dict[str, np.ndarray]:
    train_config = self.config.train
    images_NxHxW, labels_N = self.splits["train"]
    indices = batching.example_indices(len(labels_N), train_config.batch_size, train_config.seed, step)
    images = images_NxHxW[indices]
    max_shift = self.config.data.max_shift
    if max_shift:
      # Drawn for the whole global batch, then sliced: each process gets its rows' shifts.
      rng = np.random.default_rng([train_config.seed, step, 1])
      images = shift_images(images, rng.integers(-max_shift, max_shift + 1, size=(len(indices), 2)))
    return {"image": self.normalize(images[rows]), "label": labels_N[indices[rows]].astype(np.int32)}

  def split_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in self.splits:
      raise DataError(f"unknown split {split!r} for data {self.config.data.name!r}; one of {SPLITS}")
    images, labels = self.splits[split]
    if not len(labels):
      raise DataError(f"split {split!r} is empty (data.validation_size={self.config.data.validation_size})")
    return images, labels

  # --------------------------------------------------------------------------- model and loss

  def build_model(self, mesh) -> ImageMoE:
    # The experts are small: they are replicated, and the batch is split over every device.
    return ImageMoE(self.model_config, rngs=nnx.Rngs(params=self.config.train.seed))

  def dropout_key(self, rngs: nnx.Rngs):
    return rngs.dropout() if self.model_config.dropout_rate > 0 else None

  def loss(self, model, batch, rngs, step):
    output = model(batch["image"], dropout_key=self.dropout_key(rngs))
    nll, metrics = classification_loss(output.log_probs_BxC, batch["label"])
    metrics["expert_usage"] = jnp.mean(output.router_probs_BxE, axis=0)
    metrics["gate_temperature"] = model.gate.temperature
    return nll, metrics, (routing_aux(output),)

  # --------------------------------------------------------------------------- evaluation

  def make_evaluator(self, graphdef):
    @jax.jit
    def forward(params, model_state, images_BxHxW):
      model = nnx.merge(graphdef, params, model_state)
      output = model(images_BxHxW)
      expert_predictions_ExB = jnp.argmax(output.expert_logits_ExBxC, axis=-1).astype(jnp.int32)
      return output.log_probs_BxC, output.router_probs_BxE, expert_predictions_ExB

    @jax.jit
    def gate_temperature(params, model_state):
      return nnx.merge(graphdef, params, model_state).gate.temperature

    self._forward = forward

    def evaluator(state: TrainState, split: str, num_examples: int | None) -> dict[str, Any]:
      temperature = float(jax.device_get(gate_temperature(state.params, state.model_state)))
      predictions = self.predict(state, split, num_examples)
      result = {**self.summarize(predictions), "gate_temperature": temperature}
      if num_examples is None:
        # Kept for `finish`, which runs on the main process only and so must not run the model.
        self._full_predictions[split] = predictions
        if split == self.eval_split and len(self.splits["validation"][1]):
          # The final evaluation reports the validation split too: results.txt gets both.
          validation = self.summarize(self.predict(state, "validation"))
          result.update({f"validation_{name}": validation[name] for name in self.validation_metrics})
      return result

    return evaluator

  def predict(self, state: TrainState, split: str, num_examples: int | None = None) -> Predictions:
    """The model's outputs on the first `num_examples` (all if None) of `split`, in batches of eval.batch_size."""
    if self._forward is None:
      raise RuntimeError("make_evaluator must be called before predict")
    images_NxHxW, labels_N = self.split_arrays(split)
    num = len(labels_N) if num_examples is None else min(num_examples, len(labels_N))
    log_probs, gates, expert_predictions = [], [], []
    for indices, num_valid in batching.sequential_batches(num, self.config.eval.batch_size):
      outputs = jax.device_get(
        self._forward(state.params, state.model_state, self.normalize(images_NxHxW[indices]))
      )
      log_probs.append(outputs[0][:num_valid])
      gates.append(outputs[1][:num_valid])
      expert_predictions.append(outputs[2][:, :num_valid])
    return Predictions(
      log_probs_NxC=np.concatenate(log_probs),
      gate_probs_NxE=np.concatenate(gates),
      expert_predictions_ExN=np.concatenate(expert_predictions, axis=1),
      labels_N=labels_N[:num],
    )

  def summarize(self, predictions: Predictions) -> dict[str, Any]:
    return split_metrics(predictions)

  # The validation figures the final evaluation adds, as validation_<name>.
  validation_metrics = ("accuracy", "loss")

  def headline_results(self, evaluation: dict[str, Any]) -> dict[str, Any]:
    results = {
      "test_accuracy": evaluation["accuracy"],
      "test_loss": evaluation["loss"],
      "test_examples": evaluation["num_examples"],
      "test_gate_entropy": evaluation["gate_entropy"],
      "test_expert_usage": evaluation["expert_usage"],
      "test_expert_top1_fraction": evaluation["expert_top1_fraction"],
      "test_accuracy_by_top_expert": evaluation["accuracy_by_top_expert"],
      "gate_temperature": evaluation["gate_temperature"],
    }
    validation = {f"validation_{name}" for name in self.validation_metrics}
    return {**results, **{name: value for name, value in evaluation.items() if name in validation}}

  # --------------------------------------------------------------------------- files

  def write_files(self, workdir: pathlib.Path) -> None:
    # The loop calls this on the main process only: gates.csv is written from here on.
    self._gates = gate_reports.GatesCsv(pathlib.Path(workdir) / gate_reports.GATES_FILE)

  def read_files(self, workdir: pathlib.Path) -> None:
    """Nothing to read back: the normalisation is recomputed from the same training split."""

  def after_train_step(self, step: int, state: TrainState, batch: dict[str, np.ndarray]) -> None:
    """Appends the gates of every `eval.gates_every`-th training batch to gates.csv.

    `step` is the number of updates applied, so the batch just trained is number step - 1.
    Every process runs the forward pass (a jitted computation over the global state needs all
    of them) on the whole global batch, rebuilt from the step, so that every process feeds the
    same input and `sample` is the row of the global batch; the main process writes. Its
    first call in a run drops the rows of the batches about to be trained again (a resume).
    """
    if self._forward is None:
      return
    batch_index = step - 1
    if self._gates is not None and not self._gates_synced:
      self._gates.keep_batches_before(batch_index)
      self._gates_synced = True
    every = self.config.eval.gates_every
    if not every or batch_index % every:
      return
    global_batch = self.train_batch(batch_index, slice(None))
    outputs = self._forward(state.params, state.model_state, global_batch["image"])
    if self._gates is None:
      return
    log_probs, gates, _ = jax.device_get(outputs)
    epoch = batch_index * self.config.train.batch_size // len(self.splits["train"][1])
    labels = global_batch["label"]
    self._gates.append(
      gate_reports.gate_rows(
        epoch, batch_index, np.arange(len(labels)), labels, np.argmax(log_probs, axis=1), gates
      )
    )

  def finish(self, workdir: pathlib.Path, state: TrainState, graphdef: nnx.GraphDef) -> None:
    """Writes the final test pass into gates.csv and draws the gate plots (from the predictions of
    the final evaluation: this runs on the main process only)."""
    workdir = pathlib.Path(workdir)
    test = self._full_predictions.get("test")
    if test is None:
      raise RuntimeError("finish needs the final evaluation of the test split first")
    gates = self._gates or gate_reports.GatesCsv(workdir / gate_reports.GATES_FILE)
    predictions_N = test.predictions_N
    sample_N = np.arange(len(test.labels_N))
    gates.replace_test_rows(
      gate_reports.gate_rows(
        gate_reports.TEST_EPOCH,
        sample_N // self.config.eval.batch_size,
        sample_N,
        test.labels_N,
        predictions_N,
        test.gate_probs_NxE,
      )
    )
    gate_reports.write_plots(
      workdir,
      gates,
      test_labels_N=test.labels_N,
      test_predictions_N=predictions_N,
      test_gates_NxE=test.gate_probs_NxE,
      num_classes=self.data.num_classes,
    )


class GuidedImageClassificationTask(ImageClassificationTask):
  """Guided MoE (task name "guided_image_classification"): expert i owns labels
  {i * labels_per_expert, ..., (i + 1) * labels_per_expert - 1}."""

  def __init__(self, config):
    validate_fields(config, GUIDED_FIELDS)
    super().__init__(config)
    model_config = config.model
    owned = self.model_config.num_experts * model_config.labels_per_expert
    if self.data.num_classes > owned:
      raise ConfigError(
        f"model.labels_per_expert: {self.model_config.num_experts} experts x {model_config.labels_per_expert} "
        f"labels own only labels 0..{owned - 1}, but the data has {self.data.num_classes} classes"
      )

  validation_metrics = ("accuracy", "loss", "routing_agreement")

  def owner_expert(self, labels_B: jax.Array) -> jax.Array:
    return guided.label_to_expert(
      labels_B, self.model_config.num_experts, self.config.model.labels_per_expert
    )

  def loss(self, model, batch, rngs, step):
    model_config = self.config.model
    owner_B = self.owner_expert(batch["label"])
    output = model(
      batch["image"],
      owner_expert_B=owner_B if model_config.mask_gate_by_label else None,
      dropout_key=self.dropout_key(rngs),
    )
    nll, metrics = classification_loss(output.log_probs_BxC, batch["label"])
    gate_loss = guided.guided_gate_loss(output.router_logits_BxE, owner_B, kind=model_config.guided_gate_loss)
    metrics.update(
      classification_loss=nll,
      gate_loss=gate_loss,
      routing_agreement=guided.routing_agreement(output.expert_indices_BxK, owner_B),
      expert_usage=jnp.mean(output.router_probs_BxE, axis=0),
      gate_temperature=model.gate.temperature,
    )
    return nll + model_config.guided_gate_loss_weight * gate_loss, metrics, (routing_aux(output),)

  def summarize(self, predictions: Predictions) -> dict[str, Any]:
    return {
      **split_metrics(predictions),
      **guided_split_metrics(predictions, self.config.model.labels_per_expert),
    }

  def headline_results(self, evaluation: dict[str, Any]) -> dict[str, Any]:
    return {
      **super().headline_results(evaluation),
      "test_routing_agreement": evaluation["routing_agreement"],
      "test_expert_accuracy": evaluation["expert_accuracy"],
    }
