"""The 2-D device mesh for data + expert parallelism, and the checks that go with it.

Axes: 'data' (pure data parallelism: replicas of every expert) and 'expert'
(expert parallelism: each device along it holds E / X of the experts, X the
'expert' axis size). Tokens are split over both axes, so every device routes
its own share of the batch. The sizes come from the config keys `mesh.data` and
`mesh.expert`; -1 means "the remaining devices". Every check raises
`ConfigError` naming the config field to change.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from tmoe_jax.errors import ConfigError

DATA_AXIS = "data"
EXPERT_AXIS = "expert"
MESH_AXES = (DATA_AXIS, EXPERT_AXIS)
# Batch arrays and MoE tokens are split over every device, data-major.
BATCH_AXES = (DATA_AXIS, EXPERT_AXIS)


def resolve_mesh_shape(data: int, expert: int, num_devices: int) -> tuple[int, int]:
  """(data, expert) with -1 replaced by the rest of the devices; ConfigError if they don't fit."""
  for field, size in (("mesh.data", data), ("mesh.expert", expert)):
    if isinstance(size, bool) or not isinstance(size, int):
      raise ConfigError(f"{field}: expected int, got {size!r} ({type(size).__name__})")
    if size != -1 and size < 1:
      raise ConfigError(f"{field}: must be >= 1, or -1 for the remaining devices; got {size}")
  if data == -1 and expert == -1:
    raise ConfigError("mesh.data: at most one of mesh.data and mesh.expert may be -1")
  for field, size in (("mesh.data", data), ("mesh.expert", expert)):
    if size != -1 and num_devices % size:
      raise ConfigError(f"{field}: must divide the number of devices ({num_devices}), got {size}")
  if data == -1:
    data = num_devices // expert
  if expert == -1:
    expert = num_devices // data
  if data * expert != num_devices:
    raise ConfigError(
      f"mesh.data: mesh.data * mesh.expert = {data} * {expert} = {data * expert} must equal the "
      f"number of devices ({num_devices}); set one of them to -1 to use the rest"
    )
  return data, expert


def _is_size(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def make_mesh(data: int = -1, expert: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'expert') mesh over `devices` (default: all); the default is pure data parallelism.

  Explicit sizes whose product is smaller than the number of devices use the first
  data * expert of them (single-process runs only), e.g. (1, 1) runs on one device.

  Axis types are Auto (the `jax.sharding.Mesh` default), so jit propagates
  shardings as usual; `jax.make_mesh` would make them Explicit.
  """
  devices = list(jax.devices() if devices is None else devices)
  if _is_size(data) and _is_size(expert) and data * expert < len(devices):
    # Explicit sizes that ask for fewer devices than there are: use the first data * expert.
    if jax.process_count() > 1:
      raise ConfigError(
        f"mesh.data: mesh.data * mesh.expert = {data * expert} devices, but a multi-process run must "
        f"use all {len(devices)}; set one of them to -1"
      )
    devices = devices[: data * expert]
  shape = resolve_mesh_shape(data, expert, len(devices))
  if jax.process_count() > 1:
    # Process-major order: each process's devices hold one contiguous block of batch rows,
    # the rows it loads (`distributed.global_batch`). create_device_mesh may interleave them.
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    device_grid = np.asarray(ordered, dtype=object).reshape(shape)
  else:
    # create_device_mesh orders devices by physical topology on TPU; on CPU/GPU it is a reshape.
    try:
      device_grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
      device_grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(device_grid, MESH_AXES)


def expert_axis_size(mesh: Mesh) -> int:
  return mesh.shape[EXPERT_AXIS]


def num_token_shards(mesh: Mesh) -> int:
  """Devices that tokens are split over: data * expert."""
  return mesh.shape[DATA_AXIS] * mesh.shape[EXPERT_AXIS]


def check_experts_divisible(num_experts: int, mesh: Mesh) -> None:
  """Every device on the expert axis must hold the same number of whole experts."""
  size = expert_axis_size(mesh)
  if num_experts % size:
    raise ConfigError(f"model.num_experts: must be divisible by mesh.expert={size}, got {num_experts}")


def check_batch_divisible(batch_size: int, mesh: Mesh, field: str = "train.batch_size") -> None:
  """Each device gets whole examples: the batch must split evenly over data * expert."""
  shards = num_token_shards(mesh)
  if batch_size % shards:
    raise ConfigError(
      f"{field}: must be divisible by mesh.data * mesh.expert = {shards} (every device takes "
      f"an equal share of the batch), got {batch_size}"
    )
