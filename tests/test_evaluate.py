"""Using a trained run: `tmoe_jax.load`, `python -m train.evaluate` (on a run of every task) and
`python -m train.translate`, and the `--config.*` override parser they share with `python -m train`."""

import dataclasses
import io
import json
import shutil
import subprocess
import sys

import chex
import numpy as np
import pytest
from flax import nnx
from test_cli import REPO, subprocess_env
from test_loading import lazy_runs
from test_training import tiny_config

import tmoe_jax
import train.evaluate
import train.translate
from tmoe_jax import loading
from tmoe_jax.data.seq2seq import decoder_inputs, load_seq2seq_data
from tmoe_jax.data.vocabulary import CharVocabulary
from tmoe_jax.errors import ConfigError, DataError
from tmoe_jax.tasks import runner
from tmoe_jax.tasks import seq2seq as steps
from tmoe_jax.tasks.loaded_runs import Seq2SeqRun
from train.overrides import split_config_overrides, typed_overrides


def trained_config():
  # The same compiled step as test_training's resumed runs and test_crash_safety's.
  return tiny_config(num_steps=4, checkpoint_every=2, schedule="constant")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 4-step run (checkpoints at 2 and 4) and its results."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  results = runner.train(trained_config(), workdir)
  return workdir, results


# --- tmoe_jax.load ------------------------------------------------------------------------


def test_load_restores_the_newest_checkpoint_into_a_callable_model(trained):
  workdir, _ = trained
  run = tmoe_jax.load(workdir)
  assert isinstance(run, Seq2SeqRun) and run.step == 4
  assert run.config.model.d_model == 32 and run.config.task == "seq2seq"
  assert run.vocabulary == CharVocabulary.from_json((workdir / "vocabulary.json").read_text())
  _, state = loading.restore_train_state(workdir, run.config, loading.load_task(workdir, run.config))
  chex.assert_trees_all_equal(nnx.state(run.model, nnx.Param), state.params)

  data = load_seq2seq_data(run.config.data)
  test = data.splits["test"]
  logits, _ = run.model(
    test.source_ids_NxS[:3], decoder_inputs(test.target_ids_NxL[:3], run.vocabulary.BOS_ID)
  )
  chex.assert_shape(logits, (3, data.max_target_length, run.vocabulary.size))
  assert np.all(np.isfinite(logits))
  with pytest.raises(dataclasses.FrozenInstanceError):
    run.step = 0
  assert tmoe_jax.load(workdir, step=2).step == 2


def test_translate_matches_decoding_the_padded_evaluation_batch(trained):
  """Batching by powers of two (rows repeated) decodes each text as the evaluation batch does."""
  workdir, _ = trained
  run = tmoe_jax.load(workdir)
  test = load_seq2seq_data(run.config.data).splits["test"]
  graphdef, params, model_state = nnx.split(run.model, nnx.Param, ...)
  decode = steps.jit_decode(
    graphdef,
    max_length=run.max_target_length,
    beam_size=1,
    bos_id=run.vocabulary.BOS_ID,
    eos_id=run.vocabulary.EOS_ID,
  )
  expected = [
    run.vocabulary.decode(row) for row in np.asarray(decode(params, model_state, test.source_ids_NxS))
  ]
  assert run.translate(test.sources[:5]) == expected[:5]
  assert run.translate(test.sources) == expected  # 24 texts: batches of 16 and 8
  assert run.translate([]) == []
  too_long = "x" * run.max_source_length
  with pytest.raises(DataError, match=r"texts\[1\] 'xxx.*: 31 tokens with EOS; this model reads at most 30"):
    run.translate(["3/3/98", too_long])


# --- python -m train.evaluate -------------------------------------------------------------


def test_evaluate_reproduces_the_final_results_and_writes_them(trained, capsys):
  workdir, results = trained
  train.evaluate.main(["--workdir", str(workdir)])
  out = capsys.readouterr().out
  assert "step 4, split test:" in out
  written = json.loads((workdir / "eval-4-test.json").read_text())
  assert f"wrote {workdir / 'eval-4-test.json'}" in out
  # The same checkpoint and evaluation as the end of training: the same decoded numbers,
  # exactly. The loss may differ in the last bits: under the tests' 8 CPU devices training
  # evaluated with data-parallel sharded arrays, `evaluate` on one device (summation order).
  assert written["exact_match"] == results["exact_match"]
  assert written["token_accuracy"] == results["token_accuracy"]
  assert written["loss"] == pytest.approx(results["test_loss"], rel=1e-6)
  assert (written["step"], written["split"], written["decode"], written["num_examples"]) == (
    4,
    "test",
    "greedy",
    24,
  )
  assert written["eval_config"]["beam_size"] == 1


def test_evaluate_an_older_step_on_another_split_with_beam_search(trained):
  workdir, _ = trained
  results, path = train.evaluate.evaluate(
    workdir, step=2, split="train", overrides=["--config.eval.beam_size=2", "--config.eval.batch_size", "128"]
  )
  assert path == workdir / "eval-2-train.json"
  assert (results["step"], results["decode"], results["num_examples"]) == (2, "beam2", 256)
  assert json.loads(path.read_text())["eval_config"]["batch_size"] == 128
  assert 0.0 <= results["token_accuracy"] <= 1.0 and np.isfinite(results["loss"])


def expect_usage_error(main, argv, capsys, message):
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert message in err, err
  return err


@pytest.mark.parametrize(
  "extra_args, message",
  [
    (["--split", "dev"], "--split: unknown split 'dev'; data 'dates' has ['test', 'train', 'validation']"),
    (["--step", "3"], "no checkpoint at step 3; available: [2, 4]"),
    (["--config.model.d_model=16"], "model.d_model: only eval.* fields can be changed"),
    (
      ["--config.eval.beam_size=two"],
      "bad --config override or config file: flag --config.eval.beam_size=two: invalid literal for int()",
    ),
    (["--config.eval.beam_size", "0"], "eval.beam_size: must be >= 1 (1 = greedy), got 0"),
    (["--config.eval.beam=2"], "eval.beam: no such field; eval has ['batch_size', 'beam_size', "),
    (["--config.evaluation.beam_size=2"], "evaluation.beam_size: no such field; the config has ['data', "),
    (["--splits", "test"], "unrecognized arguments: --splits test"),
  ],
)
def test_evaluate_bad_input_exits_2_with_one_message(trained, capsys, extra_args, message):
  workdir, _ = trained
  expect_usage_error(train.evaluate.main, ["--workdir", str(workdir), *extra_args], capsys, message)


def test_evaluate_a_workdir_without_checkpoints_or_missing_exits_2(trained, tmp_path, capsys):
  workdir = tmp_path / "no_checkpoints"
  workdir.mkdir()
  for name in ("config.json", "vocabulary.json"):
    (workdir / name).write_text((trained[0] / name).read_text())
  expect_usage_error(
    train.evaluate.main, ["--workdir", str(workdir)], capsys, "no checkpoints in this workdir"
  )
  expect_usage_error(
    train.evaluate.main,
    ["--workdir", str(tmp_path / "missing")],
    capsys,
    f"{tmp_path / 'missing'}: no such workdir",
  )
  expect_usage_error(
    train.evaluate.main, ["--workdir", str(tmp_path)], capsys, f"{tmp_path / 'config.json'}: missing"
  )


def run_evaluate_cli(workdir):
  """`python -m train.evaluate --workdir DIR` as a user runs it, output captured."""
  return subprocess.run(
    [sys.executable, "-m", "train.evaluate", "--workdir", str(workdir)],
    cwd=REPO,
    check=False,
    capture_output=True,
    text=True,
    timeout=240,
    env=subprocess_env(),
  )


def test_evaluate_cli_on_a_workdir_of_another_model_shape_exits_2_without_traceback(trained, tmp_path):
  """config.json edited to another d_model: the checkpoint's shapes disagree, named, exit 2."""
  workdir = tmp_path / "run"
  shutil.copytree(trained[0], workdir)
  config = json.loads((workdir / "config.json").read_text())
  config["model"]["d_model"] = 16
  (workdir / "config.json").write_text(json.dumps(config))
  result = run_evaluate_cli(workdir)
  assert result.returncode == 2, result.stderr
  assert "checkpoint does not match the current model config" in result.stderr
  assert "saved (32,) float32, now (16,) float32" in result.stderr
  assert "Traceback" not in result.stderr


def test_evaluate_cli_falls_back_past_a_damaged_newest_checkpoint_quietly(trained, tmp_path):
  """One warning line naming the damaged step, then step 2's evaluation: no Orbax tracebacks."""
  workdir = tmp_path / "run"
  shutil.copytree(trained[0], workdir)
  # Zero the array data but not the metadata, so that Orbax starts reading and fails midway.
  data_files = [p for p in (workdir / "checkpoints" / "4").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert data_files
  for path in data_files:
    path.write_bytes(bytes(path.stat().st_size))
  result = run_evaluate_cli(workdir)
  assert result.returncode == 0, result.stderr
  assert f"warning: {(workdir / 'checkpoints').absolute()}/4: cannot read the checkpoint" in result.stderr
  assert "falling back to step 2" in result.stderr
  assert "Traceback" not in result.stderr and "never retrieved" not in result.stderr, result.stderr
  assert "step 2, split test" in result.stdout
  assert (workdir / "checkpoints" / "4").is_dir()  # evaluation reads; it moves nothing aside


# --- python -m train.evaluate on a run of every task ---------------------------------------

# What the training loop adds to a task's headline results (results.txt).
LOOP_RESULTS = {
  "final_train_loss",
  "final_aux_loss",
  "steps",
  "parameters",
  "train_time_seconds",
  "steps_per_second_this_run",
}
IMAGE_KEYS = {
  "test_accuracy",
  "test_loss",
  "test_examples",
  "test_gate_entropy",
  "test_expert_usage",
  "test_expert_top1_fraction",
  "test_accuracy_by_top_expert",
  "gate_temperature",
  "validation_accuracy",
  "validation_loss",
}
# task -> (the split it reports on, the headline keys of its results.txt)
HEADLINES = {
  "seq2seq": (
    "test",
    {"exact_match", "token_accuracy", "test_loss", "test_teacher_forced_accuracy", "test_examples", "decode"},
  ),
  "regression": ("test", {"test_mse", "test_examples", "model"}),
  "language_model": (
    "validation",
    {
      "val_loss",
      "val_bits_per_char",
      "val_accuracy",
      "val_characters",
      "ffn",
      "ffn_hidden_width",
      "active_ffn_parameters_per_layer",
    },
  ),
  "sentence_pair": (
    "dev",
    {
      "dev_accuracy",
      "dev_f1",
      "dev_loss",
      "dev_examples",
      "majority_baseline_accuracy",
      "majority_baseline_f1",
      "selected_step",
      "selected_validation_accuracy",
    },
  ),
  "image_classification": ("test", IMAGE_KEYS),
  "guided_image_classification": (
    "test",
    IMAGE_KEYS | {"test_routing_agreement", "test_expert_accuracy", "validation_routing_agreement"},
  ),
}


@pytest.fixture(scope="module")
def task_run(tmp_path_factory):
  """task name -> (workdir, results) of a finished tiny run (test_loading's), trained on first use."""
  return lazy_runs(tmp_path_factory)


def assert_same_results(written, results, keys):
  """Equal, floats to relative 1e-5: training evaluated on 8 sharded CPU devices, `evaluate` on one."""
  for key in sorted(keys):
    expected, value = results[key], written[key]
    if isinstance(expected, float) or (isinstance(expected, list) and None not in expected):
      np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-7, err_msg=key)
    else:
      assert value == expected, key


@pytest.mark.parametrize("task_name", sorted(HEADLINES))
def test_evaluate_any_task_reproduces_its_headline_results(task_run, task_name, capsys):
  workdir, results = task_run(task_name)
  split, headline = HEADLINES[task_name]
  assert set(results) - LOOP_RESULTS == headline  # the keys its results.txt has
  train.evaluate.main(["--workdir", str(workdir)])
  path = workdir / f"eval-{results['steps']}-{split}.json"
  assert f"step {results['steps']}, split {split}:" in capsys.readouterr().out
  written = json.loads(path.read_text())
  assert (written["step"], written["split"]) == (results["steps"], split)
  assert headline <= set(written)
  assert_same_results(written, results, headline)


@pytest.mark.parametrize(
  "task_name, args, split, key",
  [
    ("regression", ["--config.eval.batch_size", "7"], "test", "test_mse"),
    ("language_model", ["--config.eval.batch_size=24"], "validation", "val_loss"),
    ("sentence_pair", ["--split=dev", "--config.eval.batch_size=3"], "dev", "dev_accuracy"),
  ],
)
def test_evaluate_with_another_batch_size_gives_the_same_results(task_run, task_name, args, split, key):
  workdir, results = task_run(task_name)
  train.evaluate.main(["--workdir", str(workdir), *args])
  written = json.loads((workdir / f"eval-{results['steps']}-{split}.json").read_text())
  assert written["eval_config"]["batch_size"] == int(args[-1].rpartition("=")[2])
  assert_same_results(written, results, [key])


def test_evaluate_another_split_of_a_sentence_pair_run(task_run):
  workdir, _ = task_run("sentence_pair")
  results, path = train.evaluate.evaluate(workdir, step=None, split="validation")
  assert path == workdir / "eval-4-validation.json"
  assert results["validation_examples"] == 8 and 0 <= results["validation_accuracy"] <= 1


@pytest.mark.parametrize(
  "task_name, args, message",
  [
    (
      "regression",
      ["--split", "train"],
      "split 'train': the regression task has only ('validation', 'test')",
    ),
    (
      "language_model",
      ["--split", "test"],
      "split 'test': the pydoc corpus has splits ('train', 'validation')",
    ),
    ("sentence_pair", ["--config.eval.batch_size=0"], "eval.batch_size: must be >= 1, got 0"),
    ("image_classification", ["--config.model.top_k=1"], "model.top_k: only eval.* fields can be changed"),
  ],
)
def test_evaluate_bad_input_for_other_tasks_exits_2(task_run, capsys, task_name, args, message):
  workdir, _ = task_run(task_name)
  expect_usage_error(train.evaluate.main, ["--workdir", str(workdir), *args], capsys, message)


# --- the --config.* override parser ---------------------------------------------------------


def test_split_config_overrides_keeps_values_with_their_flags():
  argv = [
    "--workdir",
    "W",
    "--config.eval.beam_size",
    "4",
    "text",
    "--config.eval.x=1",
    "--noconfig.eval.flag",
  ]
  argv += ["--config.eval.flag", "--step", "2", "--", "--config.eval.after"]
  overrides, rest = split_config_overrides(argv)
  assert overrides == [
    "--config.eval.beam_size",
    "4",
    "--config.eval.x=1",
    "--noconfig.eval.flag",
    "--config.eval.flag",
  ]
  assert rest == ["--workdir", "W", "text", "--step", "2", "--", "--config.eval.after"]


def test_typed_overrides_parse_as_python_m_train_parses_them():
  config = trained_config()
  config.eval.flag = False
  config.lock()
  overrides = [
    "--config.eval.beam_size",
    "4",
    "--config.eval.length_penalty=1",
    "--config.eval.flag",
    "--config.train.learning_rate=2e-3",
  ]
  assert typed_overrides(config, overrides) == {
    "eval.beam_size": 4,
    "eval.length_penalty": 1.0,
    "eval.flag": True,
    "train.learning_rate": 0.002,
  }
  assert typed_overrides(config, ["--noconfig.eval.flag"]) == {"eval.flag": False}
  assert config.eval.beam_size == 1 and not config.eval.flag  # parsed on a copy
  with pytest.raises(ConfigError, match="flag --config.eval.flag=maybe: "):
    typed_overrides(config, ["--config.eval.flag=maybe"])
  with pytest.raises(ConfigError, match=r"unexpected arguments after the --config overrides: \['False'\]"):
    typed_overrides(config, ["--config.eval.flag", "False"])


# --- python -m train.translate ------------------------------------------------------------


def test_translate_reads_stdin_and_prints_one_line_per_input(trained, capsys, monkeypatch):
  workdir, _ = trained
  lines = ["3/3/98", "tue 3 mar 1998", "", "March 3rd, '98"]
  monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
  train.translate.main(["--workdir", str(workdir)])
  out = capsys.readouterr().out
  assert out.splitlines() == tmoe_jax.load(workdir).translate(lines)


def test_translate_arguments_with_beam_search(trained, capsys):
  workdir, _ = trained
  train.translate.main(
    ["--workdir", str(workdir), "--step", "2", "--config.eval.beam_size=2", "3/3/98", "1.2.2003"]
  )
  out = capsys.readouterr().out
  expected = tmoe_jax.load(workdir, step=2, eval_overrides={"eval.beam_size": 2}).translate(
    ["3/3/98", "1.2.2003"]
  )
  assert out.splitlines() == expected


def test_translate_cli_names_a_line_that_is_too_long_and_exits_2(trained):
  workdir, _ = trained
  stdin = "3/3/98\n" + "Wednesday, 31st of December 1999 AD\n"
  result = subprocess.run(
    [sys.executable, "-m", "train.translate", "--workdir", str(workdir)],
    cwd=REPO,
    check=False,
    input=stdin,
    capture_output=True,
    text=True,
    timeout=240,
    env=subprocess_env(),
  )
  assert result.returncode == 2, result.stderr
  assert (
    "error: line 2 'Wednesday, 31st of December 1999 AD': 36 tokens with EOS, longer than the model's "
    "maximum source length of 30" in result.stderr
  )
  assert "Traceback" not in result.stderr
  assert result.stdout == ""


def test_translate_bad_override_exits_2(trained, capsys):
  expect_usage_error(
    train.translate.main,
    ["--workdir", str(trained[0]), "--config.train.seed=1", "3/3/98"],
    capsys,
    "train.seed: only eval.* fields can be changed",
  )
