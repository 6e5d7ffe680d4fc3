"""Image-classification data (MNIST, Fashion-MNIST, ...) from IDX files or a prepared TFDS directory.

Shapes: N images, H x W pixels (uint8, 0..255), labels int32 in [0, num_classes).

Two sources, chosen by the config, neither downloaded here (the training machines are
offline):

* ``data.dir``: the four files of the original IDX distribution, gzipped or not
  (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
  ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``). Any dataset shipped in
  this format (MNIST, Fashion-MNIST, KMNIST) loads the same way.
* ``data.tfds_data_dir``: a TFDS data dir prepared elsewhere in the ``array_record`` format,
  read record by record with ``tfds.data_source`` (no TensorFlow needed).

The validation split is carved out of train with a permutation keyed by the seed; the
test split is the dataset's own (``t10k`` / TFDS ``test``).
"""

from __future__ import annotations

import dataclasses
import gzip
import pathlib
import struct
import zlib

import numpy as np

from tmoe_jax.data.tfds_records import read_tfds_records
from tmoe_jax.errors import ConfigError, DataError

# IDX magic number: two zero bytes, the element type (0x08 = unsigned byte), the number of
# dimensions. 2051 = 0x0803 (images N x H x W), 2049 = 0x0801 (labels N).
_IDX_UBYTE = 0x08
IMAGES_MAGIC = 0x0803
LABELS_MAGIC = 0x0801
_GZIP_MAGIC = b"\x1f\x8b"

# (images, labels) file names of each split in the IDX distribution, without ".gz".
IDX_FILES = {
  "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Where the IDX files of the known datasets can be downloaded, for the missing-data message.
IDX_DOWNLOAD_URLS = {
  "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
  "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}

# TFDS registers its builders by importing every dataset package in turn and stops at the
# first one whose optional dependency is missing, so a builder is imported explicitly.
TFDS_BUILDER_MODULES = {
  "mnist": "tensorflow_datasets.image_classification.mnist",
  "fashion_mnist": "tensorflow_datasets.image_classification.mnist",
  "kmnist": "tensorflow_datasets.image_classification.mnist",
  "emnist": "tensorflow_datasets.image_classification.mnist",
}


@dataclasses.dataclass(frozen=True)
class ImageClassificationData:
  train_images_NxHxW: np.ndarray
  train_labels_N: np.ndarray
  validation_images_NxHxW: np.ndarray
  validation_labels_N: np.ndarray
  test_images_NxHxW: np.ndarray
  test_labels_N: np.ndarray
  num_classes: int
  # Where the data came from: "idx:<dir>" or "tfds:<name>".
  source: str


def read_idx(path) -> np.ndarray:
  """Reads an unsigned-byte IDX file, plain or gzipped, into a uint8 array of its declared shape.

  Raises DataError naming the file if it is unreadable, truncated, longer than declared, or
  its magic number is not that of an unsigned-byte IDX file.
  """
  path = pathlib.Path(path)
  try:
    raw = path.read_bytes()
  except OSError as e:
    raise DataError(f"{path}: cannot read IDX file: {e}") from e
  # Sniffed rather than trusted from the suffix: a plain IDX file starts with two zero bytes.
  if raw[:2] == _GZIP_MAGIC:
    try:
      raw = gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
      raise DataError(f"{path}: damaged or truncated gzip stream: {e}") from e
  if len(raw) < 4:
    raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header")
  zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
  magic = struct.unpack(">I", raw[:4])[0]
  if zero != 0 or dtype_code != _IDX_UBYTE or ndim == 0:
    raise DataError(
      f"{path}: magic number {magic} (0x{magic:08x}) is not an unsigned-byte IDX file "
      f"(expected 0x0000 08 NN, e.g. {IMAGES_MAGIC} for images, {LABELS_MAGIC} for labels)"
    )
  header_bytes = 4 + 4 * ndim
  if len(raw) < header_bytes:
    raise DataError(f"{path}: truncated header: {ndim} dimensions need {header_bytes} bytes, got {len(raw)}")
  shape = struct.unpack(f">{ndim}I", raw[4:header_bytes])
  expected = header_bytes + int(np.prod(shape, dtype=np.int64))
  if len(raw) != expected:
    problem = "truncated" if len(raw) < expected else "longer than declared"
    raise DataError(f"{path}: {problem}: shape {list(shape)} needs {expected} bytes, the file has {len(raw)}")
  # Copied so callers get a writable array that does not pin the file's bytes.
  return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(shape).copy()


def load_image_classification(
  *, name: str, data_dir: str, tfds_data_dir: str, validation_size: int, seed: int
) -> ImageClassificationData:
  """Train / validation / test images and labels from `data_dir` (IDX) or else `tfds_data_dir` (TFDS)."""
  if data_dir:
    splits = {split: _read_idx_split(pathlib.Path(data_dir), split) for split in IDX_FILES}
    source = f"idx:{data_dir}"
  elif tfds_data_dir:
    splits = {split: _read_tfds_split(name, tfds_data_dir, split) for split in ("train", "test")}
    source = f"tfds:{name}"
  else:
    raise DataError(missing_data_message(name))

  (train_images, train_labels), (test_images, test_labels) = splits["train"], splits["test"]
  if train_images.shape[1:] != test_images.shape[1:]:
    raise DataError(
      f"{source}: train images are {list(train_images.shape[1:])} but test images are "
      f"{list(test_images.shape[1:])}"
    )
  if not len(train_labels):
    raise DataError(f"{source}: the train split has no examples")
  num_classes = int(train_labels.max()) + 1
  if test_labels.size and int(test_labels.max()) >= num_classes:
    raise DataError(
      f"{source}: test label {int(test_labels.max())} never occurs in train (labels 0..{num_classes - 1})"
    )

  num_train = len(train_labels)
  if not 0 <= validation_size < num_train:
    raise ConfigError(
      f"validation_size={validation_size} must be in [0, {num_train}) (the train split's size)"
    )
  permutation = np.random.default_rng(seed).permutation(num_train)
  # Sorted so both parts keep the file's order; only the membership depends on the seed.
  validation_idx = np.sort(permutation[:validation_size])
  train_idx = np.sort(permutation[validation_size:])
  return ImageClassificationData(
    train_images_NxHxW=train_images[train_idx],
    train_labels_N=train_labels[train_idx],
    validation_images_NxHxW=train_images[validation_idx],
    validation_labels_N=train_labels[validation_idx],
    test_images_NxHxW=test_images,
    test_labels_N=test_labels,
    num_classes=num_classes,
    source=source,
  )


def missing_data_message(name: str) -> str:
  """One line saying how to get the data for `name` onto an offline machine."""
  files = ", ".join(f"{base}.gz" for pair in IDX_FILES.values() for base in pair)
  url = IDX_DOWNLOAD_URLS.get(name, "the dataset's distribution site")
  return (
    f"no data for image dataset {name!r}: either download the IDX files {files} (gzipped or not) "
    f"from {url} into DIR and set --config.data.dir=DIR, or on a machine with internet and TensorFlow "
    f"run `tfds build {name} --data_dir DIR --file_format array_record`, copy DIR here and set "
    f"--config.data.tfds_data_dir=DIR"
  )


def _find_idx_file(data_dir: pathlib.Path, base: str) -> pathlib.Path:
  for candidate in (data_dir / base, data_dir / f"{base}.gz"):
    if candidate.is_file():
      return candidate
  if not data_dir.is_dir():
    raise DataError(f"data.dir {str(data_dir)!r} is not a directory")
  raise DataError(
    f"{data_dir}: missing {base} (or {base}.gz); the IDX distribution of MNIST is at "
    f"{IDX_DOWNLOAD_URLS['mnist']}"
  )


def _read_idx_split(data_dir: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
  images_base, labels_base = IDX_FILES[split]
  images_path = _find_idx_file(data_dir, images_base)
  labels_path = _find_idx_file(data_dir, labels_base)
  images_NxHxW = read_idx(images_path)
  labels_N = read_idx(labels_path)
  if images_NxHxW.ndim != 3:
    raise DataError(
      f"{images_path}: expected images N x H x W (magic {IMAGES_MAGIC}), got shape {list(images_NxHxW.shape)}"
    )
  if labels_N.ndim != 1:
    raise DataError(
      f"{labels_path}: expected labels N (magic {LABELS_MAGIC}), got shape {list(labels_N.shape)}"
    )
  if len(images_NxHxW) != len(labels_N):
    raise DataError(
      f"{images_path} has {len(images_NxHxW)} images but {labels_path} has {len(labels_N)} labels"
    )
  return images_NxHxW, labels_N.astype(np.int32)


def _read_tfds_split(name: str, tfds_data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  examples = read_tfds_records(
    name, split, tfds_data_dir, builder_modules=TFDS_BUILDER_MODULES, how_to_get=missing_data_message(name)
  )
  if not examples:
    raise DataError(f"tfds_data_dir {tfds_data_dir!r}: {name}/{split} has no examples")
  images = np.stack([np.asarray(example["image"], dtype=np.uint8) for example in examples])
  # TFDS stores grey images as [H, W, 1].
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  if images.ndim != 3:
    raise DataError(
      f"tfds:{name}/{split}: expected grey images, got shape {list(images.shape[1:])} per image"
    )
  labels = np.array([int(example["label"]) for example in examples], dtype=np.int32)
  if labels.min() < 0:
    raise DataError(f"tfds:{name}/{split}: unlabelled examples (label {int(labels.min())})")
  return images, labels
