"""The sparse MoE feed-forward layer: route -> dispatch -> experts -> combine.

Shapes: B batch, L length, T = B*L tokens, D model width, E experts, K top-k,
C capacity. The module only holds parameters; the math is the pure functions
of `routing`, `dispatch` and `losses`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from tmoe_jax.config import MoEConfig
from tmoe_jax.moe import dispatch as dispatch_lib
from tmoe_jax.moe import losses
from tmoe_jax.moe.experts import MlpExperts
from tmoe_jax.moe.routing import top_k_route


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


class MoEFeedForward(nnx.Module):
  """Top-k token-choice MoE with fixed expert capacity (Switch / GShard)."""

  def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
    self.config = config
    # The router stays float32: its softmax decides discrete choices.
    self.router = nnx.Linear(
      config.d_model,
      config.num_experts,
      use_bias=False,
      dtype=jnp.float32,
      kernel_init=nnx.initializers.normal(0.02),
      rngs=rngs,
    )
    self.experts = MlpExperts(
      config.num_experts,
      config.d_model,
      config.d_ff,
      activation=config.activation,
      dtype=config.dtype,
      rngs=rngs,
    )

  def __call__(
    self,
    x_BxLxD: jax.Array,
    token_mask_BxL: jax.Array | None = None,
    *,
    deterministic: bool = True,
    drop_tokens: bool = True,
  ) -> tuple[jax.Array, MoEAux]:
    """Returns the layer output [B, L, D] and its routing statistics.

    `drop_tokens=False` gives every expert room for all tokens (used when decoding
    one token at a time, where a dropped token would corrupt the generated output).
    """
    config = self.config
    batch, length, d_model = x_BxLxD.shape
    x_TxD = x_BxLxD.reshape(batch * length, d_model)
    token_mask_T = None if token_mask_BxL is None else token_mask_BxL.reshape(-1)

    route = top_k_route(
      self.router(x_TxD.astype(jnp.float32)), config.top_k, normalize_gates=config.normalize_gates
    )
    num_tokens = batch * length
    capacity = config.capacity(num_tokens, training=not deterministic) if drop_tokens else num_tokens
    slots = dispatch_lib.assign_slots(route.expert_indices_TxK, config.num_experts, capacity, token_mask_T)
    expert_in_ExCxD = dispatch_lib.dispatch_tokens(x_TxD, slots, config.num_experts, capacity)
    expert_out_ExCxD = self.experts(expert_in_ExCxD)
    y_TxD = dispatch_lib.combine_outputs(expert_out_ExCxD, slots, route.gates_TxK).astype(x_BxLxD.dtype)

    aux = MoEAux(
      load_balancing_loss=losses.load_balancing_loss(
        route.router_probs_TxE, route.expert_indices_TxK, token_mask_T
      ),
      router_z_loss=losses.router_z_loss(route.router_logits_TxE, token_mask_T),
      expert_fraction_E=losses.expert_assignment_fraction(
        route.expert_indices_TxK, config.num_experts, token_mask_T
      ),
      dropped_fraction=_dropped_fraction(slots.kept_TxK, token_mask_T),
      router_entropy=losses.router_entropy(route.router_probs_TxE, token_mask_T),
    )
    return y_TxD.reshape(batch, length, d_model), aux


def _dropped_fraction(kept_TxK: jax.Array, token_mask_T: jax.Array | None) -> jax.Array:
  routed_TxK = (
    jnp.ones_like(kept_TxK)
    if token_mask_T is None
    else jnp.broadcast_to(token_mask_T[:, None], kept_TxK.shape)
  )
  dropped = jnp.sum(routed_TxK & ~kept_TxK)
  return dropped / jnp.maximum(jnp.sum(routed_TxK), 1)
