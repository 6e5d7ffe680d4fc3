"""Causal language modelling on local text with the decoder-only MoE LM (`models.causal_lm`).

Shapes: B windows, L = data.sequence_length, V vocabulary.

Data: the lines of `data.dir/data.train_file`, `data.validation_file` and (optional)
`data.test_file`, tokenised with `data.tokenizer` (a tokenizer.json, e.g. an imported
checkpoint's) or, when it is empty, a byte-level BPE of `data.vocab_size` ids trained here on
the training lines; the tokenizer is saved in the workdir. Training windows are random spans
of L + 1 tokens of the training stream, a pure function of (train.seed, step); evaluation
reads consecutive windows of a split's stream, every token after a window's first predicted
once, and reports the loss in nats per token and its perplexity. Validation is evaluated
during training; the run reports the test split, scored once by the final weights, or
validation when `data.test_file` is empty.

Starting point: fresh parameters, or `init.hf_checkpoint`, a Hugging Face checkpoint
directory whose parameters (only: the optimizer starts fresh) the run starts from
(`configs/hf_finetune.py` fills the model section from its config.json).
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
from tokenizers import Tokenizer

from tmoe_jax.data import pydoc_corpus, token_corpus
from tmoe_jax.errors import ConfigError, DataError, WorkdirError
from tmoe_jax.hf.checkpoint_directory import build_model, read_config, read_tensors
from tmoe_jax.hf.families import family_of
from tmoe_jax.hf.tensors import parameters_from_hf
from tmoe_jax.models.causal_lm import CausalLM, CausalLMConfig
from tmoe_jax.tasks.window_evaluation import pooled_window_sums
from tmoe_jax.training import reporting
from tmoe_jax.training.losses import token_cross_entropy, token_prediction_sums
from tmoe_jax.training.run_fields import MOE_LOSS_FIELDS
from tmoe_jax.training.state import TrainState
from tmoe_jax.training.task import Task
from tmoe_jax.validation import validate_fields

TOKENIZER_FILE = "tokenizer.json"
CORPUS_FILE = "corpus.json"
SPLIT_FILES = {"train": "train_file", "validation": "validation_file", "test": "test_file"}
# The prefix of an evaluated split's keys in results.txt and `train.evaluate`'s files.
RESULT_PREFIX = {"test": "test", "validation": "val"}

CAUSAL_LM_FIELDS = (
  ("data.dir", str, lambda v: bool(v), "a directory holding the text files"),
  ("data.train_file", str, lambda v: bool(v), "a file name in data.dir"),
  ("data.validation_file", str, lambda v: bool(v), "a file name in data.dir"),
  ("data.test_file", str, lambda v: True, "a file name in data.dir, or empty for no test split"),
  ("data.tokenizer", str, lambda v: True, "a tokenizer.json path, or empty to train one"),
  ("data.vocab_size", int, lambda v: v >= 260, ">= 260 (the 256 bytes and the special tokens)"),
  ("data.end_of_text_id", int, lambda v: v >= -1, ">= 0, or -1 for the tokenizer's </s>"),
  ("data.sequence_length", int, lambda v: v >= 2, ">= 2"),
  ("model.vocab_size", int, lambda v: v >= 0, ">= 0 (0 = the tokenizer's size)"),
  ("init.hf_checkpoint", str, lambda v: True, "a Hugging Face checkpoint directory, or empty"),
)


def causal_lm_loss(model, batch, rngs: nnx.Rngs | None, step, *, deterministic: bool = False):
  """(mean next-token cross-entropy in nats, {"perplexity", "num_tokens"}, MoEAux per MoE layer)."""
  logits_BxLxV, auxes = model(batch["inputs"], deterministic=deterministic, rngs=rngs, step=step)
  loss_sum, num_tokens = token_cross_entropy(logits_BxLxV, batch["targets"], valid_BxL=batch["valid"])
  loss = loss_sum / jnp.maximum(num_tokens, 1.0)
  return loss, {"perplexity": jnp.exp(loss), "num_tokens": num_tokens}, auxes


def eval_sums(params, model_state, batch, *, graphdef) -> dict[str, jax.Array]:
  model = nnx.merge(graphdef, params, model_state)
  logits_BxLxV, _ = model(batch["inputs"], deterministic=True)
  return token_prediction_sums(logits_BxLxV, batch["targets"], batch["valid"])


def windows(ids: np.ndarray, starts_B: np.ndarray, length: int) -> dict[str, np.ndarray]:
  """Inputs, targets and valid (every target real) of windows of L + 1 tokens at `starts_B`."""
  batch = pydoc_corpus.windows_at(ids, starts_B, length)
  batch["valid"] = np.ones(batch["targets"].shape, bool)
  return batch


def _padded_windows(ids, starts_B, length: int, num_valid: int) -> dict[str, np.ndarray]:
  batch = windows(ids, starts_B, length)
  batch["valid"][num_valid:] = False  # padding rows repeat a window: they count for nothing
  return batch


class CausalLMTask(Task):
  validation_split = "validation"
  throughput_unit = "tokens"
  expert_parallel = True

  def __init__(self, config):
    super().__init__(config)
    validate_fields(config, MOE_LOSS_FIELDS + CAUSAL_LM_FIELDS)
    data = config.data
    directory = pathlib.Path(data.dir)
    files = {split: directory / data[key] for split, key in SPLIT_FILES.items() if data[key]}
    for split, path in files.items():
      if not path.is_file():
        raise ConfigError(f"data.{SPLIT_FILES[split]}: {path} is not a file")
    self.eval_split = "test" if "test" in files else "validation"
    if data.tokenizer:
      if not pathlib.Path(data.tokenizer).is_file():
        raise ConfigError(f"data.tokenizer: {data.tokenizer} is not a file")
      self.tokenizer = Tokenizer.from_file(data.tokenizer)
    else:
      self.tokenizer = token_corpus.train_tokenizer(token_corpus.read_lines(files["train"]), data.vocab_size)
    self.end_of_text_id = self._end_of_text_id()
    self.corpus = token_corpus.load_token_corpus(files, self.tokenizer, self.end_of_text_id)
    vocab_size = config.model.vocab_size or self.tokenizer.get_vocab_size()
    if vocab_size < self.tokenizer.get_vocab_size():
      raise ConfigError(
        f"model.vocab_size: {vocab_size} is smaller than the tokenizer's {self.tokenizer.get_vocab_size()} ids"
      )
    self.model_config = CausalLMConfig.from_config(config.model, vocab_size=vocab_size)
    for split, ids in self.corpus.splits.items():
      if len(ids) < data.sequence_length + 1:
        raise ConfigError(
          f"data.sequence_length: the {split} split has {len(ids)} tokens, fewer than one window of "
          f"{data.sequence_length} + 1"
        )
    # An unusable checkpoint fails here, before any file is written.
    self.init_family = (
      family_of(read_config(config.init.hf_checkpoint)) if config.init.hf_checkpoint else None
    )
    self.restoring = False

  def _end_of_text_id(self) -> int | None:
    wanted = self.config.data.end_of_text_id
    if wanted >= 0:
      return wanted
    found = self.tokenizer.token_to_id(token_corpus.END_OF_TEXT)
    if found is None:
      raise ConfigError(
        f"data.end_of_text_id: the tokenizer has no {token_corpus.END_OF_TEXT!r}; give the id that ends a document"
      )
    return found

  def build_model(self, mesh) -> CausalLM:
    checkpoint = self.config.init.hf_checkpoint
    if checkpoint and not self.restoring:
      # Parameters only: the loop builds a fresh optimizer state around them.
      parameters = parameters_from_hf(read_tensors(checkpoint), self.model_config, self.init_family)
      return build_model(self.model_config, parameters, mesh=mesh)
    return CausalLM(self.model_config, mesh=mesh, rngs=nnx.Rngs(params=self.config.train.seed))

  def write_files(self, workdir: pathlib.Path) -> None:
    reporting.write_text_atomic(workdir / TOKENIZER_FILE, self.tokenizer.to_str())
    reporting.write_text_atomic(workdir / CORPUS_FILE, json.dumps(self.corpus.fingerprint, indent=2) + "\n")

  def read_files(self, workdir: pathlib.Path) -> None:
    self.restoring = True  # the checkpoint, not init.hf_checkpoint, holds the parameters
    for name in (TOKENIZER_FILE, CORPUS_FILE):
      if not (workdir / name).exists():
        raise WorkdirError(f"{workdir / name}: missing; the run that wrote this workdir wrote it")
    saved = Tokenizer.from_file(str(workdir / TOKENIZER_FILE))
    if saved.to_str() != self.tokenizer.to_str():
      raise WorkdirError(f"{workdir / TOKENIZER_FILE}: the run was trained with another tokenizer")
    if json.loads((workdir / CORPUS_FILE).read_text()) != self.corpus.fingerprint:
      raise WorkdirError(f"{workdir / CORPUS_FILE}: the run was trained on other text (token streams differ)")

  def train_batch(self, step: int, rows: slice) -> dict[str, np.ndarray]:
    train, length = self.config.train, self.config.data.sequence_length
    ids = self.corpus.splits["train"]
    starts_B = pydoc_corpus.random_window_starts(len(ids), length, train.batch_size, train.seed, step)
    return windows(ids, starts_B[rows], length)

  def count_units(self, batch) -> int:
    return int(batch["valid"].sum())

  def loss(self, model, batch, rngs, step):
    return causal_lm_loss(model, batch, rngs, step)

  def make_evaluator(self, graphdef):
    eval_fn = jax.jit(
      lambda params, model_state, batch: eval_sums(params, model_state, batch, graphdef=graphdef)
    )
    length, batch_size = self.config.data.sequence_length, self.config.eval.batch_size

    def evaluator(state: TrainState, split: str, num_examples: int | None) -> dict[str, Any]:
      if split not in self.corpus.splits:
        raise DataError(f"split {split!r}: this corpus has splits {sorted(self.corpus.splits)}")
      count, totals = pooled_window_sums(
        eval_fn, state, self.corpus.splits[split], length, batch_size, num_examples, _padded_windows
      )
      loss = totals["loss_sum"] / max(totals["num_tokens"], 1.0)
      return {
        "split": split,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "accuracy": totals["correct_tokens"] / max(totals["num_tokens"], 1.0),
        "num_windows": count,
        "num_tokens": int(totals["num_tokens"]),
      }

    return evaluator

  def headline_results(self, evaluation: dict[str, Any]) -> dict[str, Any]:
    # Named by the split evaluated: `train.evaluate --split validation` reports val_*.
    model, prefix = self.model_config, RESULT_PREFIX[evaluation["split"]]
    return {
      f"{prefix}_loss": evaluation["loss"],
      f"{prefix}_perplexity": evaluation["perplexity"],
      f"{prefix}_accuracy": evaluation["accuracy"],
      f"{prefix}_tokens": evaluation["num_tokens"],
      "ffn": model.ffn,
      "started_from": self.config.init.hf_checkpoint or "fresh parameters",
    }
