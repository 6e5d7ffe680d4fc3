"""The token-choice MoE, written once: route -> slots or sort -> experts -> combine, plus routing sums.

Shapes: B batch, L length, G routing groups, S tokens per group, T = G*S,
D model width, E experts, K experts per token, C capacity per (group, expert),
A = T*K (token, choice) assignments.

Routing groups (GShard's groups, flaxformer's `num_groups`): capacity and the
order in which assignments claim slots are decided inside each group of
`sequences_per_group` whole sequences, never across groups. A group's result
depends on its own tokens only, so a device mesh changes only which device
holds which group, never which tokens drop: one device and any mesh compute
the same model. Dropless dispatch has no capacity and ignores the groups.

`token_choice_moe` is the pure function both execution paths call. How the
experts run is the one thing that differs, so it is a parameter
(`ExpertCompute`): `local_experts` here runs every expert on this device;
`moe.expert_parallel` builds one that exchanges rows with the devices holding
the other experts, and wraps this function in `jax.shard_map`. Statistics
leave as `RoutingSums`, to be added (or psum'd) over groups and devices before
`statistics.finalize`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from tmoe_jax.feedforward import ACTIVATIONS
from tmoe_jax.moe.dispatch import assign_slots, combine_outputs, dispatch_tokens
from tmoe_jax.moe.dropless import dropless_moe
from tmoe_jax.moe.experts import EXPERT_FUNCTIONS
from tmoe_jax.moe.routing import assign_slots_prioritized, top_k_route
from tmoe_jax.moe.statistics import RoutingSums, routing_sums

# (x_TxD, expert_indices_TxK, gates_TxK, token_mask_T) -> y_TxD, every assignment computed.
RunDropless = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class ExpertCompute:
  """How the experts run, for each dispatch.

  run_buffers: [E, N, D] -> [E, N, D], expert e applied to its N slots (capacity
    dispatch: N = groups x C).
  run_dropless: see `RunDropless`.
  """

  run_buffers: Callable[[jax.Array], jax.Array]
  run_dropless: RunDropless


def local_experts(weights: Sequence[jax.Array], *, expert_type: str, activation: str, dtype) -> ExpertCompute:
  """Every expert on this device: the batched expert function, and `dropless_moe`'s grouped kernel."""
  weights = tuple(weights)
  expert_fn = EXPERT_FUNCTIONS[expert_type]

  def run_buffers(buffer_ExNxD):
    return expert_fn(weights, buffer_ExNxD, activation=ACTIVATIONS[activation], dtype=dtype)

  def run_dropless(x_TxD, expert_indices_TxK, gates_TxK, token_mask_T):
    return dropless_moe(
      x_TxD.astype(dtype),
      expert_indices_TxK,
      gates_TxK,
      tuple(w.astype(dtype) for w in weights),
      activation,
      expert_type=expert_type,
      token_mask_T=token_mask_T,
    )

  return ExpertCompute(run_buffers=run_buffers, run_dropless=run_dropless)


@dataclasses.dataclass(frozen=True)
class RoutingGroups:
  """How a [B, L, ...] batch was cut into [G, S, ...] routing groups (see `group_sequences`)."""

  batch: int
  length: int
  sequences_per_group: int

  @property
  def padded_batch(self) -> int:
    return -(-self.batch // self.sequences_per_group) * self.sequences_per_group

  @property
  def num_groups(self) -> int:
    return self.padded_batch // self.sequences_per_group

  @property
  def group_size(self) -> int:
    return self.sequences_per_group * self.length

  def group(self, values_BxLx___: jax.Array, pad_value=0) -> jax.Array:
    """[B, L, ...] -> [G, S, ...]; padding sequences (to fill the last group) hold `pad_value`."""
    extra = self.padded_batch - self.batch
    if extra:
      widths = [(0, extra)] + [(0, 0)] * (values_BxLx___.ndim - 1)
      values_BxLx___ = jnp.pad(values_BxLx___, widths, constant_values=pad_value)
    return values_BxLx___.reshape(self.num_groups, self.group_size, *values_BxLx___.shape[2:])

  def ungroup(self, values_GxSx___: jax.Array) -> jax.Array:
    """[G, S, ...] -> [B, L, ...], the padding sequences cut off."""
    values = values_GxSx___.reshape(self.padded_batch, self.length, *values_GxSx___.shape[2:])
    return values[: self.batch]


def routing_groups(batch: int, length: int, sequences_per_group: int) -> RoutingGroups:
  """Groups of `sequences_per_group` whole sequences; 0, or more than the batch, = one group of all.

  Depends on the global batch shape only, never on a mesh. A batch that does not
  fill its last group is padded with masked sequences, which are never routed.
  """
  if sequences_per_group < 0:
    raise ValueError(f"sequences_per_group must be >= 0, got {sequences_per_group}")
  per_group = batch if sequences_per_group == 0 else min(sequences_per_group, batch)
  return RoutingGroups(batch=batch, length=length, sequences_per_group=max(per_group, 1))


def token_choice_moe(
  x_GxSxD: jax.Array,
  token_mask_GxS: jax.Array,
  router_kernel_DxE: jax.Array,
  experts: ExpertCompute,
  *,
  top_k: int,
  capacity: int | None,
  softmax_order: str = "before",
  normalize_gates: bool = True,
  batch_prioritized: bool = False,
  jitter_GxSxE: jax.Array | None = None,
  expert_bias_E: jax.Array | None = None,
  router_dtype=jnp.float32,
) -> tuple[jax.Array, RoutingSums]:
  """Top-k token-choice MoE on G routing groups of S tokens.

  Args:
    x_GxSxD: the tokens, grouped (`RoutingGroups.group`).
    token_mask_GxS: bool; False tokens (padding) are not routed, take no slot
      and are left out of every statistic.
    router_kernel_DxE: the router's weight (no bias).
    router_dtype: the dtype of the router matmul (its logits and softmax are float32 after it):
      float32 by default; a bfloat16 model may route in bfloat16, as Hugging Face checkpoints do.
    experts: how the experts run (`local_experts`, or the expert-parallel one).
    top_k, softmax_order, normalize_gates, expert_bias_E: as `routing.top_k_route`.
    capacity: C slots per expert in each group
      (`dispatch.expert_capacity(S, ...)`), or None for dropless dispatch.
    batch_prioritized: slots go to the most confident tokens of each group
      first (`routing.assign_slots_prioritized`) instead of in token order.
    jitter_GxSxE: multiplicative router noise (drawn by the caller, so every
      mesh sees the same draw), or None.

  Returns:
    y_GxSxD in the experts' dtype (dropped assignments add 0), and the routing
    sums of these tokens (not yet reduced over devices).
  """
  num_groups, group_size, d_model = x_GxSxD.shape
  num_experts = router_kernel_DxE.shape[-1]
  num_tokens = num_groups * group_size
  x_TxD = x_GxSxD.reshape(num_tokens, d_model)
  mask_T = token_mask_GxS.reshape(num_tokens).astype(bool)
  logits_TxE = jnp.dot(x_TxD.astype(router_dtype), router_kernel_DxE.astype(router_dtype)).astype(jnp.float32)
  if jitter_GxSxE is not None:
    logits_TxE = logits_TxE * jitter_GxSxE.reshape(num_tokens, num_experts)
  route = top_k_route(
    logits_TxE,
    top_k,
    softmax_order=softmax_order,
    normalize_gates=normalize_gates,
    expert_bias_E=expert_bias_E,
  )
  if capacity is None:
    y_TxD = experts.run_dropless(x_TxD, route.expert_indices_TxK, route.gates_TxK, mask_T)
    kept_TxK = None
  else:
    per_group = lambda a: a.reshape(num_groups, group_size, *a.shape[1:])
    if batch_prioritized:
      slots = jax.vmap(lambda i, p, m: assign_slots_prioritized(i, p, num_experts, capacity, m))(
        per_group(route.expert_indices_TxK), per_group(route.router_probs_TxE), per_group(mask_T)
      )
    else:
      slots = jax.vmap(lambda i, m: assign_slots(i, num_experts, capacity, m))(
        per_group(route.expert_indices_TxK), per_group(mask_T)
      )
    buffer_GxExCxD = jax.vmap(lambda x, s: dispatch_tokens(x, s, num_experts, capacity))(x_GxSxD, slots)
    # All groups' slots of one expert side by side: each expert runs one matmul.
    buffer_ExNxD = buffer_GxExCxD.transpose(1, 0, 2, 3).reshape(num_experts, num_groups * capacity, d_model)
    y_ExNxD = experts.run_buffers(buffer_ExNxD)
    y_GxExCxD = y_ExNxD.reshape(num_experts, num_groups, capacity, -1).transpose(1, 0, 2, 3)
    y_TxD = jax.vmap(combine_outputs)(y_GxExCxD, slots, per_group(route.gates_TxK)).reshape(num_tokens, -1)
    kept_TxK = slots.kept_TxK.reshape(num_tokens, top_k)
  sums = routing_sums(
    route.router_logits_TxE, route.router_probs_TxE, route.expert_indices_TxK, kept_TxK, mask_T
  )
  return y_TxD.reshape(num_groups, group_size, -1), sums
