"""Tests for `tmoe_jax.data.parallel_text`: line files, a TFDS array_record build, the real Multi30k files."""

from __future__ import annotations

import gzip
import pathlib

import pytest

from tmoe_jax.data.parallel_text import ParallelText, load_parallel_text, read_lines
from tmoe_jax.errors import ConfigError, DataError

MULTI30K_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"
MULTI30K_SPLITS = {"train": "train", "validation": "val", "test": "test_2016_flickr"}


def _write(path: pathlib.Path, lines: list[str], *, newline: str = "\n") -> None:
  data = "".join(line + newline for line in lines).encode("utf-8")
  if path.suffix == ".gz":
    with gzip.open(path, "wb") as f:
      f.write(data)
  else:
    path.write_bytes(data)


def _load_files(data_dir, splits, source="de", target="en"):
  return load_parallel_text(
    data_dir=str(data_dir),
    tfds_data_dir="",
    tfds_name="",
    source_language=source,
    target_language=target,
    splits=splits,
  )


def test_reads_gzipped_and_plain_files_keeping_inner_whitespace(tmp_path):
  german = ["Ein Hund  läuft.", " Zwei\tKatzen ", "", "Über\u00a0alles"]
  english = ["A dog  runs.", " Two\tcats ", "", "Above\u00a0all"]
  _write(tmp_path / "train.de.gz", german)
  _write(tmp_path / "train.en.gz", english)
  # The test split as plain files with Windows line ends.
  _write(tmp_path / "test_x.de", german[:2], newline="\r\n")
  _write(tmp_path / "test_x.en", english[:2], newline="\r\n")

  data = _load_files(tmp_path, {"train": "train", "test": "test_x"})

  assert set(data) == {"train", "test"}
  assert data["train"] == ParallelText(german, english)
  assert len(data["train"]) == 4
  assert data["test"] == ParallelText(german[:2], english[:2])
  # The reverse direction swaps the columns.
  reverse = _load_files(tmp_path, {"train": "train"}, source="en", target="de")
  assert reverse["train"] == ParallelText(english, german)


def test_last_line_without_newline_and_unicode_line_separators(tmp_path):
  # U+2028 and \x0b are line breaks to str.splitlines, but sentence characters here.
  (tmp_path / "a.de").write_text("eins\u2028zwei\ndrei", encoding="utf-8")
  (tmp_path / "a.en").write_text("one\x0btwo\nthree", encoding="utf-8")
  data = _load_files(tmp_path, {"train": "a"})
  assert data["train"].sources == ["eins\u2028zwei", "drei"]
  assert data["train"].targets == ["one\x0btwo", "three"]


def test_mismatched_line_counts_name_both_files(tmp_path):
  _write(tmp_path / "train.de.gz", ["a", "b", "c"])
  _write(tmp_path / "train.en.gz", ["a", "b"])
  with pytest.raises(DataError, match=r"train\.de\.gz has 3 lines but .*train\.en\.gz has 2"):
    _load_files(tmp_path, {"train": "train"})


def test_missing_file_lists_the_directory(tmp_path):
  _write(tmp_path / "train.de.gz", ["a"])
  _write(tmp_path / "train.fr.gz", ["a"])
  with pytest.raises(
    DataError, match=r"missing train\.en\.gz \(or train\.en\).*train\.de\.gz, train\.fr\.gz"
  ):
    _load_files(tmp_path, {"train": "train"})


def test_missing_directory(tmp_path):
  with pytest.raises(DataError, match="is not a directory"):
    _load_files(tmp_path / "nope", {"train": "train"})


def test_empty_split_is_an_error(tmp_path):
  _write(tmp_path / "train.de", [])
  _write(tmp_path / "train.en", [])
  with pytest.raises(DataError, match="are empty"):
    _load_files(tmp_path, {"train": "train"})


def test_bad_utf8_names_file_and_line(tmp_path):
  (tmp_path / "train.de").write_bytes(b"gut\nschl\xffecht\n")
  _write(tmp_path / "train.en", ["good", "bad"])
  with pytest.raises(DataError, match=r"train\.de: line 2 is not valid UTF-8"):
    _load_files(tmp_path, {"train": "train"})


def test_truncated_gzip_names_file(tmp_path):
  _write(tmp_path / "train.de.gz", ["ein Satz"] * 200)
  raw = (tmp_path / "train.de.gz").read_bytes()
  (tmp_path / "train.de.gz").write_bytes(raw[: len(raw) // 2])
  _write(tmp_path / "train.en.gz", ["a sentence"] * 200)
  with pytest.raises(DataError, match=r"train\.de\.gz: cannot read"):
    _load_files(tmp_path, {"train": "train"})


def test_read_lines_on_an_empty_file(tmp_path):
  (tmp_path / "empty.txt").write_bytes(b"")
  assert read_lines(tmp_path / "empty.txt") == []


def test_no_data_says_how_to_get_it():
  with pytest.raises(DataError) as info:
    load_parallel_text(
      data_dir="",
      tfds_data_dir="",
      tfds_name="",
      source_language="de",
      target_language="en",
      splits=MULTI30K_SPLITS,
    )
  message = str(info.value)
  assert "\n" not in message
  for needle in (
    "https://github.com/multi30k/dataset",
    "data/task1/raw",
    "train.de.gz",
    "test_2016_flickr.en.gz",
    "tfds build wmt14_translate/de-en",
    "--file_format array_record",
    "--config.data.dir=DIR",
    "--config.data.tfds_data_dir=DIR",
  ):
    assert needle in message


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"data_dir": "a", "tfds_data_dir": "b"}, "both set"),
    ({"source_language": "en"}, "both 'en'"),
    ({"source_language": ""}, "data.source_language"),
    ({"splits": {}}, "non-empty mapping"),
    ({"splits": {"train": ""}}, "non-empty str"),
    ({"tfds_data_dir": "somewhere", "tfds_name": ""}, "data.tfds_name"),
  ],
)
def test_bad_arguments_are_config_errors(kwargs, match):
  arguments = {
    "data_dir": "",
    "tfds_data_dir": "",
    "tfds_name": "",
    "source_language": "de",
    "target_language": "en",
    "splits": {"train": "train"},
  }
  with pytest.raises(ConfigError, match=match):
    load_parallel_text(**{**arguments, **kwargs})


def test_parallel_text_checks_alignment():
  with pytest.raises(ValueError, match="2 sources but 1 targets"):
    ParallelText(["a", "b"], ["a"])


# --------------------------------------------------------------------------
# TFDS: a real array_record build made here (TFDS writes it without TensorFlow), and mock_data.


def _build_tiny_tfds(data_dir: pathlib.Path) -> dict[str, list[dict[str, str]]]:
  import tensorflow_datasets as tfds

  examples = {
    "train": [{"de": f"Ein Hund  Nummer {i} läuft.", "en": f"A dog number {i} runs."} for i in range(7)],
    "test": [{"de": "Über alles ", "en": "Above all "}],
  }

  # skip_registration: the dataset is then read back from its files alone, as a build of
  # wmt14_translate copied from another machine is when TFDS cannot import its builder.
  class TinyTranslate(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.Translation(languages=["de", "en"]))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in examples}

    def _generate_examples(self, split):
      yield from enumerate(examples[split])

  TinyTranslate(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return examples


def _load_tfds(tfds_data_dir, tfds_name, splits, source="de", target="en"):
  return load_parallel_text(
    data_dir="",
    tfds_data_dir=str(tfds_data_dir),
    tfds_name=tfds_name,
    source_language=source,
    target_language=target,
    splits=splits,
  )


def test_tfds_array_record_build(tmp_path):
  examples = _build_tiny_tfds(tmp_path)
  data = _load_tfds(tmp_path, "tiny_translate", {"train": "train", "validation": "train[:3]", "test": "test"})
  assert len(data["train"]) == 7
  # TFDS stores the records shuffled, so the pairs are compared as a set.
  assert sorted(zip(data["train"].sources, data["train"].targets)) == sorted(
    (e["de"], e["en"]) for e in examples["train"]
  )
  assert len(data["validation"]) == 3
  assert data["test"] == ParallelText(["Über alles "], ["Above all "])

  with pytest.raises(DataError, match=r"languages \['de', 'en'\], not \['fr'\]"):
    _load_tfds(tmp_path, "tiny_translate", {"train": "train"}, target="fr")


def test_tfds_missing_dataset_says_how_to_get_it(tmp_path):
  with pytest.raises(
    DataError, match=r"holds no readable array_record build of wmt14_translate/de-en/train.*tfds build"
  ):
    _load_tfds(tmp_path, "wmt14_translate/de-en", {"train": "train"})


def test_tfds_mock_data_for_wmt14():
  # tfds.testing.mock_data does mock tfds.data_source in TFDS 4.9.10 (with random str
  # records instead of bytes, and a __getitems__ the loader has to fall back from).
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=5):
    data = _load_tfds("/nonexistent", "wmt14_translate/de-en", {"train": "train", "test": "newstest2014"})
  for split in ("train", "test"):
    assert len(data[split]) == 5
    assert all(isinstance(s, str) for s in data[split].sources + data[split].targets)
  assert data["train"].sources != data["train"].targets


# --------------------------------------------------------------------------
# The real Multi30k files.


def test_real_multi30k_files():
  if not MULTI30K_DIR.is_dir():
    pytest.skip(f"real Multi30k files not found at {MULTI30K_DIR} (only on the project's data machine)")
  data = _load_files(MULTI30K_DIR, MULTI30K_SPLITS)
  assert {name: len(split) for name, split in data.items()} == {
    "train": 29000,
    "validation": 1014,
    "test": 1000,
  }
  assert data["train"].sources[0] == "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."
  assert data["train"].targets[0] == "Two young, White males are outside near many bushes."
  assert data["validation"].targets[0] == "A group of men are loading cotton onto a truck"
  assert data["test"].sources[0] == "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt."
  for split in data.values():
    assert split.sources[0] and split.targets[0]
    assert not any("\n" in s for s in split.sources + split.targets)
  # One training sentence has a tab inside it; it must survive loading.
  assert any("\t" in s for s in data["train"].sources)
