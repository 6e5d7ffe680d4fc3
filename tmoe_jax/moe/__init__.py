"""Mixture-of-Experts: routers, dispatch, experts, losses and the layer that wires them."""

from tmoe_jax.moe.dispatch import DispatchSlots, assign_slots, combine_outputs, dispatch_tokens
from tmoe_jax.moe.experts import MlpExperts
from tmoe_jax.moe.layer import MoEFeedForward
from tmoe_jax.moe.losses import (
  expert_assignment_fraction,
  load_balancing_loss,
  mean_router_probability,
  router_entropy,
  router_z_loss,
)
from tmoe_jax.moe.routing import RouteOutput, top_k_route
from tmoe_jax.moe.statistics import MoEAux

__all__ = [
  "DispatchSlots",
  "MlpExperts",
  "MoEAux",
  "MoEFeedForward",
  "RouteOutput",
  "assign_slots",
  "combine_outputs",
  "dispatch_tokens",
  "expert_assignment_fraction",
  "load_balancing_loss",
  "mean_router_probability",
  "router_entropy",
  "router_z_loss",
  "top_k_route",
]
