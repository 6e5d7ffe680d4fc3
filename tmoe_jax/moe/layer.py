"""The sparse MoE feed-forward layer: route -> dispatch -> experts -> combine.

Shapes: B batch, L length, T = B*L tokens, D model width, E experts, K top-k,
C capacity. The module only holds parameters; the math is the pure functions
of `routing`, `expert_choice`, `dispatch` and `losses`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tmoe_jax.config import MoEConfig
from tmoe_jax.feedforward import FeedForward
from tmoe_jax.moe import dispatch as dispatch_lib
from tmoe_jax.moe import losses
from tmoe_jax.moe.dropless import dropless_moe
from tmoe_jax.moe.expert_choice import expert_choice_combine, expert_choice_dispatch, expert_choice_route
from tmoe_jax.moe.experts import EXPERT_TYPES
from tmoe_jax.moe.routing import assign_slots_prioritized, top_k_route, update_expert_bias
from tmoe_jax.moe.statistics import MoEAux
from tmoe_jax.parallel import expert_parallel
from tmoe_jax.parallel.mesh import num_token_shards


class ExpertBias(nnx.Variable):
  """Per-expert routing bias of auxiliary-loss-free balancing: state, not a parameter.

  Kept out of `nnx.Param` so the optimizer never touches it; it is checkpointed
  with the rest of the model state.
  """


class MoEFeedForward(nnx.Module):
  """Sparse MoE feed-forward layer.

  Routers (`config.router`): "top_k" token choice (Switch k=1, GShard/Mixtral
  k=2) with fixed expert capacity, optional batch-prioritised slot assignment,
  jitter and DeepSeek-V3 expert bias; "expert_choice" (Zhou et al. 2022).
  Optional always-on shared experts (DeepSeekMoE) run beside the routed ones.
  """

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
    self.experts = EXPERT_TYPES[config.expert_type](
      config.num_experts,
      config.d_model,
      config.d_ff,
      activation=config.activation,
      dtype=config.dtype,
      rngs=rngs,
    )
    if config.num_shared_experts:
      # n shared experts of width d_ff are one dense FFN of width n * d_ff.
      self.shared_experts = FeedForward(
        config.d_model,
        config.d_ff * config.num_shared_experts,
        activation=config.activation,
        dtype=config.dtype,
        rngs=rngs,
      )
    if config.expert_bias_rate:
      self.expert_bias = ExpertBias(jnp.zeros((config.num_experts,), jnp.float32))

  def __call__(
    self,
    x_BxLxD: jax.Array,
    token_mask_BxL: jax.Array | None = None,
    *,
    deterministic: bool = True,
    drop_tokens: bool = True,
    rngs: nnx.Rngs | None = None,
  ) -> tuple[jax.Array, MoEAux]:
    """Returns the layer output [B, L, D] and its routing statistics.

    `drop_tokens=False` gives every expert room for all tokens (used when decoding
    one token at a time, where a dropped token would corrupt the generated output).
    `rngs` supplies the router-jitter key in training (`config.router_jitter > 0`).
    """
    config = self.config
    batch, length, d_model = x_BxLxD.shape
    num_tokens = batch * length
    x_TxD = x_BxLxD.reshape(num_tokens, d_model)
    token_mask_T = None if token_mask_BxL is None else token_mask_BxL.reshape(-1)

    if config.router == "expert_choice":
      router_logits_TxE = self.router(x_TxD.astype(jnp.float32))
      capacity = config.capacity(num_tokens, training=not deterministic) if drop_tokens else num_tokens
      y_TxD, aux = self._expert_choice(x_TxD, router_logits_TxE, capacity, token_mask_T)
    else:
      jitter_key = None
      if config.router_jitter and not deterministic:
        if rngs is None:
          raise ValueError("router_jitter > 0 needs `rngs` in training")
        jitter_key = rngs.dropout()
      # A token count that does not split over the mesh (a small last batch) takes the
      # single-device path, which jit still runs correctly on the sharded weights.
      # One device needs no shard_map: the local path keeps the fast CPU dropless kernel.
      if config.mesh is not None and config.mesh.size > 1 and num_tokens % num_token_shards(config.mesh) == 0:
        y_TxD, aux = self._expert_parallel(x_TxD, token_mask_T, jitter_key, deterministic, drop_tokens)
      else:
        router_logits_TxE = self.router(x_TxD.astype(jnp.float32))
        capacity = config.capacity(num_tokens, training=not deterministic) if drop_tokens else num_tokens
        y_TxD, aux = self._token_choice(x_TxD, router_logits_TxE, capacity, token_mask_T, jitter_key)
      if config.expert_bias_rate and not deterministic:
        self.expert_bias[...] = update_expert_bias(
          self.expert_bias[...], aux.expert_fraction_E, rate=config.expert_bias_rate
        )
    if config.num_shared_experts:
      y_TxD = y_TxD + self.shared_experts(x_TxD)
    return y_TxD.astype(x_BxLxD.dtype).reshape(batch, length, d_model), aux

  def _token_choice(self, x_TxD, router_logits_TxE, capacity, token_mask_T, jitter_key):
    config = self.config
    route = top_k_route(
      router_logits_TxE,
      config.top_k,
      softmax_order=config.softmax_order,
      normalize_gates=config.normalize_gates,
      jitter_key=jitter_key,
      jitter_eps=config.router_jitter,
      expert_bias_E=self.expert_bias[...] if config.expert_bias_rate else None,
    )
    if config.dispatch == "dropless":
      weights = expert_parallel.expert_weights_of(self.experts, config.expert_type)
      y_TxD = dropless_moe(
        x_TxD.astype(config.dtype),
        route.expert_indices_TxK,
        route.gates_TxK,
        tuple(w.astype(config.dtype) for w in weights),
        config.activation,
        expert_type=config.expert_type,
        token_mask_T=token_mask_T,
      )
      dropped_fraction = jnp.zeros((), jnp.float32)
    else:
      if config.batch_prioritized:
        slots = assign_slots_prioritized(
          route.expert_indices_TxK, route.router_probs_TxE, config.num_experts, capacity, token_mask_T
        )
      else:
        slots = dispatch_lib.assign_slots(
          route.expert_indices_TxK, config.num_experts, capacity, token_mask_T
        )
      expert_in_ExCxD = dispatch_lib.dispatch_tokens(x_TxD, slots, config.num_experts, capacity)
      y_TxD = dispatch_lib.combine_outputs(self.experts(expert_in_ExCxD), slots, route.gates_TxK)
      dropped_fraction = _dropped_fraction(slots.kept_TxK, token_mask_T)
    aux = MoEAux(
      load_balancing_loss=losses.load_balancing_loss(
        route.router_probs_TxE, route.expert_indices_TxK, token_mask_T
      ),
      router_z_loss=losses.router_z_loss(route.router_logits_TxE, token_mask_T),
      expert_fraction_E=losses.expert_assignment_fraction(
        route.expert_indices_TxK, config.num_experts, token_mask_T
      ),
      dropped_fraction=dropped_fraction,
      router_entropy=losses.router_entropy(route.router_probs_TxE, token_mask_T),
    )
    return y_TxD, aux

  def _expert_parallel(self, x_TxD, token_mask_T, jitter_key, deterministic, drop_tokens):
    """Top-k routing on the config's mesh; capacity is per device (see `parallel.expert_parallel`)."""
    config = self.config
    if not drop_tokens or config.dispatch == "dropless":
      capacity_factor = None  # dropless: a padded fixed-size exchange
    else:
      capacity_factor = config.eval_capacity_factor if deterministic else config.capacity_factor
    y_TxD, stats = expert_parallel.expert_parallel_moe(
      x_TxD,
      self.router.kernel[...],
      expert_parallel.expert_weights_of(self.experts, config.expert_type),
      mesh=config.mesh,
      top_k=config.top_k,
      capacity_factor=capacity_factor,
      normalize_gates=config.normalize_gates,
      activation=config.activation,
      token_mask_T=token_mask_T,
      softmax_order=config.softmax_order,
      expert_type=config.expert_type,
      dtype=config.dtype,
      jitter_key=jitter_key,
      jitter_eps=config.router_jitter,
      expert_bias_E=self.expert_bias[...] if config.expert_bias_rate else None,
      batch_prioritized=config.batch_prioritized,
    )
    return y_TxD, stats

  def _expert_choice(self, x_TxD, router_logits_TxE, capacity, token_mask_T):
    num_tokens = x_TxD.shape[0]
    route = expert_choice_route(router_logits_TxE, capacity, token_mask_T)
    expert_out_ExCxD = self.experts(expert_choice_dispatch(x_TxD, route))
    y_TxD = expert_choice_combine(expert_out_ExCxD, route, num_tokens)
    picks_E = jnp.sum(route.kept_ExC, axis=-1).astype(jnp.float32)
    picked_T = (
      jnp.zeros((num_tokens,), bool).at[route.token_indices_ExC.reshape(-1)].max(route.kept_ExC.reshape(-1))
    )
    real_T = jnp.ones((num_tokens,), bool) if token_mask_T is None else token_mask_T
    aux = MoEAux(
      # Balanced by construction: no balancing loss to add.
      load_balancing_loss=jnp.zeros((), jnp.float32),
      router_z_loss=losses.router_z_loss(route.router_logits_TxE, token_mask_T),
      expert_fraction_E=picks_E / jnp.maximum(jnp.sum(picks_E), 1.0),
      # Here "dropped" means a real token that no expert picked.
      dropped_fraction=jnp.sum(real_T & ~picked_T) / jnp.maximum(jnp.sum(real_T), 1),
      router_entropy=losses.router_entropy(route.router_probs_TxE, token_mask_T),
    )
    return y_TxD, aux


def _dropped_fraction(kept_TxK: jax.Array, token_mask_T: jax.Array | None) -> jax.Array:
  routed_TxK = (
    jnp.ones_like(kept_TxK)
    if token_mask_T is None
    else jnp.broadcast_to(token_mask_T[:, None], kept_TxK.shape)
  )
  dropped = jnp.sum(routed_TxK & ~kept_TxK)
  return dropped / jnp.maximum(jnp.sum(routed_TxK), 1)
