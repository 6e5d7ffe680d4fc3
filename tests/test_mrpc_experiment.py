"""The mrpc_moe experiment end to end: the sentence-pair task through the training loop, selection, sweep.

Tiny models on a synthetic GLUE-format TSV (paraphrase = the first sentence with one
word changed), a few steps each; the real MRPC files in ../shared/data are used when
present (skipped otherwise).
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import mrpc_moe
from tmoe_jax.data.pair_features import NUM_OVERLAP_KINDS, NUM_PAIR_FEATURES
from tmoe_jax.data.sentence_pairs import GLUE_HEADER
from tmoe_jax.errors import ConfigError, DataError, WorkdirError
from tmoe_jax.models.pair_classifier import PairClassifier, PairClassifierConfig
from tmoe_jax.tasks import sentence_pair as sp
from tmoe_jax.training import loop
from tmoe_jax.training.optimizer import make_optimizer
from tmoe_jax.training.state import create_train_state
from train import sweep_mrpc

REAL_MRPC = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "glue_mrpc"
WORDS = [f"w{i}" for i in range(30)] + ["1998", "2.5", "the", "a", "."]
HEADLINE_KEYS = ("dev_accuracy", "dev_f1", "majority_baseline_accuracy", "majority_baseline_f1")


def write_tsv(path: pathlib.Path, num_pairs: int, seed: int) -> None:
  rng = np.random.default_rng(seed)
  lines = ["\t".join(GLUE_HEADER)]
  for i in range(num_pairs):
    first = list(rng.choice(WORDS, size=int(rng.integers(4, 9))))
    label = int(rng.random() < 0.6)
    if label:
      second = list(first)
      second[int(rng.integers(len(second)))] = str(rng.choice(WORDS))
    else:
      second = list(rng.choice(WORDS, size=int(rng.integers(4, 9))))
    lines.append(f"{label}\t{2 * i}\t{2 * i + 1}\t{' '.join(first)}\t{' '.join(second)}")
  path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
  directory = tmp_path_factory.mktemp("mrpc_tsv")
  write_tsv(directory / "train.tsv", 56, seed=0)
  write_tsv(directory / "dev.tsv", 16, seed=1)
  write_tsv(directory / "test.tsv", 16, seed=2)
  return directory


def tiny_config(data_dir, **model):
  config = mrpc_moe.get_config()
  config.model.update(
    {"embedding_size": 8, "num_experts": 2, "hidden_size": 8, "classifier_hidden_size": 8, **model}
  )
  config.train.update(
    {
      "num_steps": 4,
      "batch_size": 8,
      "warmup_steps": 1,
      "log_every": 1,
      "eval_every": 2,
      "checkpoint_every": 2,
      "select_every": 2,
      "progress_bar": False,
    }
  )
  config.eval.batch_size = 8
  config.data.update({"dir": str(data_dir), "validation_size": 8, "max_length": 24, "min_word_count": 1})
  return config


def test_default_config_fields():
  config = mrpc_moe.get_config()
  assert config.task == "sentence_pair" and config.data.name == "glue/mrpc"
  assert (config.model.num_experts, config.model.hidden_size) == (4, 256)
  assert config.model.expert_type in ("mlp", "rnn", "cnn")
  # Every model field valid.
  PairClassifierConfig.from_config(
    config.model, vocab_size=100, num_overlap_kinds=NUM_OVERLAP_KINDS, num_pair_features=NUM_PAIR_FEATURES
  )


def test_smoke_train_evaluate_with_labelled_test_split(data_dir, tmp_path):
  config = tiny_config(data_dir)
  task = sp.SentencePairTask(config)
  assert {name: len(split["label"]) for name, split in task.data.splits.items()} == {
    "train": 48,
    "validation": 8,
    "dev": 16,
    "test": 16,
  }
  results = loop.train_and_evaluate(config, tmp_path, task)
  lines = dict(line.split(": ", 1) for line in (tmp_path / "results.txt").read_text().splitlines())
  for key in (*HEADLINE_KEYS, "test_accuracy", "test_f1", "selected_step", "steps"):
    assert key in lines, key
  for key in HEADLINE_KEYS:
    assert 0.0 <= results[key] <= 1.0
  assert results["dev_examples"] == 16 and results["steps"] == 4
  # Selection ran at step 2 (steps 0 and 4 are never candidates) and was kept.
  assert results["selected_step"] == 2 and 0.0 <= results["selected_validation_accuracy"] <= 1.0
  vocabulary = json.loads((tmp_path / "vocabulary.json").read_text())
  assert vocabulary["kind"] == "tmoe_jax.WordVocabulary" and "w0" in vocabulary["words"]
  assert (tmp_path / "checkpoints" / "4").is_dir() and (tmp_path / "loss_curve.png").is_file()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  # During training only the carved validation split is evaluated; dev once, at the end. The
  # weights after 2 updates are scored inside the 3rd step, after the evaluation at step 2.
  assert [(r["step"], r["selected_step"]) for r in rows if r["split"] == "validation"] == [(2, -1)]
  assert [(r["step"], r["selected_step"]) for r in rows if r["split"] == "dev"] == [(4, 2)]

  # The saved vocabulary is checked against the data when the run is resumed or loaded.
  reloaded = sp.SentencePairTask(config)
  reloaded.read_files(tmp_path)
  (tmp_path / "vocabulary.json").write_text(sp.WordVocabulary(["other"]).to_json())
  with pytest.raises(WorkdirError, match="differs"):
    reloaded.read_files(tmp_path)


def test_evaluator_splits_and_selected_weights(data_dir):
  config = tiny_config(data_dir, expert_type="mlp")
  task = sp.SentencePairTask(config)
  graphdef, state = create_train_state(task.build_model(None), make_optimizer(config.train), 0)
  evaluator = task.make_evaluator(graphdef)
  for split in ("train", "validation", "dev", "test"):
    metrics = evaluator(state, split, 5)
    assert metrics["num_examples"] == 5 and metrics["split"] == split and metrics["selected_step"] == -1
  with pytest.raises(DataError, match="split 'nope'"):
    evaluator(state, "nope", None)
  headline = task.headline_results(evaluator(state, "test", None))
  assert {"test_accuracy", "test_f1", "majority_baseline_accuracy"} <= set(headline)


def _tiny_selected_classifier(seed: int) -> sp.SelectedClassifier:
  config = PairClassifierConfig(
    vocab_size=20,
    num_overlap_kinds=NUM_OVERLAP_KINDS,
    num_pair_features=NUM_PAIR_FEATURES,
    embedding_size=4,
    num_experts=2,
    hidden_size=4,
    expert_type="mlp",
    classifier_hidden_size=0,
  )
  return sp.SelectedClassifier(PairClassifier(config, rngs=nnx.Rngs(params=seed)))


def _chunks(num: int, chunk: int, seed: int) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  arrays = {
    "token_ids": rng.integers(3, 20, size=(num, 6)).astype(np.int32),
    "segment_ids": np.zeros((num, 6), np.int32),
    "overlap_ids": rng.integers(1, 5, size=(num, 6)).astype(np.int32),
    "features": rng.random((num, 10)).astype(np.float32),
    "label": rng.integers(0, 2, size=num).astype(np.int32),
  }
  return jax.tree.map(jnp.asarray, sp.validation_chunks(arrays, chunk))


def test_validation_chunks_pad_and_mask():
  arrays = {"label": np.arange(5, dtype=np.int32), "x": np.arange(10, dtype=np.float32).reshape(5, 2)}
  chunks = sp.validation_chunks(arrays, 2)
  assert chunks["label"].tolist() == [[0, 1], [2, 3], [4, 0]]
  assert chunks["valid"].tolist() == [[True, True], [True, True], [True, False]]
  assert chunks["x"].shape == (3, 2, 2)


def test_split_scores_match_one_unchunked_pass():
  model = _tiny_selected_classifier(0)
  chunks = _chunks(7, 3, seed=1)
  accuracy, loss = sp.split_scores(model.network, chunks)
  flat = {k: np.asarray(v).reshape(-1, *v.shape[2:]) for k, v in chunks.items()}
  real = flat.pop("valid")
  assert real.sum() == 7  # 3 chunks of 3: two padding rows
  examples = {k: jnp.asarray(v[real]) for k, v in flat.items()}
  logits_Nx2 = np.asarray(model.network.batch_logits(examples)[0], np.float64)
  log_probs_Nx2 = logits_Nx2 - np.log(np.sum(np.exp(logits_Nx2), axis=1, keepdims=True))
  labels_N = flat["label"][real]
  assert float(accuracy) == pytest.approx(np.mean(np.argmax(logits_Nx2, axis=1) == labels_N))
  assert float(loss) == pytest.approx(-np.mean(log_probs_Nx2[np.arange(7), labels_N]), rel=1e-5)


def _pure(state) -> dict:
  return jax.tree.map(np.asarray, nnx.to_pure_dict(state))


def _assert_trees_equal(a, b) -> None:
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_selection_keeps_the_best_weights():
  # One compilation for all the calls below (a module argument, its updates written back).
  select = nnx.jit(sp.select_by_validation, static_argnums=3)
  model = _tiny_selected_classifier(0)
  chunks = _chunks(6, 4, seed=2)
  first_chunk = {k: v[0] for k, v in chunks.items()}
  params_before = _pure(nnx.state(model.network, nnx.Param))

  select(model, jnp.array(0), chunks, 2)  # step 0 is never a candidate
  assert int(model.selected_step[...]) == -1
  select(model, jnp.array(3), chunks, 2)  # not a multiple of select_every
  assert int(model.selected_step[...]) == -1
  select(model, jnp.array(2), chunks, 2)
  accuracy, loss = sp.split_scores(model.network, chunks)
  assert int(model.selected_step[...]) == 2
  assert float(model.selected_accuracy[...]) == pytest.approx(float(accuracy))
  assert float(model.selected_loss[...]) == pytest.approx(float(loss))
  _assert_trees_equal(_pure(model.selected_params), params_before)
  selected_logits = np.asarray(model.selected_network().batch_logits(first_chunk)[0])

  # New weights that score no better (against an unbeatable best) are not taken,
  # and evaluation keeps using the snapshot.
  other = _tiny_selected_classifier(1)
  nnx.update(model.network, nnx.state(other.network, nnx.Param))
  model.selected_accuracy[...] = jnp.array(1.0)
  model.selected_loss[...] = jnp.array(0.0)
  select(model, jnp.array(4), chunks, 2)
  assert int(model.selected_step[...]) == 2
  _assert_trees_equal(_pure(model.selected_params), params_before)
  np.testing.assert_array_equal(
    np.asarray(model.selected_network().batch_logits(first_chunk)[0]), selected_logits
  )
  # Better ones are.
  model.selected_accuracy[...] = jnp.array(-1.0)
  select(model, jnp.array(6), chunks, 2)
  assert int(model.selected_step[...]) == 6
  _assert_trees_equal(_pure(model.selected_params), _pure(nnx.state(other.network, nnx.Param)))


def test_bad_config_names_the_field(data_dir):
  config = tiny_config(data_dir)
  config.data.validation_size = 56
  with pytest.raises(ConfigError, match="data.validation_size"):
    sp.SentencePairTask(config)
  config = tiny_config(data_dir, expert_type="transformer")
  with pytest.raises(ConfigError, match="model.expert_type"):
    sp.SentencePairTask(config)
  config = tiny_config(data_dir)
  config.train.select_every = -1
  with pytest.raises(ConfigError, match="train.select_every"):
    sp.SentencePairTask(config)
  config = tiny_config(data_dir)
  config.data.dir = str(data_dir / "missing")
  with pytest.raises(DataError, match="not a directory"):
    sp.SentencePairTask(config)


def test_sweep_smoke(data_dir, tmp_path):
  # tiny_cnn is the smoke test's model and run: its compiled steps come from the compilation cache.
  config = tiny_config(data_dir)
  settings = (
    sweep_mrpc.Setting("tiny_mlp", "MLP, no dropout", {"expert_type": "mlp", "dropout_rate": 0.0}),
    sweep_mrpc.Setting("tiny_cnn", "CNN, 2 experts", {"expert_type": "cnn", "num_experts": 2}),
  )
  rows = sweep_mrpc.run_sweep(config, tmp_path, settings[:1]) + sweep_mrpc.run_sweep(
    config, tmp_path, settings[1:], seeds=(0, 1)
  )
  assert [(row["setting"].name, row["seed"]) for row in rows] == [
    ("tiny_mlp", 0),
    ("tiny_cnn", 0),
    ("tiny_cnn", 1),
  ]
  assert rows[0]["config"].model.expert_type == "mlp" and config.model.expert_type == "cnn"  # base untouched
  table = sweep_mrpc.markdown_table(rows)
  accuracies = [100 * row["results"]["dev_accuracy"] for row in rows[1:]]
  mean, sd = np.mean(accuracies), np.std(accuracies, ddof=1)
  each = " / ".join(f"{value:.1f}" for value in accuracies)
  assert f"| tiny_cnn | cnn | 2 x 8 | 0.1 | 0, 1 | {mean:.1f} +- {sd:.1f} ({each}) |" in table
  assert f"| tiny_mlp | mlp | 2 x 8 | 0.0 | 0 | {100 * rows[0]['results']['dev_accuracy']:.1f} |" in table
  assert "majority class" in table and "| original PyTorch project, best | | | | | 66.6 |" in table
  assert f"--config.train.seed=1 --workdir {tmp_path / 'tiny_cnn' / 'seed1'}" in table
  assert (tmp_path / "tiny_cnn" / "seed1" / "results.txt").is_file()
  with pytest.raises(ConfigError, match="--seeds"):
    sweep_mrpc.parse_seeds("0,0")
  # The table's settings all exist in the config; --only rejects unknown names.
  for setting in sweep_mrpc.SETTINGS:
    sweep_mrpc.setting_config(mrpc_moe.get_config(), setting)
  assert [s.name for s in sweep_mrpc.selected_settings("mlp_4x256,cnn_4x256_dropout")] == [
    "mlp_4x256",
    "cnn_4x256_dropout",
  ]
  with pytest.raises(ConfigError, match="--only"):
    sweep_mrpc.selected_settings("nope")


@pytest.mark.skipif(
  not (REAL_MRPC / "train.tsv").is_file(), reason=f"GLUE MRPC TSVs not found in {REAL_MRPC}"
)
def test_real_mrpc_short_training(tmp_path):
  config = tiny_config(REAL_MRPC)
  config.data.update({"validation_size": 400, "max_length": 88, "min_word_count": 2})
  config.train.update({"num_steps": 2, "checkpoint_every": 0, "eval_every": 0, "select_every": 1})
  config.eval.batch_size = 136  # 408 = 3 x 136: dev in three batches
  task = sp.SentencePairTask(config)
  assert (
    len(task.data.splits["train"]["label"]) == 3268 and len(task.data.splits["validation"]["label"]) == 400
  )
  assert task.data.vocabulary.size > 5000
  results = loop.train_and_evaluate(config, tmp_path, task)
  assert results["dev_examples"] == 408
  assert results["majority_baseline_accuracy"] == pytest.approx(0.684, abs=5e-4)
  assert results["majority_baseline_f1"] == pytest.approx(0.812, abs=5e-4)
  assert 0.0 <= results["dev_accuracy"] <= 1.0 and results["selected_step"] == 1
