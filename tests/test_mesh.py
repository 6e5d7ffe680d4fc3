"""Tests for the ('data', 'expert') mesh and its config checks (8 virtual CPU devices)."""

from __future__ import annotations

import jax
import pytest

from tmoe_jax.errors import ConfigError
from tmoe_jax.parallel.mesh import (
  check_batch_divisible,
  check_experts_divisible,
  make_mesh,
  resolve_mesh_shape,
)


def test_eight_virtual_devices_are_available():
  assert jax.device_count() == 8


def test_default_mesh_is_pure_data_parallel():
  mesh = make_mesh()
  assert mesh.axis_names == ("data", "fsdp", "expert")
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "expert": 1}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


@pytest.mark.parametrize(
  "data, expert, shape",
  [(-1, 4, (2, 4)), (2, -1, (2, 4)), (1, 8, (1, 8)), (8, 1, (8, 1)), (-1, 8, (1, 8)), (4, 2, (4, 2))],
)
def test_minus_one_takes_the_remaining_devices(data, expert, shape):
  mesh = make_mesh(data, expert)
  assert (mesh.shape["data"], mesh.shape["expert"]) == shape


def test_mesh_over_a_subset_of_devices():
  devices = jax.devices()[:4]
  mesh = make_mesh(2, -1, devices=devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 2}
  assert {d.id for d in mesh.devices.flat} == {d.id for d in devices}


@pytest.mark.parametrize("data, expert", [(1, 1), (2, 2), (1, 4)])
def test_explicit_sizes_below_the_device_count_use_the_first_devices(data, expert):
  mesh = make_mesh(data, expert)
  assert dict(mesh.shape) == {"data": data, "fsdp": 1, "expert": expert}
  assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()[: data * expert]]


@pytest.mark.parametrize(
  "data, expert, field, message",
  [
    (3, -1, "mesh.data", "must divide the number of devices (8), got 3"),
    (-1, 3, "mesh.expert", "must divide the number of devices (8), got 3"),
    (-1, 5, "mesh.expert", "must divide"),
    (4, 4, "mesh.data", "4 * 1 * 4 = 16 must equal the number of devices (8)"),
    (-1, -1, "mesh.data", "at most one"),
    (0, 8, "mesh.data", "must be >= 1"),
    (8, -2, "mesh.expert", "must be >= 1"),
    (True, 8, "mesh.data", "expected int"),
    (8, 1.0, "mesh.expert", "expected int"),
  ],
)
def test_bad_mesh_sizes_name_the_field(data, expert, field, message):
  with pytest.raises(ConfigError) as error:
    make_mesh(data, expert)
  assert str(error.value).startswith(field + ":")
  assert message in str(error.value)


def test_resolve_mesh_shape_is_pure_arithmetic():
  assert resolve_mesh_shape(-1, 16, 64) == (4, 1, 16)
  assert resolve_mesh_shape(2, 2, 16, fsdp=-1) == (2, 4, 2)
  with pytest.raises(ConfigError, match=r"^mesh\.expert:"):
    resolve_mesh_shape(1, 3, 64)


def test_experts_must_split_evenly_over_the_expert_axis():
  check_experts_divisible(8, make_mesh(2, 4))
  check_experts_divisible(3, make_mesh(8, 1))
  with pytest.raises(ConfigError, match=r"^model\.num_experts: must be divisible by mesh\.expert=4, got 6"):
    check_experts_divisible(6, make_mesh(2, 4))


def test_batch_must_split_evenly_over_all_devices():
  check_batch_divisible(16, make_mesh(2, 4))
  with pytest.raises(ConfigError, match=r"^train\.batch_size: must be divisible by .* = 8"):
    check_batch_divisible(12, make_mesh(2, 4))
  with pytest.raises(ConfigError, match=r"^eval\.batch_size:"):
    check_batch_divisible(4, make_mesh(), field="eval.batch_size")
