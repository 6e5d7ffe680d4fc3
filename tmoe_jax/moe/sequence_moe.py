"""A mixture of sequence experts: one gate per sequence over E experts that each read it whole.

Shapes: B batch, L length, D input width, H hidden (= output) width, E experts,
K top-k, R router hidden width.

The model of the original PyTorch MRPC project: a gating network looks at the
masked mean of the token vectors and weights E sequence experts (MLP, GRU,
LSTM or CNN, `sequence_experts.SEQUENCE_EXPERT_TYPES`), each of which turns
the sequence into one H-vector. The result is one vector per sequence, e.g.
for a classification head.

The unit of routing is the sequence, so the statistics in `MoEAux` (Switch
load-balancing loss, z-loss, expert fraction, router entropy) count each
sequence with at least one real token once; all-padding rows are ignored.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from tmoe_jax.moe.routing import check_top_k, top_k_route
from tmoe_jax.moe.sequence_experts import SEQUENCE_EXPERT_TYPES, masked_sequence_mean
from tmoe_jax.moe.statistics import MoEAux, undropped_routing_aux


def gates_from_route(expert_indices_BxK: jax.Array, gates_BxK: jax.Array, num_experts: int) -> jax.Array:
  """float32 [B, E]: each chosen expert's gate at its index, 0 for the unchosen ones."""
  one_hot_BxKxE = jax.nn.one_hot(expert_indices_BxK, num_experts, dtype=jnp.float32)
  return jnp.einsum("bk,bke->be", gates_BxK.astype(jnp.float32), one_hot_BxKxE)


class SequenceMoE(nnx.Module):
  """Gating network + E sequence experts: [B, L, D] (+ [B, L] mask) -> ([B, H], MoEAux).

  Gating (`gating`):
    "dense": every expert's output, weighted by the full softmax (the
      original's model). The statistics treat each sequence's argmax expert
      as its assignment, so the load-balancing loss penalises one expert
      dominating every sequence. `top_k` is not used.
    "top_k": only the K experts with the largest probabilities contribute,
      weighted by their probabilities (renormalised to sum to 1 when
      `normalize_gates` and K > 1; see `routing.top_k_route`). All E experts
      are still computed and the unchosen ones multiplied by 0: with a handful
      of small experts, gathering each expert's sequences (capacity, dispatch,
      a ragged batch per expert) costs more than the E/K-fold extra FLOPs
      saves. Gradients reach only the chosen experts, as with a real dispatch.

  The router (D -> E, no bias, optionally after a ReLU hidden layer of width
  `router_hidden_size`) runs in float32 on the float32 masked mean of the
  input: its softmax decides discrete choices, and near-ties in bfloat16
  would be arbitrary. Dropout (`dropout_rate`) applies to the mixed output,
  the pooled features a classifier head reads (where Kim 2014 puts it for
  text CNNs); input dropout, if wanted, belongs to the embedding.
  """

  def __init__(
    self,
    expert_type: str,
    num_experts: int,
    d_model: int,
    hidden_size: int,
    *,
    top_k: int = 2,
    gating: Literal["dense", "top_k"] = "dense",
    normalize_gates: bool = True,
    router_hidden_size: int | None = None,
    dropout_rate: float = 0.0,
    kernel_width: int = 3,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if expert_type not in SEQUENCE_EXPERT_TYPES:
      raise ValueError(f"expert_type must be one of {sorted(SEQUENCE_EXPERT_TYPES)}, got {expert_type!r}")
    if gating not in ("dense", "top_k"):
      raise ValueError(f"gating must be 'dense' or 'top_k', got {gating!r}")
    if num_experts < 1:
      raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if gating == "top_k":
      check_top_k(top_k, num_experts)
    self.expert_type = expert_type
    self.num_experts = num_experts
    self.top_k = top_k
    self.gating = gating
    self.normalize_gates = normalize_gates

    # Assigned once, Linear or None, so nnx sees one kind of attribute.
    self.router_hidden = (
      nnx.Linear(d_model, router_hidden_size, dtype=jnp.float32, rngs=rngs) if router_hidden_size else None
    )
    router_in = router_hidden_size or d_model
    # Small init: near-uniform gates at the start, so every expert gets trained.
    self.router = nnx.Linear(
      router_in,
      num_experts,
      use_bias=False,
      dtype=jnp.float32,
      kernel_init=nnx.initializers.normal(0.02),
      rngs=rngs,
    )
    extra = {"kernel_width": kernel_width} if expert_type == "cnn" else {}
    self.experts = SEQUENCE_EXPERT_TYPES[expert_type](
      num_experts, d_model, hidden_size, dtype=dtype, rngs=rngs, **extra
    )
    self.dropout = nnx.Dropout(dropout_rate)

  def router_logits(self, x_BxLxD: jax.Array, token_mask_BxL: jax.Array | None = None) -> jax.Array:
    """float32 [B, E]: the gating network's scores from the masked mean of each sequence."""
    summary_BxD = masked_sequence_mean(x_BxLxD.astype(jnp.float32), token_mask_BxL)
    if self.router_hidden is not None:
      summary_BxD = jax.nn.relu(self.router_hidden(summary_BxD))
    return self.router(summary_BxD)

  def __call__(
    self,
    x_BxLxD: jax.Array,
    token_mask_BxL: jax.Array | None = None,
    *,
    deterministic: bool = True,
    rngs: nnx.Rngs | None = None,
  ) -> tuple[jax.Array, MoEAux]:
    """Returns the mixed expert output [B, H] (experts' dtype) and the routing statistics.

    Args:
      x_BxLxD: token vectors (e.g. embeddings).
      token_mask_BxL: bool, True for real tokens; right padding (a prefix
        mask) makes the recurrent and convolutional experts see exactly the
        unpadded sequence. None: every position is real.
      deterministic: False applies dropout, drawing from `rngs.dropout`.
    """
    num_experts = self.num_experts
    # `RouteOutput` names its token axis T; here the routed units are the B sequences.
    router_logits_BxE = self.router_logits(x_BxLxD, token_mask_BxL)
    if self.gating == "dense":
      route = top_k_route(router_logits_BxE, 1)
      gates_BxE = route.router_probs_TxE
    else:
      route = top_k_route(router_logits_BxE, self.top_k, normalize_gates=self.normalize_gates)
      gates_BxE = gates_from_route(route.expert_indices_TxK, route.gates_TxK, num_experts)

    # Every expert reads the same sequences. The stacks take [E, ...] anyway, so
    # that expert-parallel code can hand each shard only its own experts' inputs.
    x_ExBxLxD = jnp.broadcast_to(x_BxLxD[None], (num_experts, *x_BxLxD.shape))
    y_ExBxH = self.experts(x_ExBxLxD, token_mask_BxL)
    y_BxH = jnp.einsum("ebh,be->bh", y_ExBxH, gates_BxE.astype(y_ExBxH.dtype))
    y_BxH = self.dropout(y_BxH, deterministic=deterministic, rngs=rngs)

    sequence_mask_B = None if token_mask_BxL is None else jnp.any(token_mask_BxL, axis=1)
    # No capacity: no sequence is ever dropped.
    aux = undropped_routing_aux(
      route.router_logits_TxE, route.router_probs_TxE, route.expert_indices_TxK, sequence_mask_B
    )
    return y_BxH, aux
