"""Scaling out does not change the model: the default run logs the same losses on every mesh.

Shared by `test_mesh_equality_capacity.py` and `test_mesh_equality_dropless.py` (two files, so
that the two sets of four `python -m train` runs go to different pytest-xdist workers).

`python -m train` as a user runs it, 20 steps of the default experiment (capacity factor
1.25, tokens dropped) on meshes (1, 1), (2, 4), (8, 1) and (1, 8) of the 8 virtual CPU
devices, and again with dropless dispatch. Capacity and drop order are decided per
routing group (`model.sequences_per_group`), never per device, so every step's loss
agrees to float summation order. The default has 4 experts, which cannot split over an
8-way expert axis, so every run here has 8 (the one override of the model).
"""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
from test_cli import REPO, subprocess_env

MESHES = [(1, 1), (2, 4), (8, 1), (1, 8)]
STEPS = 20


def _train(workdir: pathlib.Path, data: int, expert: int, *overrides: str) -> dict[int, dict]:
  command = [
    sys.executable,
    "-m",
    "train",
    "--workdir",
    str(workdir),
    f"--config.train.num_steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.train.checkpoint_every=0",
    "--config.train.progress_bar=False",
    "--config.data.num_test=32",  # the final evaluation only; training is the default run's
    f"--config.mesh.data={data}",
    f"--config.mesh.expert={expert}",
    "--config.model.num_experts=8",
    *overrides,
  ]
  result = subprocess.run(
    command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {row["step"]: row for row in rows if row["split"] == "train"}


def check_the_same_loss_at_every_step_on_every_mesh(tmp_path, dispatch: str) -> None:
  assert jax.device_count() >= 8
  runs = {
    mesh: _train(tmp_path / f"{mesh[0]}x{mesh[1]}", *mesh, f"--config.model.dispatch={dispatch}")
    for mesh in MESHES
  }
  reference = runs[(1, 1)]
  assert sorted(reference) == list(range(1, STEPS + 1))
  dropped = [max(row["dropped_fraction"]) for row in reference.values()]
  if dispatch == "capacity":
    assert max(dropped) > 0.0, "the default run drops tokens; the test must cover drops"
  else:
    assert max(dropped) == 0.0
  for mesh, rows in runs.items():
    for step, row in reference.items():
      np.testing.assert_allclose(
        rows[step]["loss"], row["loss"], rtol=1e-5, err_msg=f"mesh {mesh} step {step}"
      )
      np.testing.assert_allclose(
        rows[step]["dropped_fraction"], row["dropped_fraction"], rtol=1e-5, atol=1e-7, err_msg=f"mesh {mesh}"
      )
