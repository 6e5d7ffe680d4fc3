"""Single Mixture of Experts (sMoE): one shared FFN, M fixed dropout masks as the "experts".

Shapes: B batch, L length, T = B*L tokens (or B sequences with `per_sequence`),
D model width, F hidden width, M masks (the experts).

Each "expert" is the shared feed-forward network D -> F -> D restricted to a
fixed subset of its F hidden units. The subsets are M binary masks drawn once
from a seed and then frozen: they are stored as `DropoutMasks`, an
`nnx.Variable` that is not an `nnx.Param`, so `nnx.split(model, nnx.Param, ...)`
puts them in the non-parameter state. That state is checkpointed with the
model (TrainState.model_state) but never differentiated nor seen by the
optimizer. A float32 top-1 router picks one mask per token (or per sequence).

Selection (`SELECTIONS`): "gated_top1" takes the router's argmax, so nothing
is random at call time and the same input always takes the same mask.
"sample_then_argmax" is the original sMoE schedule: in training, before step
`sample_steps`, the mask is drawn from the router's softmax (exploration of
every mask while the router is still uninformed), from then on, and always at
evaluation, it is the argmax. Either way the output is scaled by the chosen
mask's probability, which is what trains the router.

Cost: one dense FFN plus a [T, F] mask multiply, whatever M is; there is no
dispatch and no capacity, so no token is ever dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tmoe_jax.feedforward import ACTIVATIONS
from tmoe_jax.moe.routing import RouteOutput, top_k_route
from tmoe_jax.moe.statistics import MoEAux, undropped_routing_aux

# How the router's choice is made; see the module docstring.
SELECTIONS = ("gated_top1", "sample_then_argmax")
# What kept hidden units are divided by: the nominal keep rate (inverted dropout), or each
# mask's own share of kept units, 1 / mean(mask) (the original sMoE).
MASK_SCALINGS = ("keep_rate", "mask_mean")


class DropoutMasks(nnx.Variable):
  """Fixed binary masks bool [M, F]: model state that is neither a parameter nor ever updated."""


def draw_dropout_masks(key: jax.Array, num_masks: int, d_ff: int, keep_rate: float) -> jax.Array:
  """M independent Bernoulli(keep_rate) masks over F hidden units, bool [M, F].

  An all-zero mask would make its expert a constant (the output bias) for
  every token sent to it. Rather than resample (a data-dependent loop), a mask
  that came out empty gets one unit, chosen uniformly, switched on: this moves
  that mask's keep rate by 1/F, and only happens at all when keep_rate * F is
  small (probability (1 - keep_rate)^F per mask).
  """
  if num_masks < 1:
    raise ValueError(f"num_masks must be >= 1, got {num_masks}")
  if d_ff < 1:
    raise ValueError(f"d_ff must be >= 1, got {d_ff}")
  if not 0.0 < keep_rate <= 1.0:
    raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
  bernoulli_key, rescue_key = jax.random.split(key)
  masks_MxF = jax.random.bernoulli(bernoulli_key, keep_rate, (num_masks, d_ff))
  rescue_unit_M = jax.random.randint(rescue_key, (num_masks,), 0, d_ff)
  rescue_MxF = jax.nn.one_hot(rescue_unit_M, d_ff, dtype=jnp.bool_)
  empty_M = ~jnp.any(masks_MxF, axis=-1)
  return masks_MxF | (empty_M[:, None] & rescue_MxF)


def masked_ffn(
  x_TxD: jax.Array,
  mask_index_T: jax.Array,
  masks_MxF: jax.Array,
  w_in_DxF: jax.Array,
  b_in_F: jax.Array,
  w_out_FxD: jax.Array,
  b_out_D: jax.Array,
  activation: str | Callable[[jax.Array], jax.Array],
  *,
  keep_rate: float = 1.0,
  scale_M: jax.Array | None = None,
) -> jax.Array:
  """The shared FFN with token t's hidden units multiplied by mask `mask_index_T[t]`, [T, D].

  Each token's mask row is gathered ([T, F], the size of the hidden
  activations themselves) so all M experts cost one pair of matmuls.
  Kept units are divided by `keep_rate` (inverted dropout, see
  `SingleMixtureOfExperts`), or multiplied by `scale_M[m]` when given;
  the output bias is not masked.

  Args:
    x_TxD: float tokens; the computation runs in their dtype.
    mask_index_T: int, which of the M masks each token uses.
    masks_MxF: bool or {0, 1} masks over the F hidden units.
    w_in_DxF, b_in_F, w_out_FxD, b_out_D: the shared FFN's weights.
    activation: a callable, or a name in `tmoe_jax.feedforward.ACTIVATIONS`.
    keep_rate: the nominal keep rate the masks were drawn with.
    scale_M: optional float [M], a factor per mask replacing 1 / keep_rate
      (e.g. `mask_mean_scales`).
  """
  activation = ACTIVATIONS[activation] if isinstance(activation, str) else activation
  dtype = x_TxD.dtype
  hidden_TxF = activation(x_TxD @ w_in_DxF.astype(dtype) + b_in_F.astype(dtype))
  mask_TxF = jnp.take(masks_MxF, mask_index_T, axis=0).astype(dtype)
  if scale_M is None:
    hidden_TxF = hidden_TxF * mask_TxF * jnp.asarray(1.0 / keep_rate, dtype)
  else:
    scale_Tx1 = jnp.take(scale_M, mask_index_T, axis=0).astype(dtype)[:, None]
    hidden_TxF = hidden_TxF * mask_TxF * scale_Tx1
  return hidden_TxF @ w_out_FxD.astype(dtype) + b_out_D.astype(dtype)


def mask_mean_scales(masks_MxF: jax.Array) -> jax.Array:
  """float32 [M]: 1 / (share of units mask m keeps); masks are never empty (`draw_dropout_masks`)."""
  return 1.0 / jnp.mean(masks_MxF.astype(jnp.float32), axis=-1)


def sample_then_argmax_route(router_logits_NxM: jax.Array, key: jax.Array, sample: jax.Array) -> RouteOutput:
  """Top-1 choice for N routing units (tokens or sequences): drawn from the softmax while `sample`.

  Args:
    router_logits_NxM: [N, M], any float dtype; cast to float32.
    key: PRNG key of the draw.
    sample: bool scalar (may be traced, e.g. `step < sample_steps`): True draws
      m ~ Categorical(softmax(logits)) independently per unit, False takes the argmax.

  Returns:
    RouteOutput with K = 1; the gate is the chosen mask's probability, as in
    `top_k_route(logits, 1)`, which this equals when `sample` is False.
  """
  route = top_k_route(router_logits_NxM, 1)
  sampled_N = jax.random.categorical(key, route.router_logits_TxE, axis=-1).astype(jnp.int32)
  index_Nx1 = jnp.where(sample, sampled_N, route.expert_indices_TxK[:, 0])[:, None]
  return RouteOutput(
    expert_indices_TxK=index_Nx1,
    gates_TxK=jnp.take_along_axis(route.router_probs_TxE, index_Nx1, axis=-1),
    router_probs_TxE=route.router_probs_TxE,
    router_logits_TxE=route.router_logits_TxE,
  )


def sequence_means(x_BxLxD: jax.Array, token_mask_BxL: jax.Array | None) -> jax.Array:
  """float32 [B, D]: the mean of each sequence's non-padding token vectors (0 for all-padding rows)."""
  x_BxLxD = x_BxLxD.astype(jnp.float32)
  if token_mask_BxL is None:
    return jnp.mean(x_BxLxD, axis=1)
  weights_BxL = token_mask_BxL.astype(jnp.float32)
  total_BxD = jnp.einsum("bld,bl->bd", x_BxLxD, weights_BxL)
  return total_BxD / jnp.maximum(jnp.sum(weights_BxL, axis=1), 1.0)[:, None]


class SingleMixtureOfExperts(nnx.Module):
  """sMoE: a top-1 router over M fixed dropout masks of one shared FFN.

  Drop-in for `MoEFeedForward` (same call signature, same `MoEAux`).

  Output: y = p * FFN_m(x), with m the argmax of the router softmax and p its
  probability. Scaling by p is what gives the router a task gradient (the
  argmax alone has none), as in Switch with k=1; at init p is about 1/M.

  Scaling choice: kept hidden units are divided by keep_rate (inverted
  dropout). It keeps each expert's expected hidden pre-projection equal to the
  full FFN's, so the output scale does not drift with keep_rate (sweeps over
  keep_rate start from comparable outputs) and weights copied from a dense
  `FeedForward` (same `hidden`/`output` layout) keep their expected output.
  There is no unmasked inference pass that would need it, so the factor only
  matters for scale, not correctness: w_out could absorb it.

  `per_sequence=True`: one mask per sequence, routed on the mean of its
  non-padding token vectors. The mean sees every position, so use it only in
  bidirectional (encoder) layers: in a causal decoder it would leak future
  tokens in teacher forcing and disagree with one-token-at-a-time decoding.
  Routing statistics then count each sequence (with at least one
  non-padding token) once, since the sequence is the unit of choice.

  `selection` (`SELECTIONS`) and `sample_steps`: see the module docstring; the
  sampling schedule needs `rngs` (stream `dropout`) and the train `step` in
  training calls. `mask_scaling` (`MASK_SCALINGS`): "keep_rate" as above, or
  "mask_mean", dividing by each mask's realised keep share as the original
  sMoE did (the two differ by the sampling noise of the masks, about
  sqrt((1 - r) / (r F)) relative).
  """

  def __init__(
    self,
    d_model: int,
    d_ff: int,
    num_masks: int,
    keep_rate: float,
    *,
    activation: str = "relu",
    per_sequence: bool = False,
    mask_seed: int = 0,
    selection: str = "gated_top1",
    sample_steps: int = 1000,
    mask_scaling: str = "keep_rate",
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if selection not in SELECTIONS:
      raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if mask_scaling not in MASK_SCALINGS:
      raise ValueError(f"mask_scaling must be one of {MASK_SCALINGS}, got {mask_scaling!r}")
    if sample_steps < 0:
      raise ValueError(f"sample_steps must be >= 0, got {sample_steps}")
    self.num_masks = num_masks
    self.keep_rate = float(keep_rate)
    self.activation = activation
    self.per_sequence = per_sequence
    self.selection = selection
    self.sample_steps = int(sample_steps)
    self.mask_scaling = mask_scaling
    self.dtype = dtype
    # The router stays float32: its softmax decides discrete choices.
    self.router = nnx.Linear(
      d_model,
      num_masks,
      use_bias=False,
      dtype=jnp.float32,
      kernel_init=nnx.initializers.normal(0.02),
      rngs=rngs,
    )
    # Same names and init as `FeedForward`, so a dense FFN's weights can be copied in.
    self.hidden = nnx.Linear(d_model, d_ff, dtype=dtype, rngs=rngs)
    self.output = nnx.Linear(d_ff, d_model, dtype=dtype, rngs=rngs)
    # Drawn from their own seed, not `rngs`: the masks depend only on
    # (mask_seed, M, F, keep_rate), however parameter initialisation is split.
    self.masks_MxF = DropoutMasks(draw_dropout_masks(jax.random.key(mask_seed), num_masks, d_ff, keep_rate))

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
    """Returns the layer output [B, L, D] and its routing statistics over the M masks.

    `drop_tokens` is accepted for `MoEFeedForward` compatibility and changes
    nothing: there is no capacity (dropped_fraction is always 0). With
    "gated_top1" `deterministic`, `rngs` and `step` change nothing either; with
    "sample_then_argmax" a training call (`deterministic=False`) samples while
    `step < sample_steps` and needs `rngs` and `step` (the train step's count
    of updates so far, possibly traced).
    """
    del drop_tokens
    batch, length, d_model = x_BxLxD.shape
    num_tokens = batch * length
    x_TxD = x_BxLxD.reshape(num_tokens, d_model)

    if self.per_sequence:
      route = self._route(self.router(sequence_means(x_BxLxD, token_mask_BxL)), deterministic, rngs, step)
      stats_mask = None if token_mask_BxL is None else jnp.any(token_mask_BxL, axis=1)
      mask_index_T = jnp.repeat(route.expert_indices_TxK[:, 0], length)
      gate_T = jnp.repeat(route.gates_TxK[:, 0], length)
    else:
      route = self._route(self.router(x_TxD.astype(jnp.float32)), deterministic, rngs, step)
      stats_mask = None if token_mask_BxL is None else token_mask_BxL.reshape(-1)
      mask_index_T = route.expert_indices_TxK[:, 0]
      gate_T = route.gates_TxK[:, 0]

    ffn_TxD = masked_ffn(
      x_TxD.astype(self.dtype),
      mask_index_T,
      self.masks_MxF[...],
      self.hidden.kernel[...],
      self.hidden.bias[...],
      self.output.kernel[...],
      self.output.bias[...],
      self.activation,
      keep_rate=self.keep_rate,
      scale_M=mask_mean_scales(self.masks_MxF[...]) if self.mask_scaling == "mask_mean" else None,
    )
    y_TxD = (gate_T[:, None].astype(ffn_TxD.dtype) * ffn_TxD).astype(x_BxLxD.dtype)

    aux = undropped_routing_aux(
      route.router_logits_TxE, route.router_probs_TxE, route.expert_indices_TxK, stats_mask
    )
    return y_TxD.reshape(batch, length, d_model), aux

  def _route(self, router_logits_NxM, deterministic: bool, rngs: nnx.Rngs | None, step) -> RouteOutput:
    """Top-1 over the masks for N routing units (tokens or sequences), per `selection`."""
    if self.selection == "gated_top1" or deterministic:
      return top_k_route(router_logits_NxM, 1)
    if rngs is None or step is None:
      raise ValueError("selection 'sample_then_argmax' needs `rngs` and `step` in training calls")
    return sample_then_argmax_route(router_logits_NxM, rngs.dropout(), jnp.asarray(step) < self.sample_steps)
