"""Crash safety: SIGKILL mid-run, damaged checkpoints, divergence, interrupted metrics writes."""

import json
import logging
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_cli import REPO, TINY, subprocess_env
from test_training import tiny_config

from tmoe_jax import loading
from tmoe_jax.errors import TmoeError, WorkdirError
from tmoe_jax.tasks import runner
from tmoe_jax.training import checkpointing, loop, reporting, steps
from tmoe_jax.training.state import create_train_state


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  directory = workdir / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def train_rows(workdir: pathlib.Path) -> list[dict]:
  """Train rows without their wall-clock throughput, which differs between runs."""
  rows = [r for r in reporting.read_metrics(workdir) if r["split"] == "train"]
  return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rows]


def final_state(workdir: pathlib.Path):
  config = loading.read_config(workdir)
  _, state = loading.restore_train_state(workdir, config, loading.load_task(workdir, config))
  return state


# --- SIGKILL ------------------------------------------------------------------------------

NUM_STEPS = 60
CHECKPOINT_EVERY = 10


def start_training(workdir: pathlib.Path) -> subprocess.Popen:
  command = [
    sys.executable,
    "-m",
    "train",
    "--workdir",
    str(workdir),
    *TINY,
    f"--config.train.num_steps={NUM_STEPS}",
    f"--config.train.checkpoint_every={CHECKPOINT_EVERY}",
  ]
  # Output to files, not pipes: nobody reads a pipe while the test polls, and a full pipe blocks.
  log = (workdir.parent / f"{workdir.name}.log").open("a")
  return subprocess.Popen(
    command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True, env=subprocess_env()
  )


def logged_steps(workdir: pathlib.Path) -> list[int]:
  path = workdir / "metrics.jsonl"
  steps = []
  for line in path.read_text().splitlines() if path.exists() else []:
    try:
      steps.append(json.loads(line)["step"])
    except json.JSONDecodeError:  # a line being written right now
      pass
  return steps


def results_without_timings(workdir: pathlib.Path) -> list[str]:
  lines = (workdir / "results.txt").read_text().splitlines()
  return [
    line for line in lines if "time" not in line.split(":")[0] and "per_second" not in line.split(":")[0]
  ]


def test_a_run_killed_mid_training_and_rerun_matches_an_uninterrupted_one(tmp_path):
  """SIGKILL (no chance to save) after a checkpoint, rerun the same command: same end state, bit for bit."""
  straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
  straight = start_training(straight_dir)  # runs alongside the killed one
  killed = start_training(killed_dir)
  deadline = time.monotonic() + 240
  while True:
    assert killed.poll() is None, (killed_dir.parent / "killed.log").read_text()
    assert time.monotonic() < deadline, "training did not reach a checkpoint"
    saved, logged = checkpoint_steps(killed_dir), logged_steps(killed_dir)
    if saved and logged and max(logged) > saved[-1]:
      break
    time.sleep(0.02)
  killed.send_signal(signal.SIGKILL)
  killed.wait(timeout=60)
  assert killed.returncode == -signal.SIGKILL
  killed_at = max(logged_steps(killed_dir))
  assert killed_at < NUM_STEPS, "the run finished before it was killed: raise NUM_STEPS"
  assert not (killed_dir / "results.txt").exists()

  rerun = start_training(killed_dir)
  assert rerun.wait(timeout=240) == 0, (tmp_path / "killed.log").read_text()
  assert straight.wait(timeout=240) == 0, (tmp_path / "straight.log").read_text()
  log = (tmp_path / "killed.log").read_text()
  resumed_from = int(log.split(f"resumed from {(killed_dir / 'checkpoints').absolute()}/")[1].split()[0])
  assert resumed_from % CHECKPOINT_EVERY == 0 and 0 < resumed_from <= killed_at

  assert results_without_timings(killed_dir) == results_without_timings(straight_dir)
  assert f"steps: {NUM_STEPS}" in results_without_timings(killed_dir)
  # One row per step, the same values: the rows the killed run wrote past its checkpoint were dropped.
  assert train_rows(killed_dir) == train_rows(straight_dir)
  assert [r["step"] for r in train_rows(killed_dir)] == list(range(1, NUM_STEPS + 1))
  chex.assert_trees_all_equal(final_state(killed_dir), final_state(straight_dir))


# --- damaged checkpoints ------------------------------------------------------------------


def two_checkpoint_config():
  # A constant schedule: it keeps the compiled step the same as test_training's resumed runs.
  return tiny_config(num_steps=4, checkpoint_every=2, schedule="constant")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  """A finished 4-step run with checkpoints at steps 2 and 4."""
  workdir = tmp_path_factory.mktemp("pristine") / "run"
  runner.train(two_checkpoint_config(), workdir)
  assert checkpoint_steps(workdir) == [2, 4]
  return workdir


def delete_the_largest_file(step_dir: pathlib.Path) -> None:
  largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  largest.unlink()


def overwrite_every_file_with_zeros(step_dir: pathlib.Path) -> None:
  for path in step_dir.rglob("*"):
    if path.is_file():
      path.write_bytes(bytes(path.stat().st_size))


@pytest.mark.parametrize("damage", [delete_the_largest_file, overwrite_every_file_with_zeros])
def test_a_damaged_newest_checkpoint_warns_and_training_resumes_from_the_previous_one(
  pristine, tmp_path, capsys, damage
):
  workdir = tmp_path / "run"
  shutil.copytree(pristine, workdir)
  checkpoints = (workdir / "checkpoints").absolute()
  damage(checkpoints / "4")

  runner.train(two_checkpoint_config(), workdir)

  captured = capsys.readouterr()
  assert f"warning: {checkpoints}/4: cannot read the checkpoint" in captured.err
  assert "falling back to step 2" in captured.err
  assert f"resumed from {checkpoints}/2" in captured.out
  # The damaged step was set aside and written again, identical to the undamaged run's.
  assert (checkpoints / "4.corrupt").is_dir()
  assert checkpoint_steps(workdir) == [2, 4]
  chex.assert_trees_all_equal(final_state(workdir), final_state(pristine))
  assert train_rows(workdir) == train_rows(pristine)


def test_when_no_checkpoint_can_be_read_training_stops_instead_of_starting_over(pristine, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(pristine, workdir)
  checkpoints = (workdir / "checkpoints").absolute()
  for step in (2, 4):
    delete_the_largest_file(checkpoints / str(step))
  with pytest.raises(WorkdirError, match=f"{checkpoints}: none of the checkpoints"):
    runner.train(two_checkpoint_config(), workdir)
  assert "falling back to step 2" in capsys.readouterr().err
  assert checkpoint_steps(workdir) == [2, 4]  # nothing new, nothing moved


def test_a_checkpoint_of_another_model_shape_is_a_config_error_not_damage(pristine, tmp_path, capsys):
  """Shapes that disagree with the config raise at once, naming them; no warning, no fallback."""
  workdir = tmp_path / "run"
  shutil.copytree(pristine, workdir)
  config = two_checkpoint_config()
  config.model.d_model = 16
  task = loading.load_task(workdir, config)
  _, abstract_state = loading.abstract_train_state(config, lambda: task.build_model(None))
  with (
    checkpointing.make_manager(workdir / "checkpoints", max_to_keep=3) as manager,
    pytest.raises(WorkdirError, match="does not match the current model config") as error,
  ):
    checkpointing.restore(manager, abstract_state, set_aside_unreadable=True)
  assert "/4: " in str(error.value) and "saved (32,) float32, now (16,) float32" in str(error.value)
  assert "params." in str(error.value).split(":")[2]  # parameters are listed before optimizer moments
  assert "warning" not in capsys.readouterr().err
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]


def test_the_leftover_reads_of_a_failed_restore_are_not_logged_but_other_asyncio_errors_are():
  """Both forms asyncio uses, depending on timing, are dropped; anything else gets through."""
  log_filter = checkpointing._AbandonedReadLogFilter()

  def record(message):
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, None)

  task = (
    "Task exception was never retrieved\nfuture: <Task finished coro=<f() at /x/orbax/checkpoint/a.py:1>>"
  )
  future = (
    "Future exception was never retrieved\nfuture: <Future finished exception=ValueError("
    "'DATA_LOSS: Error reading [tensorstore_spec=...]')>"
  )
  other = "Future exception was never retrieved\nfuture: <Future finished exception=ValueError('mine')>"
  assert not log_filter.filter(record(task))
  assert not log_filter.filter(record(future))
  assert log_filter.filter(record(other))
  assert log_filter.filter(record("Unclosed client session (orbax)"))


# --- divergence ---------------------------------------------------------------------------


def test_divergence_stops_naming_the_step_and_keeps_only_finite_checkpoints(tmp_path):
  """A real divergence (huge learning rate, no clipping) with rows logged more rarely than checkpoints."""
  config = tiny_config(
    num_steps=6,
    learning_rate=1e6,
    grad_clip_norm=0.0,
    schedule="constant",
    warmup_steps=0,
    log_every=100,
    checkpoint_every=1,
  )
  workdir = tmp_path / "run"
  with pytest.raises(loop.TrainingDivergedError, match="diverged at step 2: non-finite") as error:
    runner.train(config, workdir)
  assert isinstance(error.value, TmoeError)  # so the command line exits 2 with the message
  assert f"{(workdir / 'checkpoints').absolute()}/1, was written before it and is kept" in str(error.value)
  assert checkpoint_steps(workdir) == [1]
  state = final_state(workdir)
  assert all(
    np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state) if np.issubdtype(leaf.dtype, np.floating)
  )


class _ScaledLinear(nnx.Module):
  """A linear map with a non-parameter scale, as the expert bias is state outside the gradient."""

  def __init__(self):
    self.linear = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    self.scale = nnx.Variable(jnp.ones(()))


def _squared_error(model, batch, rngs, step):
  prediction = model.linear(batch["x"])[:, 0] * model.scale.value
  return jnp.mean((prediction - batch["y"]) ** 2), {}, ()


@pytest.mark.parametrize(
  "case, finite",
  [
    ("clean", True),
    ("nan_input", False),
    ("inf_target", False),
    ("nan_state", False),
    ("huge_gradient", False),
  ],
)
def test_step_flags_a_non_finite_loss_gradient_or_state(case, finite):
  """The step's is_finite flag: loss, aux loss, grad norm and the non-parameter state."""
  optimizer = optax.adam(1e-3)
  graphdef, state = create_train_state(_ScaledLinear(), optimizer, seed=0)
  x, y = np.ones((4, 3), np.float32), np.zeros(4, np.float32)
  if case == "nan_input":
    x[1, 2] = np.nan
  if case == "inf_target":
    y[0] = np.inf
  if case == "huge_gradient":  # a finite loss (1e36) and gradients (5e27) whose squares overflow
    x[:], y[:] = 1e10, -1e18
  if case == "nan_state":
    state = state.replace(model_state=jax.tree.map(lambda v: v * np.nan, state.model_state))
  step = steps.jit_train_step(graphdef, optimizer, lambda step: 1e-3, steps.LossWeights(), _squared_error)
  new_state, metrics = step(state, {"x": x, "y": y})
  assert bool(metrics["is_finite"]) is finite
  if finite:
    chex.assert_tree_all_finite(new_state)


# --- metrics written by a killed run ------------------------------------------------------


def test_metrics_writer_drops_a_line_cut_short_and_rows_past_the_resumed_step(tmp_path, capsys):
  path = tmp_path / "metrics.jsonl"
  path.write_text(
    "".join(json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) + "\n" for s in (1, 2, 3))
  )
  with path.open("a") as f:
    f.write('{"step": 4, "split": "tr')  # SIGKILL mid-write
  writer = reporting.MetricsWriter(tmp_path, resume_step=2)
  assert "skipping a line that is not JSON" in capsys.readouterr().err
  assert [r["step"] for r in reporting.read_metrics(tmp_path)] == [1, 2]
  writer.write({"step": 3, "split": "train", "loss": 0.5})
  writer.write({"step": 3, "split": "test", "loss": 0.7})
  writer.write({"step": 3, "split": "test", "loss": 0.6})  # the final evaluation of a rerun
  rows = reporting.read_metrics(tmp_path)
  assert [(r["step"], r["split"], r["loss"]) for r in rows[2:]] == [(3, "train", 0.5), (3, "test", 0.6)]
