"""The seq2seq task: the Transformer-MoE encoder-decoder trained with teacher forcing.

Shapes: B batch, S source length, L target length. Its steps (loss, eval, decode)
are pure functions jitted here; the train step is the generic
`training.steps.train_step` with `seq2seq_loss`. Evaluation reports the teacher-forced loss and token accuracy, and exact match /
token accuracy of greedy or beam-search outputs against the references.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmoe_jax import decoding
from tmoe_jax.bleu import bleu_signature, corpus_bleu
from tmoe_jax.data import batching
from tmoe_jax.data.seq2seq import Seq2SeqSplit, load_seq2seq_data, load_translation, make_batch
from tmoe_jax.data.subword import SubwordVocabulary
from tmoe_jax.errors import ConfigError, DataError, WorkdirError
from tmoe_jax.models.transformer import PARAMETER_RENAMES, Transformer, TransformerConfig
from tmoe_jax.training import reporting
from tmoe_jax.training import steps as train_steps
from tmoe_jax.training.losses import PAD_ID, token_cross_entropy, token_prediction_sums
from tmoe_jax.training.run_fields import MOE_LOSS_FIELDS, TRAIN_LOOP_FIELDS
from tmoe_jax.training.state import TrainState
from tmoe_jax.training.task import Task
from tmoe_jax.validation import FieldRule, validate_fields

VOCABULARY_FILE = "vocabulary.json"
# Length-bucketed batches are cut to a multiple of this many positions.
LENGTH_MULTIPLE = 16
SEQ2SEQ_FIELDS: tuple[FieldRule, ...] = (
  ("train.label_smoothing", (int, float), lambda v: 0 <= v < 1, "in [0, 1)"),
  ("eval.beam_size", int, lambda v: v >= 1, ">= 1 (1 = greedy)"),
)


def validate_run_config(config) -> None:
  """Checks the train/eval/data settings of a seq2seq run; raises ConfigError naming the first bad field."""
  validate_fields(config, TRAIN_LOOP_FIELDS + MOE_LOSS_FIELDS + SEQ2SEQ_FIELDS)


def build_model(config, vocab_size: int, seed: int, mesh=None) -> Transformer:
  """The Transformer of `config.model`; with a multi-device `mesh` its MoE layers run expert-parallel."""
  model_config = TransformerConfig.from_config(config.model, vocab_size=vocab_size)
  return Transformer(model_config, mesh=mesh, rngs=nnx.Rngs(params=seed))


def seq2seq_loss(model, batch, rngs: nnx.Rngs, step, *, label_smoothing: float = 0.0):
  """The generic step's `loss_fn`: mean token cross-entropy of teacher-forced decoding."""
  logits, auxes = model(batch["source"], batch["decoder_input"], deterministic=False, rngs=rngs, step=step)
  loss_sum, num_tokens = token_cross_entropy(logits, batch["target"], label_smoothing)
  return loss_sum / jnp.maximum(num_tokens, 1.0), {"num_tokens": num_tokens}, auxes


def eval_step(
  params: nnx.State, model_state: nnx.State, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef
):
  """Teacher-forced sums over the batch: loss, correct tokens, token count (to be pooled)."""
  model = nnx.merge(graphdef, params, model_state)
  logits, _ = model(batch["source"], batch["decoder_input"], deterministic=True)
  return token_prediction_sums(logits, batch["target"])


def decode_batch(
  params: nnx.State,
  model_state: nnx.State,
  source_BxS: jax.Array,
  *,
  graphdef: nnx.GraphDef,
  max_length: int,
  beam_size: int,
  bos_id: int,
  eos_id: int,
  length_penalty: float = 0.6,
) -> jax.Array:
  """Decodes [B, S] sources to int32 [B, max_length] tokens: greedy if beam_size == 1, else the best beam."""
  model = nnx.merge(graphdef, params, model_state)
  encoded_BxSxD, _ = model.encode(source_BxS)
  cache = model.init_decode_cache(encoded_BxSxD, source_BxS, max_length)
  common = dict(
    batch_size=source_BxS.shape[0], max_length=max_length, bos_id=bos_id, eos_id=eos_id, pad_id=PAD_ID
  )
  if beam_size == 1:
    return decoding.greedy_decode(model.decode_step, cache, **common)
  sequences, _ = decoding.beam_search(
    model.decode_step, cache, beam_size=beam_size, length_penalty=length_penalty, **common
  )
  return sequences[:, 0]


def jit_train_step(
  graphdef, optimizer, schedule, loss_weights, *, label_smoothing=0.0, state_shardings=None, mesh=None
):
  """`training.steps.jit_train_step` with the seq2seq loss."""
  loss_fn = functools.partial(seq2seq_loss, label_smoothing=label_smoothing)
  return train_steps.jit_train_step(
    graphdef, optimizer, schedule, loss_weights, loss_fn, state_shardings=state_shardings, mesh=mesh
  )


def jit_eval_step(graphdef):
  return jax.jit(functools.partial(eval_step, graphdef=graphdef))


def jit_decode(graphdef, **settings):
  """`decode_batch` jitted for `graphdef`; `settings`: its max_length, beam_size, bos_id, eos_id, length_penalty."""
  return jax.jit(functools.partial(decode_batch, graphdef=graphdef, **settings))


def evaluate(
  state: TrainState,
  split: Seq2SeqSplit,
  vocabulary,
  eval_config,
  *,
  num_examples=None,
  eval_fn,
  decode_fn,
  bleu: bool = False,
) -> dict[str, float]:
  """Teacher-forced loss and token accuracy, and exact match / token accuracy of decoded outputs;
  with `bleu`, sacreBLEU of the detokenised outputs against the raw reference texts."""
  num_examples = len(split) if num_examples is None else min(num_examples, len(split))
  loss_sum = correct_forced = forced_tokens = 0.0
  exact = correct_decoded = target_tokens = 0
  hypotheses = []
  for indices, num_valid in batching.sequential_batches(num_examples, eval_config.batch_size):
    batch = make_batch(split, indices, vocabulary.BOS_ID)
    # Padding rows repeat example 0: zero their targets so they add nothing to the sums.
    batch["target"][num_valid:] = 0
    sums = jax.device_get(eval_fn(state.params, state.model_state, batch))
    loss_sum += float(sums["loss_sum"])
    correct_forced += float(sums["correct_tokens"])
    forced_tokens += float(sums["num_tokens"])
    decoded = np.asarray(decode_fn(state.params, state.model_state, batch["source"]))[:num_valid]
    targets = batch["target"][:num_valid]
    valid = targets != 0
    exact += int(np.sum(np.all((decoded == targets) | ~valid, axis=1)))
    correct_decoded += int(np.sum((decoded == targets) & valid))
    target_tokens += int(np.sum(valid))
    if bleu:
      hypotheses.extend(vocabulary.decode(row) for row in decoded)
  scores = {"bleu": corpus_bleu(hypotheses, split.targets[:num_examples])} if bleu else {}
  return {
    **scores,
    "loss": loss_sum / max(forced_tokens, 1.0),
    "teacher_forced_accuracy": correct_forced / max(forced_tokens, 1.0),
    "exact_match": exact / max(num_examples, 1),
    "token_accuracy": correct_decoded / max(target_tokens, 1),
    "num_examples": num_examples,
  }


def decode_name(eval_config) -> str:
  return "greedy" if eval_config.beam_size == 1 else f"beam{eval_config.beam_size}"


class Seq2SeqTask(Task):
  eval_split = "test"
  throughput_unit = "tokens"
  expert_parallel = True  # the Transformer's top-k MoE layers run on the mesh
  parameter_renames = PARAMETER_RENAMES

  def __init__(self, config):
    super().__init__(config)
    validate_fields(config, MOE_LOSS_FIELDS + SEQ2SEQ_FIELDS)
    if config.data.tfds_data_dir:
      raise ConfigError(f"data.tfds_data_dir: task {config.data.name!r} is generated in code; leave it empty")
    self.data = load_seq2seq_data(config.data)
    # Translation is scored by BLEU; the embedded dates task by exact match.
    self.is_translation = isinstance(self.data.vocabulary, SubwordVocabulary)
    self.eval_split = config.eval.get("split", "test")
    # Multi30k's `val`, the dates' own held-out validation dates (data.num_validation > 0).
    self.validation_split = "validation" if "validation" in self.data.splits else None

  def build_model(self, mesh) -> Transformer:
    return build_model(self.config, self.data.vocabulary.size, self.config.train.seed, mesh=mesh)

  def check_model(self, model: Transformer) -> None:
    longest = max(self.data.max_source_length, self.data.max_target_length)
    if longest > model.config.max_length:
      raise ConfigError(
        f"model.max_length: must be >= the longest sequence ({longest}), got {model.config.max_length}"
      )

  def write_files(self, workdir: pathlib.Path) -> None:
    reporting.write_text_atomic(workdir / VOCABULARY_FILE, self.data.vocabulary.to_json())

  def read_files(self, workdir: pathlib.Path) -> None:
    path = workdir / VOCABULARY_FILE
    if not path.is_file():
      raise WorkdirError(f"{path}: missing; was this workdir written by `python -m train`?")
    vocabulary_type = type(self.data.vocabulary)
    try:
      saved = vocabulary_type.from_json(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
      raise WorkdirError(f"{path}: cannot read the vocabulary ({error})") from error
    if saved == self.data.vocabulary:
      return
    if isinstance(saved, SubwordVocabulary):
      # A learned vocabulary: the saved one defines the ids the checkpoint was trained with.
      self.data = load_translation(self.config.data, vocabulary=saved)
      return
    raise WorkdirError(
      f"the data built from config.data has another vocabulary than {path} "
      f"({self.data.vocabulary.size} vs {saved.size} ids): has the data changed since training?"
    )

  def train_batch(self, step: int, rows: slice) -> dict[str, np.ndarray]:
    train = self.data.splits["train"]
    train_config = self.config.train
    if not self.config.data.get("bucket_by_length", False):
      indices = batching.example_indices(len(train), train_config.batch_size, train_config.seed, step)
      return make_batch(train, indices[rows], self.data.vocabulary.BOS_ID)
    indices = batching.length_bucketed_indices(
      self._train_lengths, train_config.batch_size, train_config.seed, step
    )
    batch = make_batch(train, indices, self.data.vocabulary.BOS_ID)
    # Cut the global batch to its longest sequence, rounded up so that only a few shapes compile.
    longest = int(self._train_lengths[indices].max())
    length = min(-(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE, self.data.max_source_length)
    return {
      "source": batch["source"][rows, :length],
      "decoder_input": batch["decoder_input"][rows, : min(length, self.data.max_target_length)],
      "target": batch["target"][rows, : min(length, self.data.max_target_length)],
    }

  @functools.cached_property
  def _train_lengths(self) -> np.ndarray:
    """int64 [N]: the longer of each training pair's source and target, in ids."""
    train = self.data.splits["train"]
    return np.maximum(np.sum(train.source_ids_NxS != 0, 1), np.sum(train.target_ids_NxL != 0, 1))

  def count_units(self, batch) -> int:
    return int(np.sum(batch["source"] != 0) + np.sum(batch["target"] != 0))

  def loss(self, model, batch, rngs, step):
    return seq2seq_loss(model, batch, rngs, step, label_smoothing=self.config.train.label_smoothing)

  def make_evaluator(self, graphdef):
    eval_fn = jit_eval_step(graphdef)
    vocabulary = self.data.vocabulary
    decode_fn = jit_decode(
      graphdef,
      max_length=self.data.max_target_length,
      beam_size=self.config.eval.beam_size,
      bos_id=vocabulary.BOS_ID,
      eos_id=vocabulary.EOS_ID,
      length_penalty=self.config.eval.length_penalty,
    )

    def evaluator(state: TrainState, split: str, num_examples: int | None) -> dict[str, Any]:
      if split not in self.data.splits:
        raise DataError(
          f"--split: unknown split {split!r}; data {self.config.data.name!r} has {sorted(self.data.splits)}"
        )
      return {"split": split} | evaluate(
        state,
        self.data.splits[split],
        vocabulary,
        self.config.eval,
        num_examples=num_examples,
        eval_fn=eval_fn,
        decode_fn=decode_fn,
        bleu=self.is_translation,
      )

    return evaluator

  def headline_results(self, evaluation: dict[str, Any]) -> dict[str, Any]:
    bleu = (
      {"bleu": evaluation["bleu"], "bleu_split": evaluation["split"], "bleu_signature": bleu_signature()}
      if "bleu" in evaluation
      else {}
    )
    return {
      **bleu,
      "exact_match": evaluation["exact_match"],
      "token_accuracy": evaluation["token_accuracy"],
      "test_loss": evaluation["loss"],
      "test_teacher_forced_accuracy": evaluation["teacher_forced_accuracy"],
      "test_examples": evaluation["num_examples"],
      "decode": decode_name(self.config.eval),
    }
