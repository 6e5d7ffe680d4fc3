"""The translation seq2seq task: parallel-text data, subword vocabulary, length buckets, BLEU."""

import gzip
import json
import pathlib

import numpy as np
import pytest

import configs.tmoe_multi30k
import configs.tmoe_multi30k_dense
from tmoe_jax import loading
from tmoe_jax.data import batching
from tmoe_jax.data.subword import SubwordVocabulary
from tmoe_jax.errors import ConfigError
from tmoe_jax.tasks import runner

SHARED_MULTI30K = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"

WORDS_DE = [
  "ein",
  "mann",
  "eine",
  "frau",
  "hund",
  "katze",
  "spielt",
  "läuft",
  "im",
  "park",
  "auf",
  "der",
  "straße",
  "mit",
  "einem",
  "ball",
]
WORDS_EN = [
  "a",
  "man",
  "a",
  "woman",
  "dog",
  "cat",
  "plays",
  "runs",
  "in",
  "the",
  "park",
  "on",
  "the",
  "street",
  "with",
  "a",
  "ball",
]


def write_corpus(directory: pathlib.Path, seed: int = 0) -> None:
  """A tiny word-for-word 'translation' corpus in the Multi30k file layout."""
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  for split, count in (("train", 300), ("val", 20), ("test_2016_flickr", 20)):
    words = [rng.integers(0, len(WORDS_DE), size=rng.integers(2, 9)) for _ in range(count)]
    for language, vocabulary in (("de", WORDS_DE), ("en", WORDS_EN)):
      text = "".join(" ".join(vocabulary[i] for i in line) + "\n" for line in words)
      with gzip.open(directory / f"{split}.{language}.gz", "wt", encoding="utf-8") as f:
        f.write(text)


def tiny_config(data_dir: pathlib.Path, num_steps: int = 4):
  config = configs.tmoe_multi30k.get_config()
  config.model.update(d_model=16, num_heads=2, num_layers=1, num_decoder_layers=1, d_ff=16)
  config.train.update(num_steps=num_steps, batch_size=16, warmup_steps=1, log_every=2, eval_every=0)
  config.train.update(checkpoint_every=0, progress_bar=False)
  config.eval.update(batch_size=8, num_examples_during_training=8)
  config.data.update(dir=str(data_dir), vocab_size=40)
  return config


def test_length_buckets_cover_each_example_once_per_epoch_and_group_lengths():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 50, size=1000)
  batch_size = 10
  epoch = np.concatenate([batching.length_bucketed_indices(lengths, batch_size, 3, s) for s in range(100)])
  assert len(set(epoch.tolist())) == 1000  # a permutation: every example exactly once
  spreads = [np.ptp(lengths[batching.length_bucketed_indices(lengths, batch_size, 3, s)]) for s in range(100)]
  random_spreads = [np.ptp(lengths[rng.choice(1000, batch_size, replace=False)]) for _ in range(100)]
  assert np.mean(spreads) < 0.25 * np.mean(random_spreads)
  # A pure function of (seed, step); another epoch and another seed give other batches.
  np.testing.assert_array_equal(
    batching.length_bucketed_indices(lengths, batch_size, 3, 7),
    batching.length_bucketed_indices(lengths, 10, 3, 7),
  )
  assert not np.array_equal(
    batching.length_bucketed_indices(lengths, batch_size, 3, 7),
    batching.length_bucketed_indices(lengths, batch_size, 3, 107),
  )
  with pytest.raises(ValueError, match="at least batch_size"):
    batching.length_bucketed_indices(lengths[:5], batch_size, 0, 0)


def test_translation_run_reports_bleu_and_reloads_with_its_subword_vocabulary(tmp_path):
  write_corpus(tmp_path / "data")
  config = tiny_config(tmp_path / "data")
  results = runner.train(config, tmp_path / "run")
  assert 0.0 <= results["bleu"] <= 100.0
  assert results["bleu_split"] == "test"
  assert "tok:13a" in results["bleu_signature"]
  text = (tmp_path / "run" / "results.txt").read_text()
  assert "bleu: " in text and "bleu_split: test" in text
  saved = json.loads((tmp_path / "run" / "vocabulary.json").read_text())
  assert saved["kind"] == "tmoe_jax.SubwordVocabulary"
  # Batches were cut to a multiple of 16 positions at most 48 long.
  task = runner.make_task(config)
  batch = task.train_batch(0, slice(None))
  assert batch["source"].shape[1] in (16, 32, 48) and batch["source"].shape == batch["target"].shape
  run = loading.load(tmp_path / "run")
  assert isinstance(run.vocabulary, SubwordVocabulary)
  (output,) = run.translate(["ein mann spielt"])
  assert isinstance(output, str)


def test_translation_config_checks_its_data_fields(tmp_path):
  config = tiny_config(tmp_path)
  config.data.vocabulary_type = "wordpiece"
  with pytest.raises(ConfigError, match="^data.vocabulary_type:"):
    runner.make_task(config)


def test_dense_baseline_has_the_moe_models_active_feed_forward_width():
  moe, dense = configs.tmoe_multi30k.get_config(), configs.tmoe_multi30k_dense.get_config()
  assert dense.model.moe_every == 0 and moe.model.moe_every == 1
  assert dense.model.d_ff == moe.model.top_k * moe.model.d_ff


@pytest.mark.skipif(
  not SHARED_MULTI30K.is_dir(), reason=f"real Multi30k files not found in {SHARED_MULTI30K}"
)
def test_real_multi30k_loads_with_its_three_splits():
  config = configs.tmoe_multi30k.get_config()
  config.data.update(dir=str(SHARED_MULTI30K), vocab_size=1000)
  task = runner.make_task(config)
  assert {name: len(split) for name, split in task.data.splits.items()} == {
    "train": 29000,
    "validation": 1014,
    "test": 1000,
  }
