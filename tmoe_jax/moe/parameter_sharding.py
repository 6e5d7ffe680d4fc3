"""How each parameter splits over the mesh: experts over 'expert', everything over 'fsdp'.

Shapes: E experts, D model width, F hidden width, X the 'expert' mesh axis size,
Z the 'fsdp' axis size.

Expert weights are found by one table, `EXPERT_PARAM_NAMES` (from
`experts.EXPERT_REGISTRY`): a leaf whose parameter name (the last dict key of its
pytree path, e.g. `w_in_ExDxF`) is in the table is a stacked expert weight with E
leading, split on 'expert' along that axis. Then every leaf, expert or not, is split
over 'fsdp' (ZeRO-3) along its largest remaining axis that Z divides; a leaf with no
such axis (a scalar, a small bias) stays replicated over 'fsdp'. jit gathers each
weight where a layer uses it and reduce-scatters its gradient, so a device holds only
1 / Z of the weights, gradients and Adam moments. The same rule applied to the
optimizer state shards Adam's moments exactly like the parameters they mirror,
since optax keeps them in the parameter tree's structure
(`mu/.../experts/w_in_ExDxF/value`).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tmoe_jax.errors import ConfigError
from tmoe_jax.moe.experts import EXPERT_PARAMS_BY_TYPE
from tmoe_jax.parallel.mesh import EXPERT_AXIS, FSDP_AXIS, expert_axis_size, fsdp_axis_size

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
  shape = tuple(getattr(leaf, "shape", ()))
  spec: list[str | None] = [None] * len(shape)
  if is_expert_leaf(path):
    size = expert_axis_size(mesh)
    if not shape or shape[0] % size:
      raise ConfigError(
        f"model.num_experts: expert weight {jax.tree_util.keystr(path)} of shape {shape} "
        f"cannot be split over mesh.expert={size}"
      )
    spec[0] = EXPERT_AXIS
  fsdp = fsdp_axis_size(mesh)
  if fsdp > 1:
    free = [axis for axis in range(len(shape)) if spec[axis] is None and shape[axis] % fsdp == 0]
    if free:
      spec[max(free, key=lambda axis: shape[axis])] = FSDP_AXIS
  while spec and spec[-1] is None:  # P("expert"), not P("expert", None, None): the same layout
    spec.pop()
  return NamedSharding(mesh, P(*spec))


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """A pytree like `tree` (nnx.State, optax state, ...) with a NamedSharding per leaf.

  Works on arrays and on `jax.ShapeDtypeStruct`s alike.
  """
  return jax.tree_util.tree_map_with_path(lambda path, leaf: _leaf_sharding(path, leaf, mesh), tree)
