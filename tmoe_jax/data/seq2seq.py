"""Seq2seq datasets as id arrays, and the batches the train step consumes.

Shapes: N examples, S source length, L target length (EOS included).
Sources end with EOS; targets end with EOS and are fed to the decoder shifted
right behind a BOS (`decoder_inputs`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tmoe_jax.data import dates
from tmoe_jax.data.parallel_text import load_parallel_text
from tmoe_jax.data.subword import SubwordVocabulary
from tmoe_jax.data.vocabulary import CharVocabulary
from tmoe_jax.errors import ConfigError
from tmoe_jax.validation import FieldRule, require, validate_fields

DATES_FIELDS: tuple[FieldRule, ...] = (
  ("seed", int, lambda v: v >= 0, ">= 0"),
  ("num_train", int, lambda v: v >= 1, ">= 1"),
  ("num_test", int, lambda v: v >= 1, ">= 1"),
  (
    "num_validation",
    int,
    lambda v: v >= 0,
    ">= 0 (0 = no validation split: nothing evaluated during training)",
  ),
)
TRANSLATION_FIELDS: tuple[FieldRule, ...] = (
  ("seed", int, lambda v: v >= 0, ">= 0"),
  ("vocab_size", int, lambda v: v >= 8, ">= 8"),
  ("max_source_length", int, lambda v: v >= 2, ">= 2"),
  ("max_target_length", int, lambda v: v >= 2, ">= 2"),
  ("source_language", str, lambda v: bool(v), "a language code such as 'de'"),
  ("target_language", str, lambda v: bool(v), "a language code such as 'en'"),
)
VOCABULARY_TYPES = ("unigram", "bpe")


@dataclasses.dataclass(frozen=True)
class Seq2SeqSplit:
  sources: list[str]
  targets: list[str]
  source_ids_NxS: np.ndarray
  target_ids_NxL: np.ndarray

  def __len__(self) -> int:
    return len(self.sources)


@dataclasses.dataclass(frozen=True)
class Seq2SeqData:
  vocabulary: CharVocabulary | SubwordVocabulary
  splits: dict[str, Seq2SeqSplit]
  max_source_length: int
  max_target_length: int


def encode_split(vocabulary: CharVocabulary, sources, targets, max_source_length, max_target_length):
  return Seq2SeqSplit(
    sources=list(sources),
    targets=list(targets),
    source_ids_NxS=vocabulary.encode_batch(sources, max_source_length),
    target_ids_NxL=vocabulary.encode_batch(targets, max_target_length),
  )


def load_dates(data_config) -> Seq2SeqData:
  """The embedded date-normalisation task (`tmoe_jax.data.dates`), built from the seed."""
  validate_fields(data_config, DATES_FIELDS, section="data")
  for field in ("dir", "tfds_data_dir"):
    require(
      not data_config[field],
      f"data.{field}",
      "task 'dates' is generated in code and reads no files; leave it empty",
    )
  raw = dates.make_splits(
    data_config.seed, data_config.num_train, data_config.num_test, data_config.num_validation
  )
  # The vocabulary comes from the training split only, as it would for real data.
  vocabulary = CharVocabulary.from_texts(raw["train"][0] + raw["train"][1])
  max_source_length = dates.MAX_SOURCE_LENGTH + 1
  max_target_length = dates.TARGET_LENGTH + 1
  splits = {
    name: encode_split(vocabulary, sources, targets, max_source_length, max_target_length)
    for name, (sources, targets) in raw.items()
  }
  return Seq2SeqData(vocabulary, splits, max_source_length, max_target_length)


def load_translation(data_config, vocabulary: SubwordVocabulary | None = None) -> Seq2SeqData:
  """Parallel text (Multi30k-style files or TFDS) with a shared sentencepiece vocabulary.

  The vocabulary is trained offline on the training split (sources and targets
  together, deterministic), unless `vocabulary` is given (a saved one).
  Sequences longer than data.max_source_length / max_target_length ids are truncated.
  """
  validate_fields(data_config, TRANSLATION_FIELDS, section="data")
  require(
    data_config.vocabulary_type in VOCABULARY_TYPES,
    "data.vocabulary_type",
    f"must be one of {VOCABULARY_TYPES}, got {data_config.vocabulary_type!r}",
  )
  split_names = dict(data_config.splits)
  require("train" in split_names, "data.splits", f"must name a 'train' split, got {split_names}")
  raw = load_parallel_text(
    data_dir=data_config.dir,
    tfds_data_dir=data_config.tfds_data_dir,
    tfds_name=data_config.tfds_name,
    source_language=data_config.source_language,
    target_language=data_config.target_language,
    splits=split_names,
  )
  if vocabulary is None:
    train = raw["train"]
    vocabulary = SubwordVocabulary.train(
      train.sources + train.targets,
      data_config.vocab_size,
      model_type=data_config.vocabulary_type,
      seed=data_config.seed,
    )
  splits = {
    name: encode_split(
      vocabulary, pairs.sources, pairs.targets, data_config.max_source_length, data_config.max_target_length
    )
    for name, pairs in raw.items()
  }
  return Seq2SeqData(vocabulary, splits, data_config.max_source_length, data_config.max_target_length)


# data.name -> loader; `translation` reads any line-aligned parallel corpus (Multi30k, WMT via TFDS).
SEQ2SEQ_TASKS = {"dates": load_dates, "translation": load_translation}


def load_seq2seq_data(data_config) -> Seq2SeqData:
  if data_config.name not in SEQ2SEQ_TASKS:
    raise ConfigError(f"data.name: unknown seq2seq task {data_config.name!r}; known: {sorted(SEQ2SEQ_TASKS)}")
  return SEQ2SEQ_TASKS[data_config.name](data_config)


def decoder_inputs(target_ids_BxL: np.ndarray, bos_id: int) -> np.ndarray:
  """Targets shifted right behind BOS (teacher forcing); the final token falls off."""
  shifted = np.roll(target_ids_BxL, 1, axis=1)
  shifted[:, 0] = bos_id
  # The EOS of a full-length target rolls to the front and is overwritten; a
  # padded target's shifted EOS stays as the input that predicts the next pad.
  return shifted


def make_batch(split: Seq2SeqSplit, indices: np.ndarray, bos_id: int) -> dict[str, np.ndarray]:
  targets = split.target_ids_NxL[indices]
  return {
    "source": split.source_ids_NxS[indices],
    "decoder_input": decoder_inputs(targets, bos_id),
    "target": targets,
  }
