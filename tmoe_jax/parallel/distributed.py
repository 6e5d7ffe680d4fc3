"""Multi-process (multi-host) runs on JAX's own runtime, `jax.distributed`.

One Python process per host (or per GPU) runs the same program; together they see
every device, and a mesh over `jax.devices()` spans all of them. What changes
against a single-process run:

1. `initialize` connects the processes before anything touches a device.
2. Each process loads only its rows of the global batch (`process_batch_rows`,
   a contiguous block per process, in process order) and `global_batch` joins
   them into one `jax.Array` split over the mesh like `sharding.batch_sharding`.
3. Only the main process (`is_main_process`) writes logs and results.

Where the settings come from, first match wins:
- the config section `distributed` (`default_config`): coordinator_address,
  num_processes and process_id, all three or none;
- the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID, all three (jax 0.10.2 itself reads only the first; the other
  two are this module's convention, passed on explicitly);
- a cluster JAX detects by itself: SLURM (`srun` with more than one task), Open
  MPI (`mpirun` with more than one rank), a Cloud TPU VM (GCE or GKE, where
  JAX reads the worker list from the metadata server or TPU_WORKER_HOSTNAMES).
  JAX_COORDINATOR_ADDRESS (or JAX_COORDINATOR_PORT) alone overrides the address
  such a cluster would give (outside one it is an error). `jax.distributed.initialize()`
  is then called without process arguments and fills them in from the cluster;
- nothing: a single-process run; `initialize` does nothing and returns False.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from tmoe_jax.errors import ConfigError, DataError
from tmoe_jax.parallel.mesh import check_batch_divisible
from tmoe_jax.parallel.sharding import batch_sharding

# The variables that describe a process group without a cluster manager. jax 0.10.2
# reads COORDINATOR_ADDRESS itself (jax/_src/distributed.py) but not the other two.
COORDINATOR_ADDRESS_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"

# Set by `jax/_src/clusters/slurm_cluster.py` / `ompi_cluster.py` when a job step runs
# under `srun` / `mpirun`; the variable holding the process count is last.
_SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")
_OMPI_VARIABLES = ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE")


def default_config() -> ml_collections.ConfigDict:
  """The `distributed` config section, every field unset: the environment decides (default: one process)."""
  config = ml_collections.ConfigDict()
  # "host:port" of process 0, where it starts the coordination service; "" = not set.
  config.coordinator_address = ""
  config.num_processes = 0  # 0 = not set
  config.process_id = -1  # -1 = not set
  # Comma-separated device ids this process uses, e.g. "0" for one GPU per process; "" = all local devices.
  config.local_device_ids = ""
  # Seconds a process waits for all the others to connect before failing.
  config.initialization_timeout = 300
  return config


@dataclasses.dataclass(frozen=True)
class InitArgs:
  """Keyword arguments of `jax.distributed.initialize`; None = JAX fills it in from the cluster."""

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  initialization_timeout: int = 300


def _field(config, name: str):
  if name not in config:
    raise ConfigError(f"distributed.{name}: missing from the config")
  return config[name]


def _require_int(value, field: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise ConfigError(f"{field}: expected int, got {value!r} ({type(value).__name__})")
  return value


def _parse_device_ids(text, field: str) -> tuple[int, ...] | None:
  if not isinstance(text, str):
    raise ConfigError(f"{field}: expected a comma-separated str of device ids, got {text!r}")
  if not text.strip():
    return None
  try:
    ids = tuple(int(part) for part in text.split(","))
  except ValueError:
    raise ConfigError(f"{field}: expected comma-separated device ids like '0,1', got {text!r}") from None
  if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
    raise ConfigError(f"{field}: device ids must be distinct and >= 0, got {text!r}")
  return ids


def _check_group(address: str, num_processes: int, process_id: int, fields: tuple[str, str, str]) -> None:
  """The three settings of an explicit process group: all set, and process_id < num_processes."""
  address_field, count_field, id_field = fields
  if not address or ":" not in address:
    raise ConfigError(f"{address_field}: expected 'host:port' of process 0, got {address!r}")
  if num_processes < 1:
    raise ConfigError(f"{count_field}: must be >= 1, got {num_processes}")
  if not 0 <= process_id < num_processes:
    raise ConfigError(f"{id_field}: must be in [0, {count_field}={num_processes}), got {process_id}")


def _missing_of(values: Mapping[str, bool]) -> str:
  """The first name whose value is False, given that another one is True."""
  given = [name for name, is_set in values.items() if is_set]
  missing = [name for name, is_set in values.items() if not is_set]
  return f"{missing[0]}: must be set together with {', '.join(given)} (all of {', '.join(values)}, or none)"


def _from_environment(environ: Mapping[str, str]) -> tuple[str, int, int] | None:
  """(address, num_processes, process_id) from the JAX_* variables; None when count and id are unset."""
  address = environ.get(COORDINATOR_ADDRESS_ENV, "")
  is_set = {
    COORDINATOR_ADDRESS_ENV: bool(address),
    NUM_PROCESSES_ENV: bool(environ.get(NUM_PROCESSES_ENV)),
    PROCESS_ID_ENV: bool(environ.get(PROCESS_ID_ENV)),
  }
  # The address alone is JAX's own override of a detected cluster's coordinator.
  if not (is_set[NUM_PROCESSES_ENV] or is_set[PROCESS_ID_ENV]):
    return None
  if not all(is_set.values()):
    raise ConfigError(_missing_of(is_set))
  numbers = []
  for name in (NUM_PROCESSES_ENV, PROCESS_ID_ENV):
    try:
      numbers.append(int(environ[name]))
    except ValueError:
      raise ConfigError(f"{name}: expected an integer, got {environ[name]!r}") from None
  num_processes, process_id = numbers
  _check_group(
    address, num_processes, process_id, (COORDINATOR_ADDRESS_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV)
  )
  return address, num_processes, process_id


def _count(environ: Mapping[str, str], variables: Sequence[str]) -> int:
  """The process count of a cluster whose variables are all set (else 0)."""
  if not all(name in environ for name in variables):
    return 0
  try:
    return int(environ[variables[-1]])
  except ValueError:
    return 0


def detected_cluster(environ: Mapping[str, str], on_cloud_tpu_vm: bool = False) -> str | None:
  """The multi-process cluster JAX can configure itself from: "slurm", "ompi", "cloud_tpu", or None.

  A SLURM or MPI job with one task is a single-process run: no coordinator is started.
  On a Cloud TPU VM JAX's own detection is used even for one host, which is harmless.
  """
  if _count(environ, _SLURM_VARIABLES) > 1:
    return "slurm"
  if _count(environ, _OMPI_VARIABLES) > 1:
    return "ompi"
  if on_cloud_tpu_vm:
    return "cloud_tpu"
  return None


def _running_on_cloud_tpu_vm() -> bool:
  # Set by `import jax` (jax/_src/cloud_tpu_init.py) from the PCI devices, without
  # starting a backend; private, hence the default if a later jax drops it.
  from jax._src import cloud_tpu_init

  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def resolve(distributed_config, environ: Mapping[str, str], on_cloud_tpu_vm: bool = False) -> InitArgs | None:
  """What `initialize` would pass to `jax.distributed.initialize`; None = single process.

  Pure: reads only its arguments, so every way of configuring a run can be tested
  in one process. `distributed_config` may be None (environment only).
  """
  timeout, device_ids = 300, None
  if distributed_config is not None:
    address = _field(distributed_config, "coordinator_address")
    num_processes = _require_int(_field(distributed_config, "num_processes"), "distributed.num_processes")
    process_id = _require_int(_field(distributed_config, "process_id"), "distributed.process_id")
    timeout = _require_int(
      _field(distributed_config, "initialization_timeout"), "distributed.initialization_timeout"
    )
    device_ids = _parse_device_ids(
      _field(distributed_config, "local_device_ids"), "distributed.local_device_ids"
    )
    if not isinstance(address, str):
      raise ConfigError(f"distributed.coordinator_address: expected str, got {address!r}")
    if timeout < 1:
      raise ConfigError(f"distributed.initialization_timeout: must be >= 1 second, got {timeout}")
    if num_processes < 0:
      raise ConfigError(f"distributed.num_processes: must be >= 1, or 0 for not set; got {num_processes}")
    if process_id < -1:
      raise ConfigError(f"distributed.process_id: must be >= 0, or -1 for not set; got {process_id}")
    is_set = {
      "distributed.coordinator_address": bool(address),
      "distributed.num_processes": num_processes != 0,
      "distributed.process_id": process_id != -1,
    }
    if any(is_set.values()):
      if not all(is_set.values()):
        raise ConfigError(_missing_of(is_set))
      _check_group(address, num_processes, process_id, tuple(is_set))
      return InitArgs(address, num_processes, process_id, device_ids, timeout)

  group = _from_environment(environ)
  if group is not None:
    return InitArgs(*group, local_device_ids=device_ids, initialization_timeout=timeout)
  if detected_cluster(environ, on_cloud_tpu_vm) is not None:
    return InitArgs(local_device_ids=device_ids, initialization_timeout=timeout)
  if environ.get(COORDINATOR_ADDRESS_ENV):
    # Most likely a launcher that set only part of the group: fail rather than run alone.
    raise ConfigError(
      f"{NUM_PROCESSES_ENV}: must be set together with {COORDINATOR_ADDRESS_ENV} and {PROCESS_ID_ENV} "
      "outside a cluster that JAX detects (SLURM, Open MPI, Cloud TPU)"
    )
  return None


def initialize(distributed_config=None) -> bool:
  """Joins this process to its process group; True if it did, False for a single-process run.

  Call it first thing, before anything asks JAX for devices (jax.devices(), a jit,
  a device_put): the backend is built once and only then learns of the other
  processes. Raises ConfigError naming the bad or missing setting; JAX raises
  RuntimeError if a backend already exists. Once joined, a process stays in its
  group: later calls return True and change nothing.
  """
  if jax.distributed.is_initialized():
    return True
  args = resolve(distributed_config, os.environ, _running_on_cloud_tpu_vm())
  if args is None:
    return False
  # Cross-process collectives of the CPU backend; gloo is jax 0.10.2's default, but
  # None (no collectives) would make every cross-process computation fail.
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=args.coordinator_address,
    num_processes=args.num_processes,
    process_id=args.process_id,
    local_device_ids=list(args.local_device_ids) if args.local_device_ids is not None else None,
    initialization_timeout=args.initialization_timeout,
  )
  return True


def is_main_process() -> bool:
  """Process 0: the one that writes logs, metrics and results."""
  return jax.process_index() == 0


def process_batch_rows(
  global_batch_size: int,
  process_index: int | None = None,
  process_count: int | None = None,
  *,
  field: str = "train.batch_size",
) -> slice:
  """The rows [start, stop) of the global batch this process loads: block `process_index` of `process_count`.

  Defaults to this process in the current run.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ConfigError(
      f"{field}: must be a positive multiple of the number of processes ({process_count}) so that "
      f"each loads the same number of rows, got {global_batch_size}"
    )
  rows = global_batch_size // process_count
  return slice(process_index * rows, (process_index + 1) * rows)


def _addressable_rows(mesh: Mesh, global_batch_size: int) -> list[int]:
  """The batch rows that this process's devices hold under `batch_sharding(mesh)`, sorted."""
  rows = set()
  for (index,) in batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,)).values():
    rows.update(range(*index.indices(global_batch_size)))
  return sorted(rows)


def global_batch(
  local_batch: Mapping[str, np.ndarray], mesh: Mesh, global_batch_size: int
) -> dict[str, jax.Array]:
  """One global [global_batch_size, ...] array per key, split over the mesh like `batch_sharding`.

  `local_batch` holds this process's rows `process_batch_rows(global_batch_size)`
  of every array, [global_batch_size / process_count, ...]. On one process this is
  `jax.device_put(local_batch, batch_sharding(mesh))`.
  """
  check_batch_divisible(global_batch_size, mesh)
  rows = process_batch_rows(global_batch_size)
  # make_array_from_process_local_data hands a process's local rows, in order, to the
  # rows its devices hold; those must be the same contiguous block, or examples from
  # different processes would be silently interleaved in a different global order.
  held = _addressable_rows(mesh, global_batch_size)
  if held != list(range(rows.start, rows.stop)):
    raise ValueError(
      f"the mesh puts batch rows {held[:4]}... on process {jax.process_index()}, not the contiguous "
      f"block [{rows.start}, {rows.stop}): order the mesh's devices by process (process-major)"
    )
  sharding = batch_sharding(mesh)
  arrays = {}
  for key, local in local_batch.items():
    local = np.asarray(local)
    if local.ndim == 0 or local.shape[0] != rows.stop - rows.start:
      raise DataError(
        f"batch[{key!r}]: expected this process's {rows.stop - rows.start} rows of the global batch of "
        f"{global_batch_size} as the leading axis, got shape {local.shape}"
      )
    arrays[key] = jax.make_array_from_process_local_data(
      sharding, local, (global_batch_size, *local.shape[1:])
    )
  return arrays
