"""`python -m train` as a user runs it: bad input gives one message and exit 2; SIGTERM saves and resumes."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = [
  "--config.model.d_model=32",
  "--config.model.num_heads=2",
  "--config.model.d_ff=32",
  "--config.model.num_layers=1",
  "--config.model.num_decoder_layers=1",
  "--config.model.moe_every=1",
  "--config.data.num_train=256",
  "--config.data.num_test=16",
  "--config.train.batch_size=8",
  "--config.train.log_every=1",
  "--config.train.eval_every=0",
  "--config.train.progress_bar=False",
  "--config.eval.batch_size=16",
]


def subprocess_env() -> dict[str, str]:
  """The environment with this session's persistent compile cache, so child processes reuse it."""
  return {
    **os.environ,
    "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  }


def run_train(*args, timeout=300):
  return subprocess.run(
    [sys.executable, "-m", "train", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    env=subprocess_env(),
  )


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config.model.num_expert=4"], 'Did you mean "num_experts"'),
    (["--config.model.d_model=1.5"], "--config.model.d_model=1.5"),
    (["--config.model.num_heads=3"], "model.num_heads: must divide d_model=128, got 3"),
    (["--config.model.top_k=5"], "model.top_k: must be in [1, num_experts=4], got 5"),
    (["--config.train.learning_rate=-0.1"], "train.learning_rate: must be > 0, got -0.1"),
    (["--config.model.dropout_rate=-0.5"], "model.dropout_rate: must be in [0, 1), got -0.5"),
    (["--config", "configs/no_such_config.py"], "no_such_config.py"),
  ],
)
def test_bad_config_stops_with_one_message_and_exit_code_2(tmp_path, args, message):
  result = run_train("--workdir", str(tmp_path / "run"), *args)
  assert result.returncode == 2, result.stderr
  assert message in result.stderr
  assert "Traceback" not in result.stderr


def test_a_workdir_that_is_a_file_exits_2(tmp_path):
  path = tmp_path / "file"
  path.write_text("")
  result = run_train("--workdir", str(path), *TINY)
  assert result.returncode == 2
  assert f"{path}: the workdir exists and is a file" in result.stderr
  assert "Traceback" not in result.stderr


def test_sigterm_saves_a_checkpoint_and_the_next_run_resumes_from_it(tmp_path):
  workdir = tmp_path / "run"
  process = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "train",
      "--workdir",
      str(workdir),
      *TINY,
      "--config.train.num_steps=100000",
      "--config.train.checkpoint_every=0",
    ],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=subprocess_env(),
  )
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    assert process.poll() is None, process.communicate()
    assert time.monotonic() < deadline, "training did not start"
    time.sleep(0.5)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr
  assert "stopped by SIGTERM at step" in stdout
  stopped_at = int(stdout.split("stopped by SIGTERM at step ")[1].split(";")[0])
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert saved == [stopped_at]

  result = run_train("--workdir", str(workdir), *TINY, f"--config.train.num_steps={stopped_at + 2}")
  assert result.returncode == 0, result.stderr
  assert f"resumed from {workdir.absolute() / 'checkpoints'}/{stopped_at}" in result.stdout
  assert f"steps: {stopped_at + 2}" in result.stdout
  assert (workdir / "results.txt").exists()
