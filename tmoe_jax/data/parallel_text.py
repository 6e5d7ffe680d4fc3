"""Sentence-aligned translation text (Multi30k, WMT, ...) from line files or a prepared TFDS directory.

Two sources, chosen by the config, neither downloaded here (the training machines are offline):

* ``data.dir``: one file per split and language, line ``i`` of ``<split>.<source>`` translating
  to line ``i`` of ``<split>.<target>``, gzipped (``<split>.<lang>.gz``, as Multi30k ships them)
  or plain (``<split>.<lang>``).
* ``data.tfds_data_dir``: a TFDS data dir prepared elsewhere in the ``array_record`` format for a
  translation dataset whose records are ``{language: text}`` (e.g. ``wmt14_translate/de-en``),
  read with ``tfds.data_source`` (no TensorFlow needed).

Only the line terminator is removed from each sentence: inner and edge spaces are kept, since
the subword tokenizer round-trips them exactly and normalising is a modelling decision.
"""

from __future__ import annotations

import dataclasses
import gzip
import pathlib
import zlib
from collections.abc import Mapping

from tmoe_jax.data.tfds_records import read_tfds_records
from tmoe_jax.errors import ConfigError, DataError

MULTI30K_URL = "https://github.com/multi30k/dataset (data/task1/raw)"

# TFDS registers its builders by importing every dataset package in turn and stops at the
# first one whose optional dependency (TensorFlow) is missing, so a builder is imported
# explicitly. Only builders whose records are {language: text} belong here.
TFDS_BUILDER_MODULES = {
  **{f"wmt{year}_translate": f"tensorflow_datasets.translate.wmt{year}" for year in range(13, 20)},
  "wmt_t2t_translate": "tensorflow_datasets.translate.wmt_t2t",
  "ted_hrlr_translate": "tensorflow_datasets.translate.ted_hrlr",
}

# How many file names a missing-file error lists.
_MAX_LISTED_FILES = 30


@dataclasses.dataclass(frozen=True)
class ParallelText:
  """Aligned sentences: `targets[i]` translates `sources[i]`."""

  sources: list[str]
  targets: list[str]

  def __post_init__(self):
    if len(self.sources) != len(self.targets):
      raise ValueError(f"{len(self.sources)} sources but {len(self.targets)} targets")

  def __len__(self) -> int:
    return len(self.sources)


def load_parallel_text(
  *,
  data_dir: str,
  tfds_data_dir: str,
  tfds_name: str,
  source_language: str,
  target_language: str,
  splits: Mapping[str, str],
) -> dict[str, ParallelText]:
  """Each of our splits, read from `data_dir` (line files) or else `tfds_data_dir` (TFDS).

  `splits` maps our split name to the file stem / TFDS split name, e.g.
  ``{"train": "train", "validation": "val", "test": "test_2016_flickr"}`` for Multi30k.
  Raises DataError naming the file (or TFDS dataset) when data is missing or misaligned.
  """
  _check_arguments(source_language, target_language, splits)
  if data_dir and tfds_data_dir:
    raise ConfigError(
      f"data.dir ({data_dir!r}) and data.tfds_data_dir ({tfds_data_dir!r}) are both set; set only one"
    )
  if data_dir:
    directory = pathlib.Path(data_dir)
    return {
      ours: _read_file_split(directory, stem, source_language, target_language)
      for ours, stem in splits.items()
    }
  if tfds_data_dir:
    if not tfds_name:
      raise ConfigError("data.tfds_name must name the TFDS dataset to read from data.tfds_data_dir")
    return {
      ours: _read_tfds_split(tfds_name, tfds_data_dir, split, source_language, target_language)
      for ours, split in splits.items()
    }
  raise DataError(missing_data_message(tfds_name, source_language, target_language, splits))


def missing_data_message(
  tfds_name: str, source_language: str, target_language: str, splits: Mapping[str, str]
) -> str:
  """One line saying how to get translation data onto an offline machine."""
  files = ", ".join(
    f"{stem}.{lang}.gz" for stem in splits.values() for lang in (source_language, target_language)
  )
  tfds_hint = tfds_name or "wmt14_translate/de-en"
  return (
    f"no {source_language}->{target_language} translation data: either put the line-aligned files "
    f"{files} (gzipped or not; for Multi30k from {MULTI30K_URL}) into DIR and set "
    f"--config.data.dir=DIR, or on a machine with internet and TensorFlow run "
    f"`tfds build {tfds_hint} --data_dir DIR --file_format array_record`, copy DIR here and set "
    f"--config.data.tfds_data_dir=DIR"
  )


def read_lines(path: pathlib.Path) -> list[str]:
  """The lines of a UTF-8 text file, gzipped if its name ends in .gz, without their terminators.

  Lines are split at "\\n" only (a "\\r" before it is dropped too), never at the other
  characters `str.splitlines` treats as breaks, which may occur inside a sentence.
  """
  try:
    if path.suffix == ".gz":
      with gzip.open(path, "rb") as f:
        raw = f.read()
    else:
      raw = path.read_bytes()
  except (OSError, EOFError, zlib.error) as e:
    # gzip.BadGzipFile is an OSError; EOFError and zlib.error mean a truncated or damaged stream.
    raise DataError(f"{path}: cannot read: {e}") from e
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw[: e.start].count(b"\n") + 1
    raise DataError(f"{path}: line {line} is not valid UTF-8: {e.reason}") from e
  if not text:
    return []
  lines = text.split("\n")
  if lines[-1] == "":
    # The terminator of the last line, not an empty last sentence.
    lines.pop()
  return [line.removesuffix("\r") for line in lines]


def _check_arguments(source_language: str, target_language: str, splits: Mapping[str, str]) -> None:
  for field, language in (("source_language", source_language), ("target_language", target_language)):
    if not isinstance(language, str) or not language:
      raise ConfigError(f"data.{field} must be a non-empty language code such as 'de', got {language!r}")
  if source_language == target_language:
    raise ConfigError(f"data.source_language and data.target_language are both {source_language!r}")
  if not isinstance(splits, Mapping) or not splits:
    raise ConfigError(f"splits must be a non-empty mapping from our split name to the data's, got {splits!r}")
  for ours, theirs in splits.items():
    if not isinstance(ours, str) or not isinstance(theirs, str) or not ours or not theirs:
      raise ConfigError(f"splits: {ours!r} -> {theirs!r} must map a non-empty str to a non-empty str")


def _find_text_file(directory: pathlib.Path, stem: str, language: str) -> pathlib.Path:
  base = f"{stem}.{language}"
  # The gzipped file first, as Multi30k ships it; a `gunzip -k` copy beside it has the same lines.
  for candidate in (directory / f"{base}.gz", directory / base):
    if candidate.is_file():
      return candidate
  if not directory.is_dir():
    raise DataError(f"data.dir {str(directory)!r} is not a directory")
  present = sorted(p.name for p in directory.iterdir())
  listed = ", ".join(present[:_MAX_LISTED_FILES]) or "nothing"
  if len(present) > _MAX_LISTED_FILES:
    listed += f", ... ({len(present)} entries)"
  raise DataError(f"{directory}: missing {base}.gz (or {base}); the directory holds: {listed}")


def _read_file_split(directory: pathlib.Path, stem: str, source_language: str, target_language: str):
  source_path = _find_text_file(directory, stem, source_language)
  target_path = _find_text_file(directory, stem, target_language)
  sources = read_lines(source_path)
  targets = read_lines(target_path)
  if len(sources) != len(targets):
    raise DataError(
      f"{source_path} has {len(sources)} lines but {target_path} has {len(targets)}; "
      "the files of a split must be line-aligned translations"
    )
  if not sources:
    raise DataError(f"{source_path} and {target_path} are empty")
  return ParallelText(sources, targets)


def _as_text(value, where: str) -> str:
  # Real array_record builds hold bytes; tfds.testing.mock_data yields str.
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(f"{where}: not valid UTF-8: {e.reason}") from e
  if isinstance(value, str):
    return value
  raise DataError(f"{where}: expected text, got {type(value).__name__}")


def _read_tfds_split(
  name: str, tfds_data_dir: str, split: str, source_language: str, target_language: str
) -> ParallelText:
  examples = read_tfds_records(
    name,
    split,
    tfds_data_dir,
    builder_modules=TFDS_BUILDER_MODULES,
    how_to_get=missing_data_message(name, source_language, target_language, {split: split}),
  )
  if not examples:
    raise DataError(f"tfds_data_dir {tfds_data_dir!r}: {name}/{split} has no examples")
  missing = [lang for lang in (source_language, target_language) if lang not in examples[0]]
  if missing:
    raise DataError(
      f"tfds:{name}/{split}: records have languages {sorted(examples[0])}, not {missing}; "
      "set data.source_language / data.target_language to two of them"
    )
  where = f"tfds:{name}/{split}"
  sources = [_as_text(example[source_language], f"{where} record {i}") for i, example in enumerate(examples)]
  targets = [_as_text(example[target_language], f"{where} record {i}") for i, example in enumerate(examples)]
  return ParallelText(sources, targets)
