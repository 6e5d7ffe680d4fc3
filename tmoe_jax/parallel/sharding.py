"""NamedShardings for parameters, optimizer state and batches (a whole TrainState's: `training.state`).

Shapes: E experts, D model width, F hidden width, X the 'expert' mesh axis size.

The rule is one table, `EXPERT_PARAM_NAMES`: a leaf whose parameter name (the
last dict key of its pytree path, e.g. `w_in_ExDxF`) is in the table is a
stacked expert weight with E leading, and is split on 'expert' along that axis;
every other leaf is replicated. The same rule applied to the optimizer state
shards Adam's moments exactly like the parameters they mirror, since optax keeps
them in the parameter tree's structure (`mu/.../experts/w_in_ExDxF/value`).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tmoe_jax.errors import ConfigError
from tmoe_jax.moe.experts import EXPERT_PARAMS_BY_TYPE
from tmoe_jax.parallel.mesh import BATCH_AXES, EXPERT_AXIS, expert_axis_size

EXPERT_PARAM_NAMES: frozenset[str] = frozenset(
  name for names in EXPERT_PARAMS_BY_TYPE.values() for name in names
)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def expert_sharding(mesh: Mesh) -> NamedSharding:
  """Leading E axis split over 'expert' (replicated over 'data'); trailing axes whole."""
  return NamedSharding(mesh, P(EXPERT_AXIS))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch or token) axis split over every device, data-major."""
  return NamedSharding(mesh, P(BATCH_AXES))


def parameter_name(path: tuple) -> str | None:
  """The last dict key of a pytree path: the nnx attribute name of the leaf's Variable."""
  for entry in reversed(path):
    if isinstance(entry, jax.tree_util.DictKey):
      return str(entry.key)
  return None


def is_expert_leaf(path: tuple) -> bool:
  return parameter_name(path) in EXPERT_PARAM_NAMES


def _leaf_sharding(path: tuple, leaf: Any, mesh: Mesh) -> NamedSharding:
  if not is_expert_leaf(path):
    return replicated(mesh)
  size = expert_axis_size(mesh)
  shape = getattr(leaf, "shape", ())
  if not shape or shape[0] % size:
    raise ConfigError(
      f"model.num_experts: expert weight {jax.tree_util.keystr(path)} of shape {tuple(shape)} "
      f"cannot be split over mesh.expert={size}"
    )
  return expert_sharding(mesh)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """A pytree like `tree` (nnx.State, optax state, ...) with a NamedSharding per leaf.

  Works on arrays and on `jax.ShapeDtypeStruct`s alike.
  """
  return jax.tree_util.tree_map_with_path(lambda path, leaf: _leaf_sharding(path, leaf, mesh), tree)


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
  """Every array of `batch` split over ('data', 'expert') on its leading axis (scalars replicated)."""
  return jax.tree.map(lambda leaf: batch_sharding(mesh) if leaf.ndim else replicated(mesh), batch)
