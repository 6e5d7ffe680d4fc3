"""`tmoe_jax.load` on a tiny trained run of every task: each task's natural call against an independent
computation (the restored model applied directly, a hand-written decoding loop, the task's evaluation),
and bad input. The seq2seq run's `translate` is tested in test_evaluate.py.

`trained_run(task)` trains each run once per module (a few steps of a tiny model, on synthetic MNIST and
MRPC files and the shipped pydoc corpus); test_evaluate.py uses it too.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_mnist_experiments import tiny as tiny_mnist
from test_mnist_experiments import write_synthetic_mnist
from test_mrpc_experiment import tiny_config as tiny_mrpc
from test_mrpc_experiment import write_tsv
from test_training import tiny_config as tiny_seq2seq

import tmoe_jax
from configs import mnist_guided, mnist_moe, smoe_lm
from configs import regression as regression_config
from tmoe_jax import loading
from tmoe_jax.data.pair_features import encode_pairs
from tmoe_jax.data.sentence_pairs import load_sentence_pairs
from tmoe_jax.data.vocabulary import NUM_SPECIAL
from tmoe_jax.data.word_vocabulary import split_words
from tmoe_jax.errors import ConfigError, DataError
from tmoe_jax.tasks import loaded_runs, runner
from tmoe_jax.tasks.regression import held_out_points
from tmoe_jax.tasks.table import LOADED_RUNS, TASKS

IMAGE_TASKS = ("image_classification", "guided_image_classification")
LM_LENGTH = 32  # the tiny language model's window


def tiny_regression():
  config = regression_config.get_config()
  config.train.update(num_steps=3, batch_size=16, log_every=1, eval_every=0, checkpoint_every=0)
  config.train.progress_bar = False
  config.eval.update(batch_size=16, num_examples_during_training=64)
  config.data.num_test = 100
  return config


def tiny_language_model():
  config = smoe_lm.get_config()
  config.model.update(d_model=16, num_heads=2, num_layers=1, d_ff=16, max_length=LM_LENGTH, num_experts=4)
  config.train.update(
    num_steps=3,
    batch_size=8,
    log_every=1,
    eval_every=0,
    checkpoint_every=0,
    warmup_steps=1,
    progress_bar=False,
  )
  config.eval.update(batch_size=64, num_examples_during_training=16)
  return config


def tiny_run_config(task: str, data_root):
  """A few steps of a tiny model of `task`; the synthetic data files are written under `data_root`."""
  if task == "seq2seq":
    return tiny_seq2seq(num_steps=2, checkpoint_every=0, schedule="constant")
  if task == "regression":
    return tiny_regression()
  if task == "language_model":
    return tiny_language_model()
  if task == "sentence_pair":
    directory = data_root / "mrpc"
    if not directory.exists():
      directory.mkdir()
      write_tsv(directory / "train.tsv", 56, seed=0)
      write_tsv(directory / "dev.tsv", 16, seed=1)
    return tiny_mrpc(directory)
  directory = data_root / "mnist"
  if not directory.exists():
    write_synthetic_mnist(directory)
  config_module = {"image_classification": mnist_moe, "guided_image_classification": mnist_guided}[task]
  return tiny_mnist(config_module.get_config(), directory)


def lazy_runs(tmp_path_factory):
  """task name -> (workdir, results) of a finished tiny run, trained on first use."""
  data_root = tmp_path_factory.mktemp("data")
  runs = {}

  def get(task: str):
    if task not in runs:
      workdir = tmp_path_factory.mktemp(task) / "run"
      runs[task] = workdir, runner.train(tiny_run_config(task, data_root), workdir)
    return runs[task]

  return get


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  return lazy_runs(tmp_path_factory)


def load_with_task(workdir):
  """The loaded run, and its task rebuilt and its state restored independently of `load`."""
  run = tmoe_jax.load(workdir)
  task = loading.load_task(workdir, run.config)
  graphdef, state = loading.restore_train_state(workdir, run.config, task)
  return run, task, graphdef, state


def test_every_task_names_a_loaded_run_class():
  assert set(LOADED_RUNS) == set(TASKS)
  for name, run_class in LOADED_RUNS.items():
    assert issubclass(run_class, loaded_runs.LoadedRun), name


def test_padded_batches_cover_every_row_once_in_powers_of_two():
  batches = list(loaded_runs.padded_batches(37, 16))
  assert [(len(indices), valid) for indices, valid in batches] == [(16, 16), (16, 16), (8, 5)]
  np.testing.assert_array_equal(np.concatenate([i[:v] for i, v in batches]), np.arange(37))
  np.testing.assert_array_equal(batches[-1][0][5:], [32, 32, 32])  # the batch's first row, repeated
  assert [len(i) for i, _ in loaded_runs.padded_batches(5, 6)] == [6]  # at most batch_size


# --- regression ---------------------------------------------------------------------------


def test_regression_predict_is_the_model_and_reproduces_test_mse(trained_run):
  workdir, results = trained_run("regression")
  run = tmoe_jax.load(workdir)
  assert isinstance(run, loaded_runs.RegressionRun)
  assert (run.step, run.input_dim) == (3, 10)
  points = held_out_points(run.config.data.seed, run.config.data.num_test, run.config.data.input_dim)
  # 100 points in batches of eval.batch_size 16: six of 16 rows and one of 4.
  predicted = run.predict(points["x"])
  assert predicted.shape == (100,) and predicted.dtype == np.float32
  np.testing.assert_allclose(
    predicted, np.asarray(run.model(jnp.asarray(points["x"]))[0]), rtol=1e-6, atol=1e-6
  )
  assert np.mean((predicted - points["y"]) ** 2) == pytest.approx(results["test_mse"], rel=1e-5)
  np.testing.assert_allclose(run.predict(points["x"][:3].astype(np.float64)), predicted[:3], rtol=1e-6)
  assert run.predict(np.zeros((0, 10))).shape == (0,)


@pytest.mark.parametrize(
  "x, message",
  [
    (np.zeros((4, 3)), r"x: expected shape \[N, 10\], got \[4, 3\]"),
    (np.zeros(10), r"x: expected shape \[N, 10\], got \[10\]"),
    (np.full((2, 10), "a"), "x: expected an array of numbers, got dtype <U1"),
    (np.full((2, 10), np.nan), r"x: has non-finite values \(nan or inf\)"),
    ([[1.0] * 10, [1.0] * 9], "x: cannot be read as an array"),
  ],
)
def test_regression_predict_rejects_bad_input(trained_run, x, message):
  run = tmoe_jax.load(trained_run("regression")[0])
  with pytest.raises(DataError, match=message):
    run.predict(x)


def test_a_task_without_a_loaded_run_class_cannot_be_loaded(trained_run, monkeypatch):
  monkeypatch.delitem(LOADED_RUNS, "regression")
  with pytest.raises(ConfigError, match="task: can load runs of .*, not 'regression'"):
    tmoe_jax.load(trained_run("regression")[0])


# --- image classification -----------------------------------------------------------------


@pytest.mark.parametrize("task_name", IMAGE_TASKS)
def test_classify_is_the_argmax_of_the_model_and_reproduces_test_accuracy(trained_run, task_name):
  workdir, results = trained_run(task_name)
  run, task, _, _ = load_with_task(workdir)
  assert isinstance(run, loaded_runs.ImageClassifierRun) and run.config.task == task_name
  images, labels = task.split_arrays("test")  # 40 uint8 8x8 images: batches of 8
  output = run.model(jnp.asarray(task.normalize(images)))
  predicted = run.classify(images)
  np.testing.assert_array_equal(predicted, np.argmax(np.asarray(output.log_probs_BxC), axis=1))
  assert np.mean(predicted == labels) == results["test_accuracy"]
  probabilities = run.probabilities(images[:5])
  np.testing.assert_allclose(probabilities, np.exp(output.log_probs_BxC[:5]), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(
    run.gate_probabilities(images[:5]), output.router_probs_BxE[:5], rtol=1e-5, atol=1e-7
  )
  # Floats on the same 0..255 scale classify alike; no images, no labels.
  np.testing.assert_array_equal(run.classify(images[:7].astype(np.float32)), predicted[:7])
  assert run.classify(np.zeros((0, 8, 8), np.uint8)).shape == (0,)


@pytest.mark.parametrize(
  "images, message",
  [
    (np.zeros((2, 28, 28), np.uint8), r"images: expected shape \[N, 8, 8\], got \[2, 28, 28\]"),
    (np.zeros((8, 8), np.uint8), r"images: expected shape \[N, 8, 8\], got \[8, 8\]"),
    (np.full((1, 8, 8), 300.0), r"images: pixel values must be in \[0, 255\]"),
    (np.full((1, 8, 8), -0.5), r"images: pixel values must be in \[0, 255\]"),
    (np.zeros((1, 8, 8), bool), "images: expected an array of numbers, got dtype bool"),
  ],
)
def test_classify_rejects_bad_images(trained_run, images, message):
  run = tmoe_jax.load(trained_run("image_classification")[0])
  with pytest.raises(DataError, match=message):
    run.classify(images)


# --- sentence pair ------------------------------------------------------------------------


def test_pair_classify_featurises_as_the_task_and_reproduces_dev_accuracy(trained_run):
  workdir, results = trained_run("sentence_pair")
  run, task, _, _ = load_with_task(workdir)
  assert isinstance(run, loaded_runs.PairClassifierRun)
  dev = load_sentence_pairs(name=run.config.data.name, data_dir=run.config.data.dir, tfds_data_dir="")["dev"]
  pairs = list(zip(dev.sentence1, dev.sentence2))
  # The task's own encoding of dev.tsv, through the selected weights, without the loaded run.
  expected = np.argmax(
    np.asarray(run.model.selected_network().batch_logits(task.data.splits["dev"])[0]), axis=1
  )
  predicted = run.classify(pairs)  # 16 pairs in batches of 8
  np.testing.assert_array_equal(predicted, expected)
  assert set(np.unique(predicted)) <= {0, 1}
  assert np.mean(predicted == dev.labels_N) == results["dev_accuracy"]
  np.testing.assert_allclose(run.probabilities(pairs).sum(axis=1), 1.0, rtol=1e-6)
  # Case follows data.lowercase: an upper-cased pair reads as the same words.
  assert run.config.data.lowercase
  upper = [(a.upper(), b.upper()) for a, b in pairs[:3]]
  np.testing.assert_array_equal(run.classify(upper), predicted[:3])
  assert run.classify([]).shape == (0,)


def test_pair_classify_encodes_with_the_run_vocabulary(trained_run):
  run = tmoe_jax.load(trained_run("sentence_pair")[0])
  pair = ("w1 w2 1998 never-seen", "w2 w1 2.5")
  expected = encode_pairs(
    [split_words(pair[0], lowercase=True)], [split_words(pair[1], lowercase=True)], run.vocabulary, 24
  )
  for name, values in run.encode([pair]).items():
    np.testing.assert_array_equal(values, expected[name], err_msg=name)


@pytest.mark.parametrize(
  "pairs, message",
  [
    ("w1 w2", "pairs: expected a list of .* not one str"),
    (("w1 w2", "w2 w1"), "pairs: expected a list of .* not one pair"),
    ([("w1", "w2"), ("w1",)], r"pairs\[1\]: expected a \(sentence1, sentence2\) pair, got \('w1',\)"),
    ([("w1", 3)], r"pairs\[0\]\[1\]: expected str, got int"),
    (["w1 w2"], r"pairs\[0\]: expected a \(sentence1, sentence2\) pair"),
  ],
)
def test_pair_classify_rejects_bad_pairs(trained_run, pairs, message):
  run = tmoe_jax.load(trained_run("sentence_pair")[0])
  with pytest.raises(DataError, match=message):
    run.classify(pairs)


# --- language model -----------------------------------------------------------------------


def greedy_by_hand(model, vocabulary, prompt: str, num_tokens: int) -> str:
  """Greedy decoding with the model applied eagerly to the unpadded last LM_LENGTH characters."""
  ids = vocabulary.encode(prompt, add_eos=False)
  for _ in range(num_tokens):
    logits_1xLxV, _ = model(jnp.asarray([ids[-LM_LENGTH:]]))
    logits = np.array(logits_1xLxV[0, -1])
    logits[:NUM_SPECIAL] = -np.inf
    ids.append(int(np.argmax(logits)))
  return vocabulary.decode(np.asarray(ids[len(prompt) :]))


def test_generate_greedy_is_the_argmax_loop_past_the_window(trained_run):
  run = tmoe_jax.load(trained_run("language_model")[0])
  assert isinstance(run, loaded_runs.LanguageModelRun) and run.max_length == LM_LENGTH
  prompt = "The for statement is used to it"  # 31 characters: the window slides after 1 step
  generated = run.generate(prompt, 6)
  assert len(generated) == 6
  assert generated == greedy_by_hand(run.model, run.vocabulary, prompt, 6)
  assert run.generate("x", 0) == ""


def test_generate_samples_reproducibly_by_seed(trained_run):
  run = tmoe_jax.load(trained_run("language_model")[0])
  first = run.generate("def ", 20, temperature=1.0, seed=3)
  assert first == run.generate("def ", 20, temperature=1.0, seed=3)
  assert len(first) == 20 and set(first) <= set(run.vocabulary.characters)
  samples = {run.generate("def ", 20, temperature=1.0, seed=seed) for seed in range(4)}
  assert len(samples) > 1


def test_score_is_the_task_evaluation_loss_per_character(trained_run):
  workdir, _ = trained_run("language_model")
  run, task, graphdef, state = load_with_task(workdir)
  evaluation = task.make_evaluator(graphdef)(state, "validation", 3)  # windows 0, 32, 64
  text = run.vocabulary.decode(task.corpus.splits["validation"][: 3 * LM_LENGTH + 1])
  nats = run.score([text])
  assert nats.shape == (1,)
  assert nats[0] == pytest.approx(evaluation["loss"], rel=1e-5)
  # Texts are scored independently of their batch; a shorter one, by hand.
  short = "if x:\n    pass"
  both = run.score([short, text])
  assert both[1] == pytest.approx(nats[0], rel=1e-6)
  ids = run.vocabulary.encode(short, add_eos=False)
  log_probs = np.asarray(jax.nn.log_softmax(run.model(jnp.asarray([ids[:-1]]))[0][0]))
  by_hand = -np.mean(log_probs[np.arange(len(ids) - 1), ids[1:]])
  assert both[0] == pytest.approx(by_hand, rel=1e-5)
  assert run.score([]).shape == (0,)
  assert math.isfinite(both[0] / math.log(2))


@pytest.mark.parametrize(
  "call, message",
  [
    (lambda run: run.generate("", 3), "prompt: must have at least one character"),
    (lambda run: run.generate(["def"], 3), "prompt: expected str, got list"),
    (
      lambda run: run.generate("def \u2603", 3),
      "prompt: characters '\u2603' are not in the model's vocabulary",
    ),
    (lambda run: run.generate("def", -1), "max_new_tokens: expected an int >= 0, got -1"),
    (lambda run: run.generate("def", 2.0), "max_new_tokens: expected an int >= 0, got 2.0"),
    (lambda run: run.generate("def", 2, temperature=-1.0), "temperature: expected a finite number >= 0"),
    (lambda run: run.score("some text"), "texts: expected a list of strings, not one str"),
    (lambda run: run.score(["ok text", "x"]), r"texts\[1\]: needs at least 2 characters"),
    (lambda run: run.score(["\u2603\u2603"]), r"texts\[0\]: characters '\u2603' are not in"),
  ],
)
def test_language_model_rejects_bad_input(trained_run, call, message):
  run = tmoe_jax.load(trained_run("language_model")[0])
  with pytest.raises(DataError, match=message):
    call(run)
