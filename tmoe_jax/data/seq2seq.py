"""Seq2seq datasets as id arrays, and the batches the train step consumes.

Shapes: N examples, S source length, L target length (EOS included).
Sources end with EOS; targets end with EOS and are fed to the decoder shifted
right behind a BOS (`decoder_inputs`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tmoe_jax.data import dates
from tmoe_jax.data.vocabulary import CharVocabulary
from tmoe_jax.errors import ConfigError


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
  vocabulary: CharVocabulary
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
  raw = dates.make_splits(data_config.seed, data_config.num_train, data_config.num_test)
  # The vocabulary comes from the training split only, as it would for real data.
  vocabulary = CharVocabulary.from_texts(raw["train"][0] + raw["train"][1])
  max_source_length = dates.MAX_SOURCE_LENGTH + 1
  max_target_length = dates.TARGET_LENGTH + 1
  splits = {
    name: encode_split(vocabulary, sources, targets, max_source_length, max_target_length)
    for name, (sources, targets) in raw.items()
  }
  return Seq2SeqData(vocabulary, splits, max_source_length, max_target_length)


SEQ2SEQ_TASKS = {"dates": load_dates}


def load_seq2seq_data(data_config) -> Seq2SeqData:
  if data_config.name not in SEQ2SEQ_TASKS:
    raise ConfigError(f"data.name: unknown seq2seq task {data_config.name!r}; known: {sorted(SEQ2SEQ_TASKS)}")
  if data_config.dir:
    raise ConfigError(
      f"data.dir: task {data_config.name!r} is generated in code and reads no files; leave data.dir empty"
    )
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
