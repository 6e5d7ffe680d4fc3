"""Character-level language modelling on the pydoc corpus (`data.pydoc_corpus`) with a decoder-only LM.

Shapes: B windows, L = model.max_length, V vocabulary.

Training: every example is a random window of L + 1 characters of the
training split (inputs its first L, targets its last L), a pure function of
(train.seed, step). Evaluation: consecutive windows of the split, each
character after a window's first predicted once; the loss is the mean
cross-entropy in nats per character and `bits_per_char` = loss / ln 2.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmoe_jax.data import pydoc_corpus
from tmoe_jax.data.vocabulary import CharVocabulary
from tmoe_jax.errors import ConfigError, DataError, WorkdirError
from tmoe_jax.models.language_model import LanguageModel, LanguageModelConfig
from tmoe_jax.tasks.window_evaluation import pooled_window_sums
from tmoe_jax.training import reporting
from tmoe_jax.training.losses import PAD_ID, token_cross_entropy, token_prediction_sums
from tmoe_jax.training.run_fields import MOE_LOSS_FIELDS
from tmoe_jax.training.state import TrainState
from tmoe_jax.training.task import Task
from tmoe_jax.validation import validate_fields

VOCABULARY_FILE = "vocabulary.json"
CORPUS_FILE = "corpus.json"

LANGUAGE_MODEL_FIELDS = (("data.validation_fraction", (int, float), lambda v: 0 < v < 1, "in (0, 1)"),)


def bits_per_char(loss_nats: float | jax.Array) -> float | jax.Array:
  """Mean cross-entropy in nats per character -> bits per character."""
  return loss_nats / math.log(2.0)


def language_model_loss(model, batch, rngs: nnx.Rngs | None, step, *, deterministic: bool = False):
  """(mean next-character cross-entropy in nats, {"bits_per_char"}, MoEAux per MoE layer)."""
  logits_BxLxV, auxes = model(batch["inputs"], deterministic=deterministic, rngs=rngs, step=step)
  loss_sum, num_tokens = token_cross_entropy(logits_BxLxV, batch["targets"])
  loss = loss_sum / jnp.maximum(num_tokens, 1.0)
  return loss, {"bits_per_char": bits_per_char(loss), "num_tokens": num_tokens}, auxes


def eval_sums(params, model_state, batch, *, graphdef) -> dict[str, jax.Array]:
  """Loss sum, correct predictions and token count over non-padding targets (to be pooled)."""
  model = nnx.merge(graphdef, params, model_state)
  logits_BxLxV, _ = model(batch["inputs"], deterministic=True)
  return token_prediction_sums(logits_BxLxV, batch["targets"])


def _padded_windows(ids, starts_B, length: int, num_valid: int) -> dict[str, np.ndarray]:
  batch = pydoc_corpus.windows_at(ids, starts_B, length)
  # Padding rows repeat a window: PAD targets make them count for nothing.
  batch["targets"][num_valid:] = PAD_ID
  return batch


class LanguageModelTask(Task):
  eval_split = "validation"
  validation_split = "validation"
  throughput_unit = "tokens"
  expert_parallel = True  # the Transformer's top-k MoE layers run on the mesh

  def __init__(self, config):
    super().__init__(config)
    validate_fields(config, MOE_LOSS_FIELDS + LANGUAGE_MODEL_FIELDS)
    self.corpus = pydoc_corpus.load_corpus(float(config.data.validation_fraction))
    # Built here too (without a mesh) so that a bad model section fails before any file is written.
    self.model_config = LanguageModelConfig.from_config(config.model, vocab_size=self.corpus.vocabulary.size)
    length = self.model_config.max_length
    for split, ids in self.corpus.splits.items():
      if len(ids) < length + 1:
        raise ConfigError(
          f"model.max_length: the {split} split has {len(ids)} characters, fewer than one window of "
          f"{length} + 1"
        )

  def build_model(self, mesh) -> LanguageModel:
    model_config = LanguageModelConfig.from_config(self.config.model, vocab_size=self.corpus.vocabulary.size)
    return LanguageModel(model_config, mesh=mesh, rngs=nnx.Rngs(params=self.config.train.seed))

  def write_files(self, workdir: pathlib.Path) -> None:
    reporting.write_text_atomic(workdir / VOCABULARY_FILE, self.corpus.vocabulary.to_json())
    reporting.write_text_atomic(workdir / CORPUS_FILE, json.dumps(self.corpus.fingerprint, indent=2) + "\n")

  def read_files(self, workdir: pathlib.Path) -> None:
    for name in (VOCABULARY_FILE, CORPUS_FILE):
      if not (workdir / name).exists():
        raise WorkdirError(f"{workdir / name}: missing; the run that wrote this workdir wrote it")
    try:
      saved_vocabulary = CharVocabulary.from_json((workdir / VOCABULARY_FILE).read_text())
      saved_corpus = json.loads((workdir / CORPUS_FILE).read_text())
    except (OSError, ValueError) as error:
      raise WorkdirError(f"{workdir}: cannot read {VOCABULARY_FILE} / {CORPUS_FILE} ({error})") from error
    if saved_vocabulary != self.corpus.vocabulary:
      raise WorkdirError(f"{workdir / VOCABULARY_FILE}: the run was trained with another character set")
    for key in ("characters", "sha256"):
      if saved_corpus.get(key) != self.corpus.fingerprint[key]:
        raise WorkdirError(
          f"{workdir / CORPUS_FILE}: the run was trained on another corpus text ({key} "
          f"{saved_corpus.get(key)!r}, now {self.corpus.fingerprint[key]!r}; Python "
          f"{saved_corpus.get('python')} vs {self.corpus.fingerprint['python']})"
        )

  def train_batch(self, step: int, rows: slice) -> dict[str, np.ndarray]:
    train = self.config.train
    ids = self.corpus.splits["train"]
    length = self.model_config.max_length
    starts_B = pydoc_corpus.random_window_starts(len(ids), length, train.batch_size, train.seed, step)
    return pydoc_corpus.windows_at(ids, starts_B[rows], length)

  def count_units(self, batch) -> int:
    return int(batch["targets"].size)

  def loss(self, model, batch, rngs, step):
    return language_model_loss(model, batch, rngs, step)

  def make_evaluator(self, graphdef):
    eval_fn = jax.jit(
      lambda params, model_state, batch: eval_sums(params, model_state, batch, graphdef=graphdef)
    )
    length = self.model_config.max_length
    batch_size = self.config.eval.batch_size

    def evaluator(state: TrainState, split: str, num_examples: int | None) -> dict[str, Any]:
      if split not in self.corpus.splits:
        raise DataError(f"split {split!r}: the pydoc corpus has splits {pydoc_corpus.SPLITS}")
      count, sums = pooled_window_sums(
        eval_fn, state, self.corpus.splits[split], length, batch_size, num_examples, _padded_windows
      )
      loss = sums["loss_sum"] / max(sums["num_tokens"], 1.0)
      return {
        "loss": loss,
        "bits_per_char": bits_per_char(loss),
        "accuracy": sums["correct_tokens"] / max(sums["num_tokens"], 1.0),
        "num_windows": count,
        "num_characters": int(sums["num_tokens"]),
      }

    return evaluator

  def headline_results(self, evaluation: dict[str, Any]) -> dict[str, Any]:
    model = self.model_config
    return {
      "val_loss": evaluation["loss"],
      "val_bits_per_char": evaluation["bits_per_char"],
      "val_accuracy": evaluation["accuracy"],
      "val_characters": evaluation["num_characters"],
      "ffn": model.ffn if model.ffn != "smoe" else f"smoe/{model.smoe.selection}",
      "ffn_hidden_width": model.hidden_width,
      "active_ffn_parameters_per_layer": model.active_ffn_parameters,
    }
