"""The causal_lm task end to end: train from scratch, resume, load and generate; import a Hugging Face
checkpoint as a workdir, fine-tune it, export it back; the command lines' errors."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer

import tmoe_jax
from configs import causal_lm as causal_lm_config
from configs import hf_finetune
from tmoe_jax.data import token_corpus
from tmoe_jax.errors import ConfigError
from tmoe_jax.hf import from_hf
from tmoe_jax.hf.checkpoint_directory import model_parameters
from tmoe_jax.tasks import runner
from tmoe_jax.tasks.causal_lm import CausalLMTask
from train import export_hf, generate, import_hf

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf_moe"
SUBJECTS = ("a dog", "two men", "a girl", "the woman", "a child", "three people", "an old man", "a boy")
ACTIONS = (
  "runs on the grass",
  "is riding a bike",
  "plays in the water",
  "sits on a bench",
  "walks down the street",
)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> pathlib.Path:
  """Caption-like lines: train.en (plain), val.en and test.en."""
  directory = tmp_path_factory.mktemp("text")
  lines = [f"{subject} {action} ." for subject in SUBJECTS for action in ACTIONS]
  (directory / "train.en").write_text("\n".join(lines * 3) + "\n")
  (directory / "val.en").write_text("\n".join(lines[::3]) + "\n")
  (directory / "test.en").write_text("\n".join(lines[1::4]) + "\n")
  return directory


def tiny(config, text_dir: pathlib.Path, **train):
  config.data.dir = str(text_dir)
  config.data.train_file, config.data.validation_file, config.data.test_file = "train.en", "val.en", "test.en"
  config.data.sequence_length = 16
  config.train.update(batch_size=8, log_every=1, eval_every=0, checkpoint_every=0, progress_bar=False)
  config.train.update(**train)
  config.eval.update(batch_size=8, num_examples_during_training=8)
  return config


# Room for every token at every expert: dropless dispatch's sums, and a faster compile on CPU
# (`test_hf_checkpoints.test_dropless_default_matches` covers dropless on these models).
NO_DROPS = {"dispatch": "capacity", "capacity_factor": 8.0, "eval_capacity_factor": 8.0}
NO_DROPS_FLAGS = [f"--config.model.{key}={value}" for key, value in NO_DROPS.items()]


def scratch_config(text_dir, **train):
  config = tiny(causal_lm_config.get_config(), text_dir, **{"num_steps": 3, **train})
  config.data.vocab_size = 300
  config.model.update(d_model=32, num_heads=4, num_kv_heads=2, d_ff=16, num_experts=4, **NO_DROPS)
  return config


def test_train_resume_load_and_generate_from_scratch(text_dir, tmp_path):
  workdir = tmp_path / "run"
  first = runner.train(scratch_config(text_dir, eval_every=2), workdir)
  assert first["steps"] == 3 and np.isfinite(first["test_perplexity"])
  assert not any(key.startswith("val_") for key in first)
  assert (workdir / "tokenizer.json").is_file()
  resumed = runner.train(scratch_config(text_dir, num_steps=5, eval_every=2), workdir)
  assert resumed["steps"] == 5
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows if row["split"] == "train"] == [1, 2, 3, 4, 5]
  # Validation during training; the test split once per run, by its final weights.
  evaluations = [(row["step"], row["split"]) for row in rows if row["split"] != "train"]
  assert evaluations == [(2, "validation"), (3, "test"), (4, "validation"), (5, "test")]
  assert resumed["test_loss"] == rows[-1]["loss"] and resumed["test_tokens"] == rows[-1]["num_tokens"]
  # The whole test stream, in consecutive windows of 16 predicted tokens.
  tokenizer = Tokenizer.from_file(str(workdir / "tokenizer.json"))
  end_of_text = tokenizer.token_to_id(token_corpus.END_OF_TEXT)
  stream = token_corpus.token_stream(tokenizer, token_corpus.read_lines(text_dir / "test.en"), end_of_text)
  assert resumed["test_tokens"] == (len(stream) - 1) // 16 * 16

  run = tmoe_jax.load(workdir)
  assert run.step == 5
  continuations = run.generate(["a dog", "two men are"], 6)
  assert len(continuations) == 2 and all(isinstance(text, str) for text in continuations)
  assert np.isfinite(run.perplexity(["a dog runs on the grass ."]))


def test_without_a_test_file_the_task_reports_validation(text_dir):
  config = scratch_config(text_dir)
  config.data.test_file = ""  # as the first recorded runs, which had no test split
  task = CausalLMTask(config)
  assert task.eval_split == "validation" and set(task.corpus.splits) == {"train", "validation"}
  evaluation = {"split": "validation", "loss": 2.0, "perplexity": 7.39, "accuracy": 0.5, "num_tokens": 32}
  assert {"val_loss", "val_perplexity", "val_accuracy", "val_tokens"} <= set(
    task.headline_results(evaluation)
  )
  config.data.test_file = "missing.en"
  with pytest.raises(ConfigError, match=r"data\.test_file: .*missing\.en is not a file"):
    CausalLMTask(config)


def test_import_fine_tune_and_export_round_trip(text_dir, tmp_path, capsys):
  checkpoint = FIXTURES / "qwen3_moe"
  workdir = tmp_path / "finetune"
  overrides = [
    f"--config.data.dir={text_dir}",
    "--config.data.train_file=train.en",
    "--config.data.sequence_length=16",
    "--config.data.validation_file=val.en",
    "--config.data.test_file=test.en",
  ]
  import_hf.main(
    [
      str(checkpoint),
      f"--workdir={workdir}",
      "--config.train.progress_bar=false",
      *overrides,
      *NO_DROPS_FLAGS,
    ]
  )
  imported = tmoe_jax.load(workdir)
  assert imported.step == 0
  reference = model_parameters(from_hf(checkpoint).model)
  for path, value in model_parameters(imported.model).items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(reference[path]), err_msg=str(path))

  # Fine-tune: the same config resumes from the imported step 0 with a fresh optimizer.
  config = tiny(hf_finetune.get_config(str(checkpoint)), text_dir, num_steps=2)
  config.mesh.update(data=1, expert=8)  # the imported workdir trains with its experts split over 8 devices
  with pytest.raises(Exception, match="incompatible config"):  # the model section must match the import
    runner.train(config, workdir)
  config.model.update(**NO_DROPS)
  results = runner.train(config, workdir)
  assert results["steps"] == 2 and results["started_from"] == str(checkpoint.resolve())
  tuned = tmoe_jax.load(workdir)
  changed = [
    path
    for path, value in model_parameters(tuned.model).items()
    if not np.array_equal(np.asarray(value), np.asarray(reference[path]))
  ]
  assert changed  # training moved the parameters

  export_hf.main(["--workdir", str(workdir), "--out", str(tmp_path / "exported")])
  assert "qwen3_moe" in capsys.readouterr().out
  exported = from_hf(tmp_path / "exported", **NO_DROPS)
  assert exported.family.model_type == "qwen3_moe"
  for path, value in model_parameters(tuned.model).items():
    np.testing.assert_array_equal(np.asarray(model_parameters(exported.model)[path]), np.asarray(value))

  generate.main(["--workdir", str(workdir), "--max_new_tokens", "4", "a dog"])
  assert capsys.readouterr().out == exported.generate(["a dog"], 4)[0] + "\n"


def test_import_refuses_a_bad_checkpoint_before_writing(tmp_path, text_dir, capsys):
  checkpoint = tmp_path / "broken"
  shutil.copytree(FIXTURES / "olmoe", checkpoint)
  config = json.loads((checkpoint / "config.json").read_text())
  config["clip_qkv"] = 8.0
  (checkpoint / "config.json").write_text(json.dumps(config))
  with pytest.raises(SystemExit) as exit_info:
    import_hf.main([str(checkpoint), f"--workdir={tmp_path / 'w'}", f"--config.data.dir={text_dir}"])
  assert exit_info.value.code == 2
  assert "clip_qkv=8.0" in capsys.readouterr().err
  assert not (tmp_path / "w").exists()


def test_export_refuses_a_family_the_model_does_not_fit(tmp_path, text_dir, capsys):
  workdir = tmp_path / "run"
  runner.train(scratch_config(text_dir, num_steps=1), workdir)
  with pytest.raises(SystemExit) as exit_info:
    export_hf.main(["--workdir", str(workdir), "--out", str(tmp_path / "out"), "--family", "olmoe"])
  assert exit_info.value.code == 2
  assert "model.qk_norm" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()
  export_hf.main(["--workdir", str(workdir), "--out", str(tmp_path / "out"), "--family", "mixtral"])
  assert from_hf(tmp_path / "out").family.model_type == "mixtral"
  nnx.graphdef(from_hf(tmp_path / "out").model)  # a complete, runnable model
