"""The device mesh for data, fully-sharded data and expert parallelism, and the checks that go with it.

Axes:
- 'data': pure data parallelism (replicas of every weight),
- 'fsdp': fully-sharded data parallelism (ZeRO-3): the batch is split over it like
  'data', and every weight and its Adam moments are split over it too, gathered
  where a layer uses them (`moe.parameter_sharding`),
- 'expert': expert parallelism: each device along it holds E / X of the experts,
  X the 'expert' axis size.
Tokens are split over all three, so every device routes its own share of the batch.
The sizes come from the config keys `mesh.data`, `mesh.fsdp` and `mesh.expert`; -1
means "the remaining devices". Every check raises `ConfigError` naming the config
field to change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from tmoe_jax.errors import ConfigError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
EXPERT_AXIS = "expert"
MESH_AXES = (DATA_AXIS, FSDP_AXIS, EXPERT_AXIS)
# Batch arrays and MoE tokens are split over every device, data-major.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS, EXPERT_AXIS)


def resolve_mesh_shape(data: int, expert: int, num_devices: int, *, fsdp: int = 1) -> tuple[int, int, int]:
  """(data, fsdp, expert) with a -1 replaced by the rest of the devices; ConfigError if they don't fit."""
  sizes = {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.expert": expert}
  for field, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int):
      raise ConfigError(f"{field}: expected int, got {size!r} ({type(size).__name__})")
    if size != -1 and size < 1:
      raise ConfigError(f"{field}: must be >= 1, or -1 for the remaining devices; got {size}")
  rest = [field for field, size in sizes.items() if size == -1]
  if len(rest) > 1:
    raise ConfigError(f"{rest[0]}: at most one of mesh.data, mesh.fsdp and mesh.expert may be -1")
  for field, size in sizes.items():
    if size != -1 and num_devices % size:
      raise ConfigError(f"{field}: must divide the number of devices ({num_devices}), got {size}")
  if rest:
    given = math.prod(size for size in sizes.values() if size != -1)
    sizes[rest[0]] = num_devices // given
  if math.prod(sizes.values()) != num_devices:
    product = " * ".join(str(size) for size in sizes.values())
    raise ConfigError(
      f"mesh.data: mesh.data * mesh.fsdp * mesh.expert = {product} = {math.prod(sizes.values())} must "
      f"equal the number of devices ({num_devices}); set one of them to -1 to use the rest"
    )
  return sizes["mesh.data"], sizes["mesh.fsdp"], sizes["mesh.expert"]


def _is_size(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def make_mesh(
  data: int = -1, expert: int = 1, devices: Sequence[jax.Device] | None = None, *, fsdp: int = 1
) -> Mesh:
  """A ('data', 'fsdp', 'expert') mesh over `devices` (default: all); the default is pure data parallelism.

  Explicit sizes whose product is smaller than the number of devices use the first
  data * fsdp * expert of them (single-process runs only), e.g. (1, 1) runs on one device.

  Axis types are Auto (the `jax.sharding.Mesh` default), so jit propagates
  shardings as usual; `jax.make_mesh` would make them Explicit.
  """
  devices = list(jax.devices() if devices is None else devices)
  wanted = data * fsdp * expert
  if _is_size(data) and _is_size(fsdp) and _is_size(expert) and wanted < len(devices):
    # Explicit sizes that ask for fewer devices than there are: use the first data * fsdp * expert.
    if jax.process_count() > 1:
      raise ConfigError(
        f"mesh.data: mesh.data * mesh.fsdp * mesh.expert = {wanted} devices, but a multi-process run "
        f"must use all {len(devices)}; set one of them to -1"
      )
    devices = devices[:wanted]
  shape = resolve_mesh_shape(data, expert, len(devices), fsdp=fsdp)
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


def mesh_from_config(mesh_config) -> Mesh:
  """`make_mesh` of a run's `mesh` section; runs saved before `mesh.fsdp` existed have fsdp 1."""
  return make_mesh(mesh_config.data, mesh_config.expert, fsdp=mesh_config.get("fsdp", 1))


def expert_axis_size(mesh: Mesh) -> int:
  return mesh.shape[EXPERT_AXIS]


def fsdp_axis_size(mesh: Mesh) -> int:
  return mesh.shape[FSDP_AXIS]


def num_token_shards(mesh: Mesh) -> int:
  """Devices that tokens are split over: data * fsdp * expert (all of them)."""
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def check_experts_divisible(num_experts: int, mesh: Mesh) -> None:
  """Every device on the expert axis must hold the same number of whole experts."""
  size = expert_axis_size(mesh)
  if num_experts % size:
    raise ConfigError(f"model.num_experts: must be divisible by mesh.expert={size}, got {num_experts}")


def check_batch_divisible(batch_size: int, mesh: Mesh, field: str = "train.batch_size") -> None:
  """Each device gets whole examples: the batch must split evenly over data * fsdp * expert."""
  shards = num_token_shards(mesh)
  if batch_size % shards:
    raise ConfigError(
      f"{field}: must be divisible by mesh.data * mesh.fsdp * mesh.expert = {shards} (every device takes "
      f"an equal share of the batch), got {batch_size}"
    )
