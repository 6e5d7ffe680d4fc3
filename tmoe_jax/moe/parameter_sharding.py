"""Which parameters split over the 'expert' mesh axis: the stacked expert weights, by name.

Shapes: E experts, D model width, F hidden width, X the 'expert' mesh axis size.

The rule is one table, `EXPERT_PARAM_NAMES` (from `experts.EXPERT_REGISTRY`): a
leaf whose parameter name (the last dict key of its pytree path, e.g.
`w_in_ExDxF`) is in the table is a stacked expert weight with E leading, and is
split on 'expert' along that axis; every other leaf is replicated. The same rule
applied to the optimizer state shards Adam's moments exactly like the
parameters they mirror, since optax keeps them in the parameter tree's structure
(`mu/.../experts/w_in_ExDxF/value`).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding

from tmoe_jax.errors import ConfigError
from tmoe_jax.moe.experts import EXPERT_PARAMS_BY_TYPE
from tmoe_jax.parallel.mesh import expert_axis_size
from tmoe_jax.parallel.sharding import expert_sharding, replicated

EXPERT_PARAM_NAMES: frozenset[str] = frozenset(
  name for names in EXPERT_PARAMS_BY_TYPE.values() for name in names
)


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
