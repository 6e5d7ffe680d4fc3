"""The NamedShardings of the ('data', 'fsdp', 'expert') mesh: replicated, and split over the batch.

Which parameters take which is `moe.parameter_sharding`; a whole TrainState's,
`training.state.train_state_shardings`.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tmoe_jax.parallel.mesh import BATCH_AXES


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch or token) axis split over every device, data-major."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
  """Every array of `batch` split over every mesh axis on its leading axis (scalars replicated)."""
  return jax.tree.map(lambda leaf: batch_sharding(mesh) if leaf.ndim else replicated(mesh), batch)
