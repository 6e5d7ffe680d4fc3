"""Labelled sentence pairs (GLUE MRPC paraphrase detection) from GLUE TSV files or a TFDS directory.

Shapes: N pairs; labels_N int32, 1 = paraphrase (the positive class), 0 = not.

Two sources, chosen by the config, neither downloaded here (the training machines are
offline):

* ``data.dir``: GLUE's ``train.tsv`` and ``dev.tsv`` (and a labelled ``test.tsv`` if one is
  given) with the columns ``Quality  #1 ID  #2 ID  #1 String  #2 String``.
* ``data.tfds_data_dir``: a TFDS data dir with ``glue/mrpc`` prepared elsewhere in the
  ``array_record`` format; its ``validation`` split is our ``dev``, and its ``test`` split
  is dropped because GLUE withholds those labels (they are all -1).

Also the reference numbers every MRPC result is compared with: the majority-class
baseline and F1 of the positive class.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib

import numpy as np

from tmoe_jax.data.tfds_records import read_tfds_records
from tmoe_jax.errors import DataError

GLUE_HEADER = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
TSV_SPLITS = {"train": "train.tsv", "dev": "dev.tsv"}
OPTIONAL_TSV_SPLITS = {"test": "test.tsv"}

# TFDS split -> our split; TFDS's "test" is left out on purpose (unlabelled).
TFDS_SPLITS = {"train": "train", "validation": "dev"}

# TFDS registers its builders by importing every dataset package in turn and stops at the
# first one whose optional dependency is missing (before reaching `text`), so the builder
# is imported explicitly.
TFDS_BUILDER_MODULES = {"glue": "tensorflow_datasets.text.glue"}


@dataclasses.dataclass(frozen=True)
class SentencePairs:
  sentence1: list[str]
  sentence2: list[str]
  labels_N: np.ndarray

  def __len__(self) -> int:
    return len(self.labels_N)


def read_glue_tsv(path) -> SentencePairs:
  """Reads a labelled GLUE MRPC TSV file (UTF-8, optional byte-order mark, one header line).

  Quoting is disabled: some sentences begin with a double quote, which a quoting reader
  would take as the start of a quoted field and silently merge rows.
  """
  path = pathlib.Path(path)
  sentence1, sentence2, labels = [], [], []
  try:
    # utf-8-sig drops the byte-order mark of the original download.
    with path.open(encoding="utf-8-sig", newline="") as f:
      reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
      header = next(reader, None)
      if header != GLUE_HEADER:
        hint = (
          " (GLUE's own test.tsv is unlabelled: it cannot be evaluated)"
          if header and header[0] == "index"
          else ""
        )
        raise DataError(f"{path}:1: header {header} is not the GLUE MRPC header {GLUE_HEADER}{hint}")
      for row in reader:
        if len(row) != len(GLUE_HEADER) or row[0] not in ("0", "1"):
          raise DataError(
            f"{path}:{reader.line_num}: expected {len(GLUE_HEADER)} tab-separated fields with Quality "
            f"0 or 1, got {len(row)} field(s) starting {row[:1]}"
          )
        labels.append(int(row[0]))
        sentence1.append(row[3])
        sentence2.append(row[4])
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read GLUE TSV file: {e}") from e
  return SentencePairs(sentence1, sentence2, np.array(labels, dtype=np.int32))


def load_sentence_pairs(*, name: str, data_dir: str, tfds_data_dir: str) -> dict[str, SentencePairs]:
  """Splits "train" and "dev" (and "test" when a labelled test.tsv is given) from `data_dir` or else TFDS."""
  if data_dir:
    directory = pathlib.Path(data_dir)
    if not directory.is_dir():
      raise DataError(f"data.dir {data_dir!r} is not a directory; {missing_data_message(name)}")
    splits = {}
    for split, filename in TSV_SPLITS.items():
      if not (directory / filename).is_file():
        raise DataError(f"{directory}: missing {filename}; {missing_data_message(name)}")
      splits[split] = read_glue_tsv(directory / filename)
    for split, filename in OPTIONAL_TSV_SPLITS.items():
      # GLUE's own download ships an unlabelled test.tsv beside train and dev: not a split here.
      if (directory / filename).is_file() and not _is_unlabelled_glue_test(directory / filename):
        splits[split] = read_glue_tsv(directory / filename)
    return splits
  if tfds_data_dir:
    return {ours: _read_tfds_split(name, tfds_data_dir, theirs) for theirs, ours in TFDS_SPLITS.items()}
  raise DataError(missing_data_message(name))


def missing_data_message(name: str) -> str:
  """One line saying how to get MRPC onto an offline machine."""
  return (
    f"no data for sentence-pair dataset {name!r}: either download MRPC with GLUE's "
    f"download_glue_data.py --tasks MRPC (https://github.com/nyu-mll/GLUE-baselines) and set "
    f"--config.data.dir=DIR to the folder holding its train.tsv and dev.tsv, or on a machine with "
    f"internet and TensorFlow run `tfds build glue/mrpc --data_dir DIR --file_format array_record`, "
    f"copy DIR here and set --config.data.tfds_data_dir=DIR"
  )


def _is_unlabelled_glue_test(path: pathlib.Path) -> bool:
  """Whether `path` is GLUE's test file, whose first column is `index` instead of `Quality`."""
  try:
    with path.open(encoding="utf-8-sig", newline="") as f:
      return f.readline().split("\t", 1)[0] == "index"
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read GLUE TSV file: {e}") from e


def _as_text(value) -> str:
  # Real TFDS records hold UTF-8 bytes, tfds' mock_data holds str.
  value = value.item() if isinstance(value, np.ndarray) else value
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _read_tfds_split(name: str, tfds_data_dir: str, split: str) -> SentencePairs:
  examples = read_tfds_records(
    name, split, tfds_data_dir, builder_modules=TFDS_BUILDER_MODULES, how_to_get=missing_data_message(name)
  )
  labels_N = np.array([int(example["label"]) for example in examples], dtype=np.int32)
  if labels_N.size and labels_N.min() < 0:
    raise DataError(f"tfds:{name}/{split}: unlabelled examples (label {int(labels_N.min())})")
  return SentencePairs(
    sentence1=[_as_text(example["sentence1"]) for example in examples],
    sentence2=[_as_text(example["sentence2"]) for example in examples],
    labels_N=labels_N,
  )


def binary_f1(predictions, labels) -> float:
  """F1 of the positive class 1: 2 TP / (2 TP + FP + FN); 0.0 when there is no positive at all."""
  predictions_N = np.asarray(predictions)
  labels_N = np.asarray(labels)
  if predictions_N.shape != labels_N.shape or predictions_N.ndim != 1:
    raise ValueError(
      f"predictions {predictions_N.shape} and labels {labels_N.shape} must be equal-length vectors"
    )
  for field, values in (("predictions", predictions_N), ("labels", labels_N)):
    if not np.isin(values, (0, 1)).all():
      raise ValueError(f"{field} must be 0 or 1, got {np.unique(values).tolist()}")
  true_positives = int(np.sum((predictions_N == 1) & (labels_N == 1)))
  false_positives = int(np.sum((predictions_N == 1) & (labels_N == 0)))
  false_negatives = int(np.sum((predictions_N == 0) & (labels_N == 1)))
  denominator = 2 * true_positives + false_positives + false_negatives
  return 2 * true_positives / denominator if denominator else 0.0


def majority_baseline(labels, train_labels=None) -> dict:
  """Accuracy and positive-class F1 on `labels` of always predicting the majority class.

  The majority class is that of `train_labels` (of `labels` itself when not given); ties go
  to the smaller class. Returns {"majority_class", "accuracy", "f1"}.
  """
  labels_N = np.asarray(labels)
  reference = labels_N if train_labels is None else np.asarray(train_labels)
  if labels_N.size == 0 or reference.size == 0:
    raise ValueError("majority_baseline needs at least one label")
  majority_class = int(np.argmax(np.bincount(reference.astype(np.int64), minlength=2)))
  predictions_N = np.full_like(labels_N, majority_class)
  return {
    "majority_class": majority_class,
    "accuracy": float(np.mean(predictions_N == labels_N)),
    "f1": binary_f1(predictions_N, labels_N),
  }
