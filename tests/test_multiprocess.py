"""`parallel.distributed`: settings resolution, per-process batch rows, and two real processes on localhost.

The two-process tests start `multiprocess_worker.py` twice with 2 CPU devices each
(4 global devices, gloo collectives) and a free port for the coordinator. A run
that deadlocks is killed at `_WORKER_TIMEOUT_S`, so the test fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import chex
import jax
import multiprocess_worker as worker
import numpy as np
import pytest

from tmoe_jax.errors import ConfigError, DataError
from tmoe_jax.parallel import distributed
from tmoe_jax.parallel.mesh import make_mesh
from tmoe_jax.parallel.sharding import batch_sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = pathlib.Path(worker.__file__).resolve()
_WORKER_TIMEOUT_S = 100
# A whole `python -m train` run (start-up, compiles, training, evaluation) on a loaded 2-core machine.
_RUN_TIMEOUT_S = 300
_NO_ENV: dict[str, str] = {}
_GROUP_VARIABLE_PREFIXES = (
  "SLURM_",
  "OMPI_",
  "JAX_COORDINATOR",
  "JAX_NUM_PROCESSES",
  "JAX_PROCESS_ID",
  "JAX_LOCAL_DEVICE_IDS",
)

# ---------------------------------------------------------------------------
# Settings: config section, JAX_* variables, detected clusters.


def _config(address="", num_processes=0, process_id=-1, **overrides):
  config = distributed.default_config()
  config.coordinator_address = address
  config.num_processes = num_processes
  config.process_id = process_id
  for key, value in overrides.items():
    config[key] = value
  return config


def test_nothing_set_is_a_single_process_run():
  assert distributed.resolve(_config(), _NO_ENV) is None
  assert distributed.resolve(None, _NO_ENV) is None


def test_config_gives_the_process_group():
  args = distributed.resolve(
    _config("10.0.0.1:1234", 4, 3, local_device_ids="0, 1", initialization_timeout=30), _NO_ENV
  )
  assert args == distributed.InitArgs("10.0.0.1:1234", 4, 3, (0, 1), 30)


def test_config_wins_over_the_environment():
  environ = {"JAX_COORDINATOR_ADDRESS": "other:1", "JAX_NUM_PROCESSES": "8", "JAX_PROCESS_ID": "5"}
  args = distributed.resolve(_config("host:2", 2, 1), environ)
  assert (args.coordinator_address, args.num_processes, args.process_id) == ("host:2", 2, 1)


def test_environment_variables_give_the_process_group():
  environ = {"JAX_COORDINATOR_ADDRESS": "host:9", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  args = distributed.resolve(_config(initialization_timeout=7), environ)
  assert args == distributed.InitArgs("host:9", 2, 1, None, 7)


@pytest.mark.parametrize(
  "environ, cluster",
  [
    (
      {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "n[1-2]",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "2",
      },
      "slurm",
    ),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:4", "OMPI_COMM_WORLD_SIZE": "4"}, "ompi"),
  ],
)
def test_a_detected_cluster_leaves_the_process_arguments_to_jax(environ, cluster):
  assert distributed.detected_cluster(environ) == cluster
  # JAX_COORDINATOR_ADDRESS alone is JAX's own override of the cluster's coordinator.
  for env in (environ, {**environ, "JAX_COORDINATOR_ADDRESS": "n1:5"}):
    assert distributed.resolve(None, env) == distributed.InitArgs()


def test_single_task_jobs_and_cloud_tpu_vms():
  one_task = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
  assert distributed.resolve(None, {**one_task, "SLURM_NTASKS": "1"}) is None
  assert distributed.resolve(None, {"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "1"}) is None
  assert distributed.resolve(None, _NO_ENV, on_cloud_tpu_vm=True) == distributed.InitArgs()


@pytest.mark.parametrize(
  "config, environ, field",
  [
    (_config(num_processes=2), _NO_ENV, "distributed.coordinator_address"),
    (_config("host:1", 2), _NO_ENV, "distributed.process_id"),
    (_config("host:1", process_id=0), _NO_ENV, "distributed.num_processes"),
    (_config("host:1", 2, 2), _NO_ENV, "distributed.process_id"),
    (_config("host", 2, 0), _NO_ENV, "distributed.coordinator_address"),
    (_config(num_processes=-2), _NO_ENV, "distributed.num_processes"),
    (dict(_config().to_dict(), num_processes=2.0), _NO_ENV, "distributed.num_processes"),
    (_config(initialization_timeout=0), _NO_ENV, "distributed.initialization_timeout"),
    (_config(local_device_ids="0,x"), _NO_ENV, "distributed.local_device_ids"),
    (_config(local_device_ids="1,1"), _NO_ENV, "distributed.local_device_ids"),
    (None, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS"),
    (None, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID"),
    (
      None,
      {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
      "JAX_NUM_PROCESSES",
    ),
    (
      None,
      {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5"},
      "JAX_PROCESS_ID",
    ),
    # The address alone outside a cluster: a launcher that set only part of the group.
    (None, {"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES"),
  ],
)
def test_bad_or_partial_settings_name_the_field(config, environ, field):
  with pytest.raises(ConfigError, match=f"^{field}: "):
    distributed.resolve(config, environ)


def test_a_config_without_a_field_names_it():
  config = distributed.default_config()
  del config["initialization_timeout"]
  with pytest.raises(ConfigError, match="^distributed.initialization_timeout: missing"):
    distributed.resolve(config, _NO_ENV)


def test_initialize_without_settings_leaves_jax_alone(monkeypatch):
  for name in list(os.environ):
    if name.startswith(_GROUP_VARIABLE_PREFIXES):
      monkeypatch.delenv(name)
  assert distributed.initialize(distributed.default_config()) is False
  assert not jax.distributed.is_initialized()
  assert distributed.is_main_process()


# ---------------------------------------------------------------------------
# Batch rows and the global batch.


def test_process_batch_rows_are_contiguous_blocks_in_process_order():
  assert [distributed.process_batch_rows(12, i, 3) for i in range(3)] == [
    slice(0, 4),
    slice(4, 8),
    slice(8, 12),
  ]
  assert distributed.process_batch_rows(6) == slice(0, 6)  # this single process loads everything
  with pytest.raises(ConfigError, match="^train.batch_size: .*number of processes \\(4\\)"):
    distributed.process_batch_rows(6, 0, 4)
  with pytest.raises(ValueError, match="process_index"):
    distributed.process_batch_rows(6, 2, 2)


def test_global_batch_on_one_process_is_device_put():
  mesh = make_mesh(2, 4)
  batch = worker.fixed_global_batch()
  placed = distributed.global_batch(batch, mesh, worker.GLOBAL_BATCH_SIZE)
  for key, value in batch.items():
    assert placed[key].sharding == batch_sharding(mesh)
    chex.assert_trees_all_equal(np.asarray(placed[key]), value)
  with pytest.raises(DataError, match="^batch\\['target'\\]: .*8 rows"):
    distributed.global_batch({"target": batch["target"][:4]}, mesh, worker.GLOBAL_BATCH_SIZE)
  with pytest.raises(ConfigError, match="^train.batch_size: "):
    distributed.global_batch({"target": batch["target"][:4]}, mesh, 4)


# ---------------------------------------------------------------------------
# Two processes on localhost.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _worker_environment() -> dict[str, str]:
  """This environment for a worker: 2 CPU devices, the repo importable, no cluster or proxy settings."""
  env = {
    name: value
    for name, value in os.environ.items()
    # A proxy can swallow the localhost gRPC connection; cluster settings must not leak in.
    if "_proxy" not in name.lower() and not name.startswith(_GROUP_VARIABLE_PREFIXES)
  }
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
  return env


def _run_workers(tmp_path: pathlib.Path, *, init: str, task: str, mesh: str, meanwhile=lambda: None):
  """Runs both workers to the end (or kills them); returns (what process 0 wrote, `meanwhile()`).

  `meanwhile` runs here while the workers run: they leave a core idle while one compiles.
  """
  address = f"localhost:{_free_port()}"
  outputs = [tmp_path / f"out-{i}.json" for i in range(2)]
  logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
  cache = jax.config.jax_compilation_cache_dir
  processes = []
  try:
    with contextlib.ExitStack() as files:
      for i in range(2):
        command = [sys.executable, str(WORKER), "--init", init, "--task", task, "--mesh", mesh]
        command += ["--out", str(outputs[i])] + (["--compilation-cache", cache] if cache else [])
        env = _worker_environment()
        if init == "config":
          command += ["--coordinator", address, "--num-processes", "2", "--process-id", str(i)]
        else:
          env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        log = files.enter_context(open(logs[i], "w"))
        processes.append(
          subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        )
      deadline = time.monotonic() + _WORKER_TIMEOUT_S
      side_result = meanwhile()
      # A worker that fails leaves the other waiting in a collective: stop at the first failure.
      while time.monotonic() < deadline:
        codes = [p.poll() for p in processes]  # every one: any() would stop polling at the first
        if all(code == 0 for code in codes) or any(code not in (None, 0) for code in codes):
          break
        time.sleep(0.1)
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()  # SIGKILL: JAX's preemption notifier catches SIGTERM
    for p in processes:
      p.wait()
  codes = [p.returncode for p in processes]
  if codes != [0, 0]:
    tails = "\n".join(f"--- worker {i} ---\n" + logs[i].read_text()[-3000:] for i in range(len(processes)))
    pytest.fail(
      f"workers exited with {codes} (negative: killed after {_WORKER_TIMEOUT_S} s or by a signal)\n{tails}"
    )
  assert not outputs[1].exists(), "only the main process writes results"
  return json.loads(outputs[0].read_text()), side_result


def _expected_row_sums() -> dict[str, list[int]]:
  batch = worker.fixed_global_batch()
  return {key: value.reshape(len(value), -1).sum(axis=1).tolist() for key, value in batch.items()}


def test_two_processes_train_like_one_device(tmp_path):
  """Config path, mesh data=1 x expert=4 over both processes: 3 steps equal the single-device steps."""
  result, reference = _run_workers(
    tmp_path, init="config", task="train", mesh="1,4", meanwhile=lambda: worker.train(None)
  )
  assert (result["process_count"], result["device_count"], result["local_device_count"]) == (2, 4, 2)
  assert result["mesh_process_indices"] == [[0, 0, 1, 1]]
  assert result["row_sums"] == _expected_row_sums()
  assert result["expert_shard_rows"] == [1]  # 4 experts over 4 devices, 2 of them in each process

  assert len(result["metrics"]) == worker.NUM_STEPS
  for step, (got, want) in enumerate(zip(result["metrics"], reference["metrics"])):
    assert got["max_dropped_fraction"] == 0.0
    for name in worker.SCALAR_METRICS:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=f"step {step}: {name}")
  np.testing.assert_allclose(result["param_norm"], reference["param_norm"], rtol=1e-5)


def test_environment_variables_form_the_process_group(tmp_path):
  """The JAX_* variables form the group; on a data=2 x expert=2 mesh the rows land in order."""
  result, _ = _run_workers(tmp_path, init="env", task="batch", mesh="2,2")
  assert (result["process_count"], result["device_count"]) == (2, 4)
  assert result["mesh_process_indices"] == [[0, 0], [1, 1]]
  assert result["row_sums"] == _expected_row_sums()
  assert result["initialize_again"] is True
  # Devices alternating between processes would scatter each process's rows: refused.
  assert "order the mesh's devices by process" in result["interleaved_mesh_error"]


_TINY_RUN = [
  "--config.model.d_model=32",
  "--config.model.num_heads=2",
  "--config.model.d_ff=32",
  "--config.model.num_layers=1",
  "--config.model.num_decoder_layers=1",
  "--config.model.moe_every=1",
  "--config.model.capacity_factor=2.0",  # = num_experts / top_k: nothing dropped, on any mesh
  "--config.data.num_train=256",
  "--config.data.num_test=16",
  "--config.train.batch_size=8",
  "--config.train.num_steps=4",
  "--config.train.log_every=1",
  "--config.train.eval_every=0",
  "--config.train.checkpoint_every=2",
  "--config.train.progress_bar=False",
  "--config.eval.batch_size=16",
  "--config.mesh.data=1",
  "--config.mesh.expert=4",
]


def test_the_training_command_runs_as_two_processes_like_one(tmp_path):
  """`python -m train` on two processes (2 devices each) with expert parallelism across them:
  the same losses and results as one process with 4 devices; only process 0 writes files."""
  env = _worker_environment()
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  single = subprocess.run(
    [sys.executable, "-m", "train", *_TINY_RUN, "--workdir", str(tmp_path / "one")],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=_RUN_TIMEOUT_S,
  )
  assert single.returncode == 0, single.stderr[-3000:]
  address = f"localhost:{_free_port()}"
  processes = []
  try:
    for i in range(2):
      env = _worker_environment()
      env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
      command = [sys.executable, "-m", "train", *_TINY_RUN, "--workdir", str(tmp_path / "two")]
      with open(tmp_path / f"process-{i}.log", "w") as log:
        processes.append(subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + _RUN_TIMEOUT_S
    # A process that fails leaves the other waiting in a collective: stop at the first failure.
    while time.monotonic() < deadline and any(p.poll() is None for p in processes):
      if any(p.poll() not in (None, 0) for p in processes):
        break
      time.sleep(0.2)
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()  # SIGKILL: JAX's preemption notifier catches SIGTERM
      p.wait()
  logs = "\n".join((tmp_path / f"process-{i}.log").read_text()[-2000:] for i in range(2))
  assert [p.returncode for p in processes] == [0, 0], logs

  def train_losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if row["split"] == "train"]

  np.testing.assert_allclose(train_losses(tmp_path / "two"), train_losses(tmp_path / "one"), rtol=1e-5)
  assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["2", "4"]
  results = {
    name: dict(line.split(": ", 1) for line in (tmp_path / name / "results.txt").read_text().splitlines())
    for name in ("one", "two")
  }
  np.testing.assert_allclose(
    float(results["two"]["test_loss"]), float(results["one"]["test_loss"]), rtol=1e-5
  )
  # Process 1 printed no results: only the main process reports.
  assert "results (" not in (tmp_path / "process-1.log").read_text()
