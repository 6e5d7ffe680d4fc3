"""The sentence-pair task (GLUE MRPC paraphrase detection): a `PairClassifier` trained from scratch.

Shapes: N pairs, B batch, L joint length (`data.max_length`), F pair features,
K validation chunks of `eval.batch_size` pairs.

Splits: "train" is MRPC's train.tsv minus `data.validation_size` pairs drawn at
random (keyed by `data.seed`) into "validation"; "dev" is dev.tsv, the split the
results are reported on; "test" exists when a labelled test.tsv was given. The
word vocabulary is built from the "train" pairs only and saved in the workdir.

Model selection uses "validation" only, never "dev": every `train.select_every`
steps the train step itself (inside `jit`, under `lax.cond`) measures the
validation accuracy of the current weights and, when it beats the best so far
(ties: lower validation loss), copies them into the model's non-trained
`SelectionState`. That copy is part of the TrainState, so it is checkpointed and
a resumed run selects exactly as an uninterrupted one. Every evaluation (during
training, at the end, `python -m train.evaluate`) uses the selected weights, or
the current ones while nothing has been selected yet (`selected_step` -1).
`train.select_every` 0 turns selection off: the final weights are evaluated.

Reported: accuracy and F1 of the positive class (paraphrase) on the split, and
the majority-class baseline (majority of the training labels) on the same split.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tmoe_jax.data import batching
from tmoe_jax.data.pair_features import NUM_OVERLAP_KINDS, NUM_PAIR_FEATURES, encode_pairs
from tmoe_jax.data.sentence_pairs import SentencePairs, binary_f1, load_sentence_pairs, majority_baseline
from tmoe_jax.data.word_vocabulary import WordVocabulary, split_words
from tmoe_jax.errors import ConfigError, DataError, WorkdirError
from tmoe_jax.models.pair_classifier import PairClassifier, PairClassifierConfig
from tmoe_jax.training import reporting
from tmoe_jax.training.run_fields import DATA_SOURCE_FIELDS, MOE_LOSS_FIELDS
from tmoe_jax.training.state import TrainState
from tmoe_jax.training.task import Task
from tmoe_jax.validation import validate_fields

VOCABULARY_FILE = "vocabulary.json"
TRAIN, VALIDATION, DEV, TEST = "train", "validation", "dev", "test"

SENTENCE_PAIR_FIELDS = (
  *DATA_SOURCE_FIELDS,
  ("data.validation_size", int, lambda v: v >= 1, ">= 1"),
  ("data.max_length", int, lambda v: v >= 3, ">= 3 (a token of each sentence and <sep>)"),
  ("data.lowercase", bool, lambda v: True, "True or False"),
  ("data.min_word_count", int, lambda v: v >= 1, ">= 1"),
  ("data.max_vocabulary_size", int, lambda v: v >= 0, ">= 0 (0 = no limit)"),
  ("train.select_every", int, lambda v: v >= 0, ">= 0 (0 = evaluate the final weights)"),
)


# ---------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class SentencePairData:
  """The encoded splits (`encode_pairs` arrays plus int32 [N] `label`) and the vocabulary."""

  vocabulary: WordVocabulary
  splits: dict[str, dict[str, np.ndarray]]
  train_labels_N: np.ndarray


def split_validation(pairs: SentencePairs, validation_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, validation) indices of `pairs`, each sorted: `validation_size` drawn at random by `seed`."""
  if validation_size >= len(pairs):
    raise ConfigError(
      f"data.validation_size: must be smaller than the {len(pairs)} training pairs, got {validation_size}"
    )
  permutation = np.random.default_rng(seed).permutation(len(pairs))
  return np.sort(permutation[validation_size:]), np.sort(permutation[:validation_size])


def _tokens(pairs: SentencePairs, indices, lowercase: bool) -> tuple[list[list[str]], list[list[str]]]:
  first = [split_words(pairs.sentence1[i], lowercase=lowercase) for i in indices]
  second = [split_words(pairs.sentence2[i], lowercase=lowercase) for i in indices]
  return first, second


def prepare_data(data_config) -> SentencePairData:
  """Loads the pairs, carves out the validation split, builds the vocabulary from the "train"
  pairs (`data.min_word_count`, `data.max_vocabulary_size`) and encodes every split."""
  raw = load_sentence_pairs(
    name=data_config.name, data_dir=data_config.dir, tfds_data_dir=data_config.tfds_data_dir
  )
  lowercase = data_config.lowercase
  train_indices, validation_indices = split_validation(
    raw[TRAIN], data_config.validation_size, data_config.seed
  )
  parts = {
    TRAIN: (raw[TRAIN], train_indices),
    VALIDATION: (raw[TRAIN], validation_indices),
    **{name: (pairs, np.arange(len(pairs))) for name, pairs in raw.items() if name != TRAIN},
  }
  tokens = {name: _tokens(pairs, indices, lowercase) for name, (pairs, indices) in parts.items()}
  vocabulary = WordVocabulary.from_token_lists(
    tokens[TRAIN][0] + tokens[TRAIN][1],
    min_count=data_config.min_word_count,
    max_size=data_config.max_vocabulary_size,
  )
  splits = {}
  for name, (pairs, indices) in parts.items():
    arrays = encode_pairs(*tokens[name], vocabulary, data_config.max_length)
    arrays["label"] = pairs.labels_N[indices].astype(np.int32)
    splits[name] = arrays
  return SentencePairData(vocabulary=vocabulary, splits=splits, train_labels_N=splits[TRAIN]["label"])


def validation_chunks(arrays: dict[str, np.ndarray], chunk_size: int) -> dict[str, np.ndarray]:
  """The split as [K, chunk_size, ...] arrays padded with copies of example 0, and bool [K, chunk] `valid`."""
  count = len(arrays["label"])
  num_chunks = -(-count // chunk_size)
  indices = np.zeros(num_chunks * chunk_size, np.int64)
  indices[:count] = np.arange(count)
  chunks = {
    name: values[indices].reshape(num_chunks, chunk_size, *values.shape[1:])
    for name, values in arrays.items()
  }
  chunks["valid"] = (np.arange(num_chunks * chunk_size) < count).reshape(num_chunks, chunk_size)
  return chunks


# ---------------------------------------------------------------------------- selection


class SelectionState(nnx.Variable):
  """Selection by validation: a copy of the best weights and their scores. Not a Param: never trained."""


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


class SelectedClassifier(nnx.Module):
  """A `PairClassifier` (`network`, trained) and the copy of its weights chosen on the validation split."""

  def __init__(self, network: PairClassifier):
    self.network = network
    self.selected_params = nnx.data(
      jax.tree.map(
        lambda v: SelectionState(jnp.copy(v[...])), nnx.state(network, nnx.Param), is_leaf=_is_variable
      )
    )
    self.selected_step = SelectionState(jnp.array(-1, jnp.int32))  # -1: nothing selected yet
    self.selected_accuracy = SelectionState(jnp.array(-1.0, jnp.float32))
    # The largest float32, not inf: the loop stops on any non-finite value in the train state.
    self.selected_loss = SelectionState(jnp.array(jnp.finfo(jnp.float32).max, jnp.float32))

  def selected_network(self) -> PairClassifier:
    """The network with the selected weights, or with the current ones while `selected_step` is -1."""
    graphdef, params, rest = nnx.split(self.network, nnx.Param, ...)
    chosen = self.selected_step[...] >= 0
    snapshot = [v[...] for v in jax.tree.leaves(self.selected_params, is_leaf=_is_variable)]
    values = [jnp.where(chosen, s, p) for s, p in zip(snapshot, jax.tree.leaves(params))]
    return nnx.merge(graphdef, jax.tree.unflatten(jax.tree.structure(params), values), rest)


def split_scores(network: PairClassifier, chunks: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(accuracy, mean cross-entropy) of `network` (no dropout) over the valid rows of [K, chunk] `chunks`."""

  def chunk_sums(carry, chunk):
    logits_Bx2, _ = network.batch_logits(chunk)
    loss_B = optax.softmax_cross_entropy_with_integer_labels(logits_Bx2.astype(jnp.float32), chunk["label"])
    correct_B = jnp.argmax(logits_Bx2, axis=-1) == chunk["label"]
    valid_B = chunk["valid"]
    correct, loss = carry
    return (correct + jnp.sum(correct_B & valid_B), loss + jnp.sum(jnp.where(valid_B, loss_B, 0.0))), None

  zero = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))
  (correct, loss), _ = jax.lax.scan(chunk_sums, zero, chunks)
  count = jnp.maximum(jnp.sum(chunks["valid"]), 1).astype(jnp.float32)
  return correct.astype(jnp.float32) / count, loss / count


def select_by_validation(
  model: SelectedClassifier, step: jax.Array, chunks: dict[str, jax.Array], select_every: int
) -> None:
  """Every `select_every` steps (not step 0): keeps the current weights if they score best on `chunks`.

  Better = higher accuracy, or equal accuracy and lower loss. Runs under
  `lax.cond`, so the validation pass costs nothing on other steps, and on
  stop-gradient weights, so it adds nothing to the gradient.
  """
  graphdef, params, rest = nnx.split(model.network, nnx.Param, ...)
  params = jax.lax.stop_gradient(params)
  snapshot_vars = jax.tree.leaves(model.selected_params, is_leaf=_is_variable)
  current = (
    [v[...] for v in snapshot_vars],
    model.selected_step[...],
    model.selected_accuracy[...],
    model.selected_loss[...],
  )

  def evaluate_and_pick(current):
    snapshot, best_step, best_accuracy, best_loss = current
    accuracy, loss = split_scores(nnx.merge(graphdef, params, rest), chunks)
    better = (accuracy > best_accuracy) | ((accuracy == best_accuracy) & (loss < best_loss))
    new_snapshot = [jnp.where(better, p, s) for p, s in zip(jax.tree.leaves(params), snapshot)]
    return (
      new_snapshot,
      jnp.where(better, step.astype(jnp.int32), best_step),
      jnp.where(better, accuracy, best_accuracy),
      jnp.where(better, loss, best_loss),
    )

  due = (step > 0) & (step % select_every == 0)
  snapshot, best_step, best_accuracy, best_loss = jax.lax.cond(due, evaluate_and_pick, lambda c: c, current)
  for variable, value in zip(snapshot_vars, snapshot):
    variable[...] = value
  model.selected_step[...] = best_step
  model.selected_accuracy[...] = best_accuracy
  model.selected_loss[...] = best_loss


# ---------------------------------------------------------------------------- task


class SentencePairTask(Task):
  eval_split = DEV
  validation_split = VALIDATION  # carved from train.tsv; dev is only scored at the end
  throughput_unit = "examples"

  def __init__(self, config):
    super().__init__(config)
    validate_fields(config, MOE_LOSS_FIELDS + SENTENCE_PAIR_FIELDS)
    self.data = prepare_data(config.data)
    # Validated now, so that a bad model section fails before any file is written.
    self.model_config  # noqa: B018
    self._validation_chunks = validation_chunks(self.data.splits[VALIDATION], config.eval.batch_size)
    self._evaluator = None

  @property
  def model_config(self) -> PairClassifierConfig:
    return PairClassifierConfig.from_config(
      self.config.model,
      vocab_size=self.data.vocabulary.size,
      num_overlap_kinds=NUM_OVERLAP_KINDS,
      num_pair_features=NUM_PAIR_FEATURES,
    )

  def build_model(self, mesh) -> SelectedClassifier:
    del mesh  # small experts, replicated on every device; the batch is split over the mesh
    network = PairClassifier(self.model_config, rngs=nnx.Rngs(params=self.config.train.seed))
    return SelectedClassifier(network)

  def write_files(self, workdir: pathlib.Path) -> None:
    reporting.write_text_atomic(workdir / VOCABULARY_FILE, self.data.vocabulary.to_json())

  def read_files(self, workdir: pathlib.Path) -> None:
    path = workdir / VOCABULARY_FILE
    try:
      saved = WordVocabulary.from_json(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
      raise WorkdirError(f"{path}: cannot read the run's vocabulary ({e})") from e
    if saved != self.data.vocabulary:
      raise WorkdirError(
        f"{path}: the saved vocabulary ({saved.size} ids) differs from the one built from the data now "
        f"({self.data.vocabulary.size} ids): the training data changed since this run was written"
      )

  def train_batch(self, step: int, rows: slice) -> dict[str, np.ndarray]:
    train = self.data.splits[TRAIN]
    indices = batching.example_indices(
      len(train["label"]), self.config.train.batch_size, self.config.train.seed, step
    )[rows]
    return {name: values[indices] for name, values in train.items()}

  def loss(self, model: SelectedClassifier, batch, rngs, step):
    logits_Bx2, aux = model.network.batch_logits(batch, deterministic=False, rngs=rngs)
    logits_Bx2 = logits_Bx2.astype(jnp.float32)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_Bx2, batch["label"]))
    accuracy = jnp.mean((jnp.argmax(logits_Bx2, axis=-1) == batch["label"]).astype(jnp.float32))
    select_every = self.config.train.select_every
    if select_every:
      select_by_validation(model, step, jax.tree.map(jnp.asarray, self._validation_chunks), select_every)
    metrics = {"accuracy": accuracy, "selected_step": model.selected_step[...]}
    return loss, metrics, (aux,)

  def make_evaluator(self, graphdef):
    @jax.jit
    def predict(params, model_state, batch):
      network = nnx.merge(graphdef, params, model_state).selected_network()
      logits_Bx2, _ = network.batch_logits(batch)
      logits_Bx2 = logits_Bx2.astype(jnp.float32)
      loss_B = optax.softmax_cross_entropy_with_integer_labels(logits_Bx2, batch["label"])
      return jnp.argmax(logits_Bx2, axis=-1), loss_B

    batch_size = self.config.eval.batch_size

    def evaluator(state: TrainState, split: str, num_examples: int | None) -> dict[str, Any]:
      if split not in self.data.splits:
        raise DataError(f"split {split!r}: the sentence-pair task has {sorted(self.data.splits)}")
      arrays = self.data.splits[split]
      total = len(arrays["label"])
      count = total if num_examples is None else min(num_examples, total)
      predictions, losses = [], []
      for indices, num_valid in batching.sequential_batches(count, batch_size):
        batch = {name: values[indices] for name, values in arrays.items()}
        prediction_B, loss_B = jax.device_get(predict(state.params, state.model_state, batch))
        predictions.append(prediction_B[:num_valid])
        losses.append(loss_B[:num_valid])
      labels_N = arrays["label"][:count]
      prediction_N = np.concatenate(predictions) if predictions else np.zeros(0, np.int32)
      return {
        "split": split,
        "loss": float(np.mean(np.concatenate(losses))) if losses else float("nan"),
        "accuracy": float(np.mean(prediction_N == labels_N)) if count else float("nan"),
        "f1": binary_f1(prediction_N.astype(np.int64), labels_N.astype(np.int64)),
        "num_examples": count,
        "selected_step": int(state.model_state["selected_step"][...]),
        "selected_validation_accuracy": float(state.model_state["selected_accuracy"][...]),
      }

    self._evaluator = evaluator
    return evaluator

  def headline_results(self, evaluation: dict[str, Any]) -> dict[str, Any]:
    split = evaluation["split"]
    baseline = majority_baseline(self.data.splits[split]["label"], self.data.train_labels_N)
    return {
      f"{split}_accuracy": evaluation["accuracy"],
      f"{split}_f1": evaluation["f1"],
      f"{split}_loss": evaluation["loss"],
      f"{split}_examples": evaluation["num_examples"],
      "majority_baseline_accuracy": baseline["accuracy"],
      "majority_baseline_f1": baseline["f1"],
      "selected_step": evaluation["selected_step"],
      "selected_validation_accuracy": evaluation["selected_validation_accuracy"],
    }

  def finish(self, workdir: pathlib.Path, state: TrainState, graphdef: nnx.GraphDef) -> None:
    """Adds the labelled test split's results (when a test.tsv was given) to results.txt."""
    if TEST not in self.data.splits or self.eval_split == TEST:
      return
    evaluator = self._evaluator or self.make_evaluator(graphdef)
    test = evaluator(state, TEST, None)
    lines = [
      f"{name}: {value!r}"
      for name, value in (
        ("test_accuracy", test["accuracy"]),
        ("test_f1", test["f1"]),
        ("test_loss", test["loss"]),
      )
    ] + [f"test_examples: {test['num_examples']}"]
    path = workdir / reporting.RESULTS_FILE
    reporting.write_text_atomic(path, path.read_text() + "\n".join(lines) + "\n")
    print(f"test: accuracy {test['accuracy']:.4f}, f1 {test['f1']:.4f} ({test['num_examples']} pairs)")
