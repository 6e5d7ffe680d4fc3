"""Tests for the image-classification loaders: IDX files (synthetic and real MNIST) and TFDS under mock_data.

TFDS note: `tfds.testing.mock_data` does mock `tfds.data_source` in this TFDS version, but
only per named split (no metadata files ship with the package, so `split=None` yields {})
and only record by record (the mocked `__getitems__` is broken). The loader asks for each
split by name and reads records one at a time, so the real code path runs under the mock.
"""

from __future__ import annotations

import collections
import gzip
import pathlib
import struct
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tmoe_jax.data import images
from tmoe_jax.errors import ConfigError, DataError

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_DIR = SHARED_DATA / "mnist"

# From /work/shared/data/README.md (train) and the official MNIST distribution (t10k).
MNIST_TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def idx_bytes(array: np.ndarray) -> bytes:
  """An unsigned-byte IDX file, written independently of the reader."""
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.astype(np.uint8).tobytes()


def write_idx(path: pathlib.Path, array: np.ndarray, *, gz: bool) -> pathlib.Path:
  data = idx_bytes(array)
  if gz:
    path = path.with_name(path.name + ".gz")
    path.write_bytes(gzip.compress(data))
  else:
    path.write_bytes(data)
  return path


def synthetic_split(num: int, height: int, width: int, num_classes: int, seed: int):
  rng = np.random.default_rng(seed)
  images_NxHxW = rng.integers(0, 256, size=(num, height, width), dtype=np.uint8)
  # Pixel [0, 0] holds the example's index, so every image is unique and traceable.
  images_NxHxW[:, 0, 0] = np.arange(num)
  labels_N = np.arange(num, dtype=np.uint8) % num_classes
  return images_NxHxW, labels_N


def write_idx_dataset(
  directory: pathlib.Path, *, num_train=40, num_test=12, height=5, width=4, num_classes=3
):
  """A small dataset in the IDX layout: train files gzipped, test files plain (both must work)."""
  directory.mkdir(parents=True, exist_ok=True)
  train = synthetic_split(num_train, height, width, num_classes, seed=1)
  test = synthetic_split(num_test, height, width, num_classes, seed=2)
  write_idx(directory / "train-images-idx3-ubyte", train[0], gz=True)
  write_idx(directory / "train-labels-idx1-ubyte", train[1], gz=True)
  write_idx(directory / "t10k-images-idx3-ubyte", test[0], gz=False)
  write_idx(directory / "t10k-labels-idx1-ubyte", test[1], gz=False)
  return train, test


def load(data_dir="", tfds_data_dir="", name="mnist", validation_size=0, seed=0):
  return images.load_image_classification(
    name=name,
    data_dir=str(data_dir),
    tfds_data_dir=str(tfds_data_dir),
    validation_size=validation_size,
    seed=seed,
  )


# --------------------------------------------------------------------------
# read_idx


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 4)], ids=["labels", "images"])
def test_read_idx_round_trip(tmp_path, gz, shape):
  array = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
  path = write_idx(tmp_path / "data-idx", array, gz=gz)
  read = images.read_idx(path)
  assert read.dtype == np.uint8 and read.shape == shape
  np.testing.assert_array_equal(read, array)
  read[...] = 0  # writable, not a view of the file's bytes


def test_read_idx_magic_numbers_of_images_and_labels(tmp_path):
  assert images.IMAGES_MAGIC == 2051 and images.LABELS_MAGIC == 2049
  labels = idx_bytes(np.zeros(3, np.uint8))
  image_data = idx_bytes(np.zeros((3, 2, 2), np.uint8))
  assert struct.unpack(">I", labels[:4])[0] == 2049
  assert struct.unpack(">I", image_data[:4])[0] == 2051


GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))

BAD_FILES = {
  "truncated_data": GOOD[:-1],
  "trailing_bytes": GOOD + b"\x00",
  "truncated_header": GOOD[:9],
  "too_short": GOOD[:3],
  "empty": b"",
  "float_type": bytes([0, 0, 0x0D, 3]) + GOOD[4:],
  "nonzero_prefix": bytes([1, 0, 0x08, 3]) + GOOD[4:],
  "zero_dimensions": bytes([0, 0, 0x08, 0]),
  "truncated_gzip": gzip.compress(GOOD)[:-10],
  "garbage_gzip": b"\x1f\x8b" + b"not a gzip stream at all",
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_read_idx_rejects_bad_files_naming_them(tmp_path, case):
  path = tmp_path / f"{case}-idx3-ubyte"
  path.write_bytes(BAD_FILES[case])
  with pytest.raises(DataError, match=case):
    images.read_idx(path)


def test_read_idx_missing_file(tmp_path):
  with pytest.raises(DataError, match="nothing-here"):
    images.read_idx(tmp_path / "nothing-here")


# --------------------------------------------------------------------------
# load_image_classification from IDX files


def test_load_idx_dataset_of_any_size(tmp_path):
  (train_images, train_labels), (test_images, test_labels) = write_idx_dataset(tmp_path)
  data = load(tmp_path, validation_size=10, seed=3)
  assert data.source == f"idx:{tmp_path}"
  assert data.num_classes == 3
  assert data.train_images_NxHxW.shape == (30, 5, 4) and data.validation_images_NxHxW.shape == (10, 5, 4)
  for array in (data.train_images_NxHxW, data.validation_images_NxHxW, data.test_images_NxHxW):
    assert array.dtype == np.uint8
  for array in (data.train_labels_N, data.validation_labels_N, data.test_labels_N):
    assert array.dtype == np.int32
  np.testing.assert_array_equal(data.test_images_NxHxW, test_images)
  np.testing.assert_array_equal(data.test_labels_N, test_labels)

  # Train and validation partition the file's train split; each image keeps its own label.
  train_ids = data.train_images_NxHxW[:, 0, 0].astype(int)
  validation_ids = data.validation_images_NxHxW[:, 0, 0].astype(int)
  assert sorted(train_ids.tolist() + validation_ids.tolist()) == list(range(40))
  np.testing.assert_array_equal(data.train_images_NxHxW, train_images[train_ids])
  np.testing.assert_array_equal(data.train_labels_N, train_labels[train_ids])
  np.testing.assert_array_equal(data.validation_labels_N, train_labels[validation_ids])


def test_validation_split_is_keyed_by_seed(tmp_path):
  write_idx_dataset(tmp_path)

  def validation_ids(seed):
    return load(tmp_path, validation_size=10, seed=seed).validation_images_NxHxW[:, 0, 0].tolist()

  assert validation_ids(0) == validation_ids(0)
  assert validation_ids(0) != validation_ids(1)


def test_validation_size_zero_and_out_of_range(tmp_path):
  write_idx_dataset(tmp_path)
  data = load(tmp_path, validation_size=0)
  assert data.train_images_NxHxW.shape == (40, 5, 4)
  assert data.validation_images_NxHxW.shape == (0, 5, 4) and data.validation_labels_N.shape == (0,)
  with pytest.raises(ConfigError, match="validation_size"):
    load(tmp_path, validation_size=40)
  with pytest.raises(ConfigError, match="validation_size"):
    load(tmp_path, validation_size=-1)


def test_plain_file_is_used_when_both_plain_and_gz_exist(tmp_path):
  write_idx_dataset(tmp_path)
  # A plain train labels file beside the .gz one, with 4 classes instead of 3: num_classes says which was read.
  write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(40, dtype=np.uint8) % 4, gz=False)
  assert load(tmp_path).num_classes == 4


def test_image_and_label_counts_must_agree(tmp_path):
  write_idx_dataset(tmp_path)
  write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(11, np.uint8), gz=False)
  with pytest.raises(
    DataError, match=r"t10k-images-idx3-ubyte has 12 images but .*t10k-labels-idx1-ubyte has 11"
  ):
    load(tmp_path)


def test_labels_file_in_place_of_images_is_rejected(tmp_path):
  write_idx_dataset(tmp_path)
  write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros(12, np.uint8), gz=False)
  with pytest.raises(DataError, match="t10k-images-idx3-ubyte: expected images"):
    load(tmp_path)


def test_test_label_unseen_in_train_is_rejected(tmp_path):
  write_idx_dataset(tmp_path)
  write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(12, 7, np.uint8), gz=False)
  with pytest.raises(DataError, match="test label 7"):
    load(tmp_path)


def test_empty_train_split_is_rejected(tmp_path):
  write_idx_dataset(tmp_path)
  write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((0, 5, 4), np.uint8), gz=False)
  write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(0, np.uint8), gz=False)
  with pytest.raises(DataError, match="train split has no examples"):
    load(tmp_path)


def test_missing_idx_file_is_named(tmp_path):
  write_idx_dataset(tmp_path)
  (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(DataError, match=r"missing train-labels-idx1-ubyte \(or train-labels-idx1-ubyte.gz\)"):
    load(tmp_path)
  with pytest.raises(DataError, match="not a directory"):
    load(tmp_path / "no-such-dir")


def test_no_source_says_how_to_get_the_data():
  with pytest.raises(DataError) as raised:
    load(name="mnist")
  message = str(raised.value)
  assert "\n" not in message
  for needle in [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "--config.data.dir=DIR",
    "tfds build mnist --data_dir DIR --file_format array_record",
    "--config.data.tfds_data_dir=DIR",
  ]:
    assert needle in message
  with pytest.raises(DataError, match="tfds build fashion_mnist"):
    load(name="fashion_mnist")


# --------------------------------------------------------------------------
# load_image_classification from TFDS


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_tfds_source_under_mock_data(tmp_path, name):
  with tfds.testing.mock_data(num_examples=7):
    data = load(tfds_data_dir=tmp_path, name=name, validation_size=2, seed=0)
    records = {
      split: list(tfds.data_source(name, split=split, data_dir=str(tmp_path), download=False))
      for split in ("train", "test")
    }
  assert data.source == f"tfds:{name}"
  assert data.train_images_NxHxW.shape == (5, 28, 28) and data.train_images_NxHxW.dtype == np.uint8
  assert data.validation_images_NxHxW.shape == (2, 28, 28)
  assert data.test_images_NxHxW.shape == (7, 28, 28)
  assert data.train_labels_N.dtype == np.int32 and data.test_labels_N.dtype == np.int32

  expected_test = np.stack([r["image"][:, :, 0] for r in records["test"]])
  np.testing.assert_array_equal(data.test_images_NxHxW, expected_test)
  np.testing.assert_array_equal(data.test_labels_N, [int(r["label"]) for r in records["test"]])
  # Train plus validation hold exactly the train records, each with its label.
  loaded = sorted(
    (image.tobytes(), int(label))
    for image, label in zip(
      np.concatenate([data.train_images_NxHxW, data.validation_images_NxHxW]),
      np.concatenate([data.train_labels_N, data.validation_labels_N]),
    )
  )
  expected = sorted((r["image"][:, :, 0].tobytes(), int(r["label"])) for r in records["train"])
  assert loaded == expected
  assert data.num_classes == max(label for _, label in expected) + 1


def test_tfds_dir_without_array_record_data_says_how_to_build_it(tmp_path):
  with pytest.raises(
    DataError, match=r"holds no readable array_record build of mnist/train.*--file_format array_record"
  ):
    load(tfds_data_dir=tmp_path, name="mnist")


# --------------------------------------------------------------------------
# Real MNIST


@pytest.fixture(scope="module")
def mnist_dir():
  if not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
    pytest.skip(f"real MNIST not found at {MNIST_DIR} (only on the development machine)")
  return MNIST_DIR


def test_real_mnist(mnist_dir):
  start = time.perf_counter()
  data = load(mnist_dir, validation_size=0)
  seconds = time.perf_counter() - start
  # Vectorised reading takes well under a second; a per-pixel Python loop would take minutes.
  assert seconds < 10, f"loading MNIST took {seconds:.1f} s"
  assert data.train_images_NxHxW.shape == (60_000, 28, 28) and data.test_images_NxHxW.shape == (
    10_000,
    28,
    28,
  )
  assert data.num_classes == 10
  assert np.bincount(data.train_labels_N).tolist() == MNIST_TRAIN_LABEL_COUNTS
  assert np.bincount(data.test_labels_N).tolist() == MNIST_TEST_LABEL_COUNTS
  # The first training digit is a 5 and the first test digit a 7; both have ink on a black background.
  assert data.train_labels_N[0] == 5 and data.test_labels_N[0] == 7
  assert data.train_images_NxHxW[:, 0, 0].max() == 0 and data.train_images_NxHxW.max() == 255


def test_real_mnist_validation_carve_out(mnist_dir):
  data = load(mnist_dir, validation_size=5_000, seed=0)
  assert len(data.train_labels_N) == 55_000 and len(data.validation_labels_N) == 5_000
  counts = collections.Counter(data.train_labels_N.tolist()) + collections.Counter(
    data.validation_labels_N.tolist()
  )
  assert [counts[c] for c in range(10)] == MNIST_TRAIN_LABEL_COUNTS
