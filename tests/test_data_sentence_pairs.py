"""Tests for the MRPC sentence-pair loaders (GLUE TSV and TFDS under mock_data) and the baseline metrics.

TFDS note: `tfds.testing.mock_data` does mock `tfds.data_source` in this TFDS version when
each split is asked for by name (no metadata files ship with the package). `glue` is only
registered once `tensorflow_datasets.text.glue` is imported, which the loader does itself.
"""

from __future__ import annotations

import pathlib
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tmoe_jax.data import sentence_pairs
from tmoe_jax.errors import DataError

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
MRPC_DIR = SHARED_DATA / "glue_mrpc"

HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
UNLABELLED_TEST_HEADER = "index\t#1 ID\t#2 ID\t#1 String\t#2 String"

# Sentences that a quoting CSV reader would mangle: leading quotes, a quote pair spanning
# columns, a lone quote.
ROWS = [
  (
    "1",
    "11",
    "12",
    '" Sanitation is poor ... there could be typhoid , " he said .',
    "It is poor , he said .",
  ),
  (
    "0",
    "21",
    "22",
    "He said the pie business doesn 't fit .",
    '" The pie business does not fit our strategy .',
  ),
  ("1", "31", "32", 'The " quoted " word stays .', '"'),
  ("1", "41", "42", "Plain sentence one .", "Plain sentence two ."),
]


def write_tsv(path: pathlib.Path, rows, *, header=HEADER, bom=True, newline="\n") -> pathlib.Path:
  lines = [header] + ["\t".join(row) for row in rows]
  text = ("\ufeff" if bom else "") + newline.join(lines) + newline
  path.write_bytes(text.encode("utf-8"))
  return path


def load(data_dir="", tfds_data_dir="", name="glue/mrpc"):
  return sentence_pairs.load_sentence_pairs(
    name=name, data_dir=str(data_dir), tfds_data_dir=str(tfds_data_dir)
  )


# --------------------------------------------------------------------------
# read_glue_tsv


@pytest.mark.parametrize("bom", [True, False], ids=["bom", "no_bom"])
@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_read_glue_tsv_keeps_quotes_intact(tmp_path, bom, newline):
  pairs = sentence_pairs.read_glue_tsv(write_tsv(tmp_path / "train.tsv", ROWS, bom=bom, newline=newline))
  assert len(pairs) == 4
  assert pairs.sentence1 == [row[3] for row in ROWS]
  assert pairs.sentence2 == [row[4] for row in ROWS]
  assert pairs.labels_N.dtype == np.int32
  assert pairs.labels_N.tolist() == [1, 0, 1, 1]


@pytest.mark.parametrize(
  "bad_row, line",
  [
    ("1\t51\t52\tonly four fields", 3),
    ("1\t51\t52\ta\tb\tsix fields", 3),
    ("yes\t51\t52\ta\tb", 3),
    ("", 3),
  ],
  ids=["four_fields", "six_fields", "bad_quality", "blank_line"],
)
def test_malformed_row_names_file_and_line(tmp_path, bad_row, line):
  path = tmp_path / "dev.tsv"
  path.write_text(HEADER + "\n" + "\t".join(ROWS[0]) + "\n" + bad_row + "\n" + "\t".join(ROWS[1]) + "\n")
  with pytest.raises(DataError, match=f"dev.tsv:{line}: expected 5 tab-separated fields"):
    sentence_pairs.read_glue_tsv(path)


def test_wrong_header_is_rejected(tmp_path):
  with pytest.raises(DataError, match="train.tsv:1: header"):
    sentence_pairs.read_glue_tsv(write_tsv(tmp_path / "train.tsv", ROWS, header="a\tb\tc\td\te"))
  with pytest.raises(DataError, match="unlabelled"):
    sentence_pairs.read_glue_tsv(write_tsv(tmp_path / "test.tsv", ROWS, header=UNLABELLED_TEST_HEADER))


def test_unreadable_file_is_named(tmp_path):
  with pytest.raises(DataError, match="missing.tsv"):
    sentence_pairs.read_glue_tsv(tmp_path / "missing.tsv")
  path = tmp_path / "latin1.tsv"
  path.write_bytes((HEADER + "\n1\t1\t2\tcaf\xe9\tb\n").encode("latin-1"))
  with pytest.raises(DataError, match="latin1.tsv"):
    sentence_pairs.read_glue_tsv(path)


# --------------------------------------------------------------------------
# load_sentence_pairs from a directory


def test_load_directory_with_and_without_test(tmp_path):
  write_tsv(tmp_path / "train.tsv", ROWS)
  write_tsv(tmp_path / "dev.tsv", ROWS[:2])
  splits = load(tmp_path)
  assert sorted(splits) == ["dev", "train"]
  assert len(splits["train"]) == 4 and len(splits["dev"]) == 2

  # GLUE's own test.tsv (unlabelled, first column `index`) is not a split ...
  write_tsv(tmp_path / "test.tsv", [("0",) + row[1:] for row in ROWS], header=UNLABELLED_TEST_HEADER)
  assert sorted(load(tmp_path)) == ["dev", "train"]
  # ... a labelled one is.
  write_tsv(tmp_path / "test.tsv", ROWS[2:])
  splits = load(tmp_path)
  assert sorted(splits) == ["dev", "test", "train"]
  assert splits["test"].sentence2 == [ROWS[2][4], ROWS[3][4]]
  # A damaged labelled test file is an error, not silently dropped.
  (tmp_path / "test.tsv").write_text(HEADER + "\n1\tonly two\n")
  with pytest.raises(DataError, match="test.tsv:2"):
    load(tmp_path)


def test_missing_split_file_is_named(tmp_path):
  write_tsv(tmp_path / "train.tsv", ROWS)
  with pytest.raises(DataError, match="missing dev.tsv"):
    load(tmp_path)
  with pytest.raises(DataError, match="not a directory"):
    load(tmp_path / "no-such-dir")


def test_no_source_says_how_to_get_the_data():
  with pytest.raises(DataError) as raised:
    load()
  message = str(raised.value)
  assert "\n" not in message
  for needle in [
    "download_glue_data.py --tasks MRPC",
    "train.tsv",
    "dev.tsv",
    "--config.data.dir=DIR",
    "tfds build glue/mrpc --data_dir DIR --file_format array_record",
    "--config.data.tfds_data_dir=DIR",
  ]:
    assert needle in message


# --------------------------------------------------------------------------
# load_sentence_pairs from TFDS


def test_tfds_source_under_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=5):
    with mock.patch.object(tfds, "data_source", wraps=tfds.data_source) as data_source:
      splits = load(tfds_data_dir=tmp_path)
    records = list(tfds.data_source("glue/mrpc", split="validation", data_dir=str(tmp_path), download=False))
  # TFDS's test split is never read: its labels are withheld (-1).
  assert [c.kwargs["split"] for c in data_source.call_args_list] == ["train", "validation"]
  assert all(c.kwargs["download"] is False for c in data_source.call_args_list)
  assert sorted(splits) == ["dev", "train"]
  dev = splits["dev"]
  assert len(dev) == 5 and dev.labels_N.dtype == np.int32
  assert dev.labels_N.tolist() == [int(r["label"]) for r in records]
  assert dev.sentence1 == [str(r["sentence1"]) for r in records]
  assert dev.sentence2 == [str(r["sentence2"]) for r in records]
  assert all(isinstance(s, str) for s in dev.sentence1 + dev.sentence2)


def test_tfds_bytes_are_decoded_as_utf8():
  assert sentence_pairs._as_text(np.array("caf\xe9".encode(), dtype=object)) == "caf\xe9"
  assert sentence_pairs._as_text("caf\xe9".encode()) == "caf\xe9"
  assert sentence_pairs._as_text("plain") == "plain"


def test_tfds_dir_without_array_record_data_says_how_to_build_it(tmp_path):
  with pytest.raises(
    DataError, match=r"no readable array_record build of glue/mrpc/train.*tfds build glue/mrpc"
  ):
    load(tfds_data_dir=tmp_path)


# --------------------------------------------------------------------------
# Metrics


def test_binary_f1_hand_computed():
  # TP = 2 (positions 0, 4), FP = 1 (position 1), FN = 1 (position 2): F1 = 4 / 6.
  assert sentence_pairs.binary_f1([1, 1, 0, 0, 1], [1, 0, 1, 0, 1]) == pytest.approx(2 / 3)
  assert sentence_pairs.binary_f1([1, 0, 1], [1, 0, 1]) == 1.0
  assert sentence_pairs.binary_f1([0, 0, 0], [1, 1, 0]) == 0.0
  # No positive predicted or present: F1 is undefined and reported as 0 (as scikit-learn does).
  assert sentence_pairs.binary_f1([0, 0], [0, 0]) == 0.0
  with pytest.raises(ValueError, match="predictions"):
    sentence_pairs.binary_f1([0, 2], [0, 1])
  with pytest.raises(ValueError, match="equal-length"):
    sentence_pairs.binary_f1([0, 1, 1], [0, 1])


def test_majority_baseline_hand_computed():
  # Majority 1: 3 of 4 right; TP = 3, FP = 1, FN = 0: F1 = 6 / 7.
  result = sentence_pairs.majority_baseline([1, 1, 0, 1])
  assert result == {"majority_class": 1, "accuracy": 0.75, "f1": pytest.approx(6 / 7)}
  # The class comes from the training labels: predicting 0 everywhere gets 1 of 4 right, F1 0.
  result = sentence_pairs.majority_baseline([1, 1, 0, 1], train_labels=[0, 0, 1])
  assert result == {"majority_class": 0, "accuracy": 0.25, "f1": 0.0}
  assert sentence_pairs.majority_baseline([0, 1])["majority_class"] == 0  # ties go to the smaller class


# --------------------------------------------------------------------------
# Real MRPC


@pytest.fixture(scope="module")
def mrpc():
  if not (MRPC_DIR / "train.tsv").is_file():
    pytest.skip(f"real GLUE MRPC not found at {MRPC_DIR} (only on the development machine)")
  return load(MRPC_DIR)


def test_real_mrpc_sizes(mrpc):
  assert sorted(mrpc) == ["dev", "train"]
  assert len(mrpc["train"]) == 3_668 and int(mrpc["train"].labels_N.sum()) == 2_474
  assert len(mrpc["dev"]) == 408
  # No row was merged into another: one pair per line after the header.
  for split in ("train", "dev"):
    num_lines = len((MRPC_DIR / f"{split}.tsv").read_bytes().splitlines())
    assert len(mrpc[split]) == num_lines - 1
  assert not mrpc["train"].sentence1[0].startswith("\ufeff")


def test_real_mrpc_row_starting_with_a_quote_is_intact(mrpc):
  dev = mrpc["dev"]
  i = dev.sentence1.index('" Sanitation is poor ... there could be typhoid and cholera , " he said .')
  assert dev.sentence2[i] == (
    '" Sanitation is poor , drinking water is generally left behind . . . there could be typhoid and cholera . "'
  )
  assert dev.labels_N[i] == 0
  assert sum(s.startswith('"') for s in mrpc["train"].sentence1 + mrpc["train"].sentence2) > 100


def test_real_mrpc_majority_baseline(mrpc):
  result = sentence_pairs.majority_baseline(mrpc["dev"].labels_N, train_labels=mrpc["train"].labels_N)
  assert result["majority_class"] == 1
  # Dev has 279 paraphrases of 408: accuracy 279/408, F1 2*279 / (2*279 + 129).
  assert result["accuracy"] == pytest.approx(279 / 408) and round(result["accuracy"], 3) == 0.684
  assert result["f1"] == pytest.approx(558 / 687) and round(result["f1"], 3) == 0.812
