"""Every record of one split of a prepared TFDS dataset, read with `tfds.data_source` (no TensorFlow)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from tmoe_jax.errors import DataError

# Records fetched from a TFDS data source per call: one call per record costs ~4x more time
# (minutes for WMT's 4.5M pairs), one call for the whole split holds every record twice.
_CHUNK = 4096


def _read_all(records) -> list:
  """Every record of a TFDS data source, in its order."""
  examples = []
  try:
    for start in range(0, len(records), _CHUNK):
      examples.extend(records.__getitems__(range(start, min(start + _CHUNK, len(records)))))
  except TypeError:
    # tfds.testing.mock_data (4.9.10) mocks __getitems__ without binding the data source, so
    # the batched call fails there; record by record is ~4x slower but works everywhere.
    examples = [records[i] for i in range(len(records))]
  return examples


def read_tfds_records(
  name: str, split: str, tfds_data_dir: str, *, builder_modules: Mapping[str, str], how_to_get: str
) -> list:
  """The records of `name`/`split` built (as array_record) in `tfds_data_dir`.

  builder_modules: dataset name -> the module defining its builder. TFDS registers its builders
    by importing every dataset package in turn and stops at the first one whose optional
    dependency (TensorFlow) is missing, so the builder is imported explicitly.
  how_to_get: appended to the DataError raised when the build cannot be read.
  """
  # Imported here: TFDS is slow to import and only this source needs it.
  import tensorflow_datasets as tfds

  builder_name = name.split("/")[0].split(":")[0]
  if builder_name in builder_modules:
    importlib.import_module(builder_modules[builder_name])
  try:
    # download=False: this machine may be offline, and TFDS must not try to build the data here.
    records = tfds.data_source(name, split=split, data_dir=tfds_data_dir, download=False)
    return _read_all(records)
  except (ValueError, NotImplementedError, OSError, AssertionError) as e:
    # TFDS raises DatasetNotFoundError (a ValueError) for an unknown name or version,
    # NotImplementedError when the directory holds no array_record files and an
    # AssertionError when a registered builder finds no prepared data.
    detail = str(e).splitlines()[0].rstrip(":. ") if str(e) else ""
    raise DataError(
      f"tfds_data_dir {tfds_data_dir!r} holds no readable array_record build of {name}/{split} "
      f"({type(e).__name__}: {detail}); {how_to_get}"
    ) from e
