"""The sparse MoE feed-forward layer: route -> dispatch -> experts -> combine.

Shapes: B batch, L length, G routing groups of S tokens, D model width, E
experts, K top-k. The module only holds parameters; the math is the pure
functions of `token_choice` (top-k, on one device or expert-parallel via
`expert_parallel`) and `expert_choice`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tmoe_jax.feedforward import FeedForward, GatedFeedForward
from tmoe_jax.moe import losses
from tmoe_jax.moe.expert_choice import expert_choice_combine, expert_choice_dispatch, expert_choice_route
from tmoe_jax.moe.expert_parallel import expert_parallel_moe
from tmoe_jax.moe.experts import EXPERT_TYPES, expert_weights_of
from tmoe_jax.moe.routing import jitter_noise, update_expert_bias
from tmoe_jax.moe.settings import MoEConfig, check_mesh
from tmoe_jax.moe.statistics import MoEAux, finalize
from tmoe_jax.moe.token_choice import local_experts, routing_groups, token_choice_moe
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

  def __init__(self, config: MoEConfig, *, mesh=None, rngs: nnx.Rngs):
    """`mesh`: a ('data', 'expert') mesh to run top-k routing expert-parallel on; None = one device."""
    check_mesh(config, mesh)
    self.config = config
    self.mesh = mesh
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
      shared_type = FeedForward if config.shared_expert_type == "mlp" else GatedFeedForward
      self.shared_experts = shared_type(
        config.d_model, config.shared_width, activation=config.activation, dtype=config.dtype, rngs=rngs
      )
      if config.shared_expert_gate:
        # Qwen2-MoE: a sigmoid of one learned projection scales the shared output per token.
        self.shared_expert_gate = nnx.Linear(config.d_model, 1, use_bias=False, dtype=config.dtype, rngs=rngs)
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
    step: jax.Array | int | None = None,
  ) -> tuple[jax.Array, MoEAux]:
    """Returns the layer output [B, L, D] and its routing statistics (the feed-forward protocol of
    `models.blocks`; `step` is accepted for it and unused: no setting here changes with the step).

    `drop_tokens=False` gives every expert room for all tokens (used when decoding
    one token at a time, where a dropped token would corrupt the generated output).
    `rngs` supplies the router-jitter key in training (`config.router_jitter > 0`).
    """
    config = self.config
    batch, length, _ = x_BxLxD.shape
    if token_mask_BxL is None:
      token_mask_BxL = jnp.ones((batch, length), bool)
    y_BxLxD, aux = ROUTED_PATHS[config.router](
      self, x_BxLxD, token_mask_BxL, deterministic, drop_tokens, rngs
    )
    if config.num_shared_experts:
      shared_BxLxD = self.shared_experts(x_BxLxD)
      if config.shared_expert_gate:
        shared_BxLxD = jax.nn.sigmoid(self.shared_expert_gate(x_BxLxD)) * shared_BxLxD
      y_BxLxD = y_BxLxD + shared_BxLxD
    return y_BxLxD.astype(x_BxLxD.dtype), aux

  def _token_choice(self, x_BxLxD, token_mask_BxL, deterministic, drop_tokens, rngs):
    config = self.config
    batch, length, _ = x_BxLxD.shape
    groups = routing_groups(batch, length, config.sequences_per_group)
    if config.dispatch == "dropless":
      capacity = None
    elif drop_tokens:
      capacity = config.capacity(groups.group_size, training=not deterministic)
    else:
      capacity = groups.group_size
    jitter_GxSxE = None
    if config.router_jitter and not deterministic:
      if rngs is None:
        raise ValueError("router_jitter > 0 needs `rngs` in training")
      # Drawn for the whole batch here, outside any shard_map, so every mesh sees the same noise.
      noise_BxLxE = jitter_noise(rngs.dropout(), (batch, length, config.num_experts), config.router_jitter)
      jitter_GxSxE = groups.group(noise_BxLxE, pad_value=1.0)
    settings = {
      "top_k": config.top_k,
      "capacity": capacity,
      "softmax_order": config.softmax_order,
      "normalize_gates": config.normalize_gates,
      "batch_prioritized": config.batch_prioritized,
      "jitter_GxSxE": jitter_GxSxE,
      "expert_bias_E": self.expert_bias[...] if config.expert_bias_rate else None,
      "router_dtype": jnp.float32 if config.router_dtype == "float32" else config.dtype,
    }
    expert_settings = {
      "expert_type": config.expert_type,
      "activation": config.activation,
      "dtype": config.dtype,
    }
    x_GxSxD = groups.group(x_BxLxD)
    mask_GxS = groups.group(token_mask_BxL.astype(bool), pad_value=False)
    weights = expert_weights_of(self.experts, config.expert_type)
    mesh = self.mesh
    # Groups that do not split evenly over the devices (a small last batch) take the
    # one-device path: the same math, which jit runs on the sharded weights.
    if mesh is not None and mesh.size > 1 and groups.num_groups % num_token_shards(mesh) == 0:
      y_GxSxD, sums = expert_parallel_moe(
        x_GxSxD, mask_GxS, self.router.kernel[...], weights, mesh=mesh, **settings, **expert_settings
      )
    else:
      y_GxSxD, sums = token_choice_moe(
        x_GxSxD, mask_GxS, self.router.kernel[...], local_experts(weights, **expert_settings), **settings
      )
    aux = finalize(sums, config.top_k)
    if config.expert_bias_rate and not deterministic:
      self.expert_bias[...] = update_expert_bias(
        self.expert_bias[...], aux.expert_fraction_E, rate=config.expert_bias_rate
      )
    return groups.ungroup(y_GxSxD), aux

  def _expert_choice(self, x_BxLxD, token_mask_BxL, deterministic, drop_tokens, rngs):
    del rngs  # no jitter: each expert's pick is already a competition between tokens
    batch, length, d_model = x_BxLxD.shape
    num_tokens = batch * length
    x_TxD = x_BxLxD.reshape(num_tokens, d_model)
    token_mask_T = token_mask_BxL.reshape(-1)
    router_logits_TxE = self.router(x_TxD.astype(jnp.float32))
    capacity = self.config.capacity(num_tokens, training=not deterministic) if drop_tokens else num_tokens
    route = expert_choice_route(router_logits_TxE, capacity, token_mask_T)
    expert_out_ExCxD = self.experts(expert_choice_dispatch(x_TxD, route))
    y_TxD = expert_choice_combine(expert_out_ExCxD, route, num_tokens)
    picks_E = jnp.sum(route.kept_ExC, axis=-1).astype(jnp.float32)
    picked_T = (
      jnp.zeros((num_tokens,), bool).at[route.token_indices_ExC.reshape(-1)].max(route.kept_ExC.reshape(-1))
    )
    real_T = token_mask_T
    aux = MoEAux(
      # Balanced by construction: no balancing loss to add.
      load_balancing_loss=jnp.zeros((), jnp.float32),
      router_z_loss=losses.router_z_loss(route.router_logits_TxE, token_mask_T),
      expert_fraction_E=picks_E / jnp.maximum(jnp.sum(picks_E), 1.0),
      # Here "dropped" means a real token that no expert picked.
      dropped_fraction=jnp.sum(real_T & ~picked_T) / jnp.maximum(jnp.sum(real_T), 1),
      router_entropy=losses.router_entropy(route.router_probs_TxE, token_mask_T),
      router_probability_E=jnp.zeros((self.config.num_experts,), jnp.float32),
      num_tokens=jnp.sum(real_T).astype(jnp.float32),
    )
    return y_TxD.reshape(batch, length, d_model), aux


# How the layer runs each router of `routers.ROUTER_REGISTRY`:
# (layer, x [B, L, D], token mask [B, L], deterministic, drop_tokens, rngs) -> (y [B, L, D], MoEAux).
ROUTED_PATHS = {"top_k": MoEFeedForward._token_choice, "expert_choice": MoEFeedForward._expert_choice}
