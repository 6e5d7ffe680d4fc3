"""What an MoE layer reports besides its output: the routing statistics of one forward pass."""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class MoEAux:
  """What one MoE layer reports besides its output.

  load_balancing_loss, router_z_loss: scalars to add (weighted) to the task loss.
  expert_fraction_E: share of routing assignments per expert (before dropping).
  dropped_fraction: share of assignments that found their expert full.
  router_entropy: mean entropy of the router softmax, in nats.
  """

  load_balancing_loss: jax.Array
  router_z_loss: jax.Array
  expert_fraction_E: jax.Array
  dropped_fraction: jax.Array
  router_entropy: jax.Array
