"""The pre-LN residual block every Transformer here is built from, and its feed-forward layers.

Shapes: B batch, L length (queries), S memory length (keys of cross-attention), D d_model.

A block is `x + Dropout(SelfAttention(LN(x)))`, then optionally
`x + Dropout(CrossAttention(LN(x), memory))`, then `x + Dropout(FFN(LN(x)))`:
the encoder layer (no cross-attention, padding mask), the decoder layer (causal
mask, cross-attention over the encoder output) and the language model's layer
(causal mask) are the same class.

Every feed-forward layer has one call, the feed-forward protocol:
`layer(x [B, L, D], token_mask [B, L] | None, *, deterministic, rngs, step, drop_tokens)
-> (y [B, L, D], MoEAux | None)`. `FEED_FORWARD_BUILDERS` makes each kind
(`FEED_FORWARDS`): "dense" (`feedforward.FeedForward`), "moe" (the top-k or
expert-choice `moe.layer.MoEFeedForward`) and "smoe" (`moe.smoe.SingleMixtureOfExperts`).
`step` is the train step (the sMoE's sampling schedule reads it); `drop_tokens=False`
lifts expert capacity (one-token decoding).

Rematerialisation (`model.remat`, `REMATS`) is applied here, once, around each block's
`__call__`: "none" keeps every intermediate of the forward pass for the backward pass;
"full" keeps only the block's inputs and recomputes the rest in the backward pass;
"save_dots" keeps the outputs of every matmul (projections, attention scores, expert
matmuls) and recomputes the cheap elementwise work between them; "save_dots_no_batch" keeps
only the matmuls without batch dimensions (the dense projections and FFNs, not attention
scores nor the per-expert matmuls). The results are the same; only memory and time differ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from tmoe_jax.attention import KeyValueCache, MultiHeadAttention
from tmoe_jax.embeddings import POSITION_EMBEDDINGS
from tmoe_jax.feedforward import FeedForward
from tmoe_jax.moe.layer import MoEFeedForward
from tmoe_jax.moe.routers import CAUSAL_ROUTERS
from tmoe_jax.moe.settings import ACTIVATIONS
from tmoe_jax.moe.smoe import SingleMixtureOfExperts
from tmoe_jax.moe.statistics import MoEAux
from tmoe_jax.validation import require


class DenseFeedForward(FeedForward):
  """`FeedForward` with the feed-forward protocol's call: (y, None); mask, step and drop_tokens unused."""

  def __call__(
    self,
    x_BxLxD: jax.Array,
    token_mask_BxL: jax.Array | None = None,
    *,
    deterministic: bool = True,
    rngs: nnx.Rngs | None = None,
    step: jax.Array | int | None = None,
    drop_tokens: bool = True,
  ) -> tuple[jax.Array, None]:
    del token_mask_BxL, step, drop_tokens  # a dense layer treats every token alike
    return super().__call__(x_BxLxD, deterministic=deterministic, rngs=rngs), None


# A builder's `model` is the model's settings: d_model, activation, dtype, moe and smoe.
def _dense(model, hidden_width: int, dropout_rate: float, layer_id: int, mesh, rngs: nnx.Rngs) -> nnx.Module:
  del layer_id, mesh
  return DenseFeedForward(
    model.d_model,
    hidden_width,
    activation=model.activation,
    dropout_rate=dropout_rate,
    dtype=model.dtype,
    rngs=rngs,
  )


def _moe(model, hidden_width: int, dropout_rate: float, layer_id: int, mesh, rngs: nnx.Rngs) -> nnx.Module:
  # The experts' width is `model.moe.d_ff`, which the model set.
  del hidden_width, dropout_rate, layer_id
  return MoEFeedForward(model.moe, mesh=mesh, rngs=rngs)


def _smoe(model, hidden_width: int, dropout_rate: float, layer_id: int, mesh, rngs: nnx.Rngs) -> nnx.Module:
  # The sMoE's "experts" are masks over one replicated FFN: nothing to split over a mesh.
  del dropout_rate, mesh
  return SingleMixtureOfExperts(
    model.d_model,
    hidden_width,
    num_masks=model.moe.num_experts,
    keep_rate=model.smoe.keep_rate,
    activation=model.activation,
    # Per token: routing a sequence on its mean would leak later tokens into earlier
    # positions of a causal decoder (see `SingleMixtureOfExperts`).
    per_sequence=False,
    # One mask set per layer, fixed by the layer's position: masks are data, not parameters.
    mask_seed=layer_id,
    selection=model.smoe.selection,
    sample_steps=model.smoe.sample_steps,
    mask_scaling=model.smoe.mask_scaling,
    dtype=model.dtype,
    rngs=rngs,
  )


# (model settings, hidden width, dropout rate, layer id, mesh or None, rngs) -> a module with the
# feed-forward protocol's call. The hidden width is the dense FFN's or the sMoE's shared FFN's;
# the dropout rate is on the dense FFN's hidden units.
FEED_FORWARD_BUILDERS: dict[str, Callable[..., nnx.Module]] = {
  "dense": _dense,
  "moe": _moe,
  "smoe": _smoe,
}
FEED_FORWARDS = tuple(FEED_FORWARD_BUILDERS)


# `model.remat` -> what a rematerialised block keeps for the backward pass (`jax.checkpoint_policies`).
REMAT_POLICIES: dict[str, Callable[..., bool]] = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "save_dots": jax.checkpoint_policies.checkpoint_dots,
  "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMATS = ("none", *REMAT_POLICIES)

# `model.norm` -> the normalisation before each sublayer and at the top of the stack.
NORMS: dict[str, type] = {"layer": nnx.LayerNorm, "rms": nnx.RMSNorm}


@struct.dataclass
class BlockCache:
  """One block's decoding cache: self-attention keys/values so far, and the projected memory (or None)."""

  self_attention: KeyValueCache
  cross_attention: KeyValueCache | None


class ResidualBlock(nnx.Module):
  """The pre-LN block; `__call__` returns (x [B, L, D], MoEAux of its feed-forward layer or None).

  `remat` (`REMATS`): what the backward pass recomputes of the block instead of keeping it.
  """

  def __init__(
    self,
    *,
    d_model: int,
    num_heads: int,
    make_feed_forward: Callable[[], nnx.Module],
    cross_attention: bool = False,
    dropout_rate: float = 0.0,
    attention_dropout_rate: float = 0.0,
    attention_options: dict[str, Any] | None = None,
    norm: str = "layer",
    norm_epsilon: float = 1e-6,
    dtype=jnp.float32,
    remat: str = "none",
    rngs: nnx.Rngs,
  ):
    """`attention_options`: keywords of `MultiHeadAttention` (grouped-query heads, rotary positions,
    q/k norm, biases); `norm` (`NORMS`): "layer" (LayerNorm) or "rms" (RMSNorm), with `norm_epsilon`."""
    if remat not in REMATS:
      raise ValueError(f"remat must be one of {REMATS}, got {remat!r}")
    if norm not in NORMS:
      raise ValueError(f"norm must be one of {tuple(NORMS)}, got {norm!r}")

    def attention():
      return MultiHeadAttention(
        d_model,
        num_heads,
        dropout_rate=attention_dropout_rate,
        dtype=dtype,
        rngs=rngs,
        **(attention_options or {}),
      )

    def normalization():
      # Norms output the compute dtype (flax takes their statistics in float32 whatever it is);
      # left unset they would promote to the float32 of their parameters.
      return NORMS[norm](d_model, epsilon=norm_epsilon, dtype=dtype, rngs=rngs)

    self.attention_norm = normalization()
    self.attention = attention()
    self.has_cross_attention = cross_attention
    if cross_attention:
      self.cross_attention_norm = normalization()
      self.cross_attention = attention()
    self.ffn_norm = normalization()
    # Built last: parameters are drawn in the block's order (attention, then feed-forward), as
    # the blocks before this class drew them, so a seed gives the same model as it did then.
    self.ffn = make_feed_forward()
    self.dropout = nnx.Dropout(dropout_rate)
    self.remat = remat

  def __call__(
    self,
    x_BxLxD: jax.Array,
    mask_Bx1xLxL: jax.Array,
    token_mask_BxL: jax.Array | None = None,
    *,
    memory_BxSxD: jax.Array | None = None,
    cross_mask_Bx1xLxS: jax.Array | None = None,
    positions_BxL: jax.Array | None = None,
    deterministic: bool,
    rngs: nnx.Rngs | None,
    step: jax.Array | int | None = None,
  ) -> tuple[jax.Array, MoEAux | None]:
    """`mask_Bx1xLxL` may broadcast ([1, 1, L, L] causal); `memory_BxSxD` is needed with cross-attention;
    `positions_BxL` are the tokens' positions for rotary self-attention (None: 0, 1, ...)."""
    inputs = (
      x_BxLxD,
      mask_Bx1xLxL,
      token_mask_BxL,
      memory_BxSxD,
      cross_mask_Bx1xLxS,
      positions_BxL,
      rngs,
      step,
    )
    if self.remat == "none":
      return self._forward(*inputs, deterministic)
    # nnx.remat carries the block's state (and `rngs`' counters, the expert bias) in and out of
    # the checkpointed function; `deterministic` (argument 9, counting the block) steers Python
    # control flow, so it stays static.
    forward = nnx.remat(ResidualBlock._forward, policy=REMAT_POLICIES[self.remat], static_argnums=(9,))
    return forward(self, *inputs, deterministic)

  def _forward(
    self,
    x_BxLxD: jax.Array,
    mask_Bx1xLxL: jax.Array,
    token_mask_BxL: jax.Array | None,
    memory_BxSxD: jax.Array | None,
    cross_mask_Bx1xLxS: jax.Array | None,
    positions_BxL: jax.Array | None,
    rngs: nnx.Rngs | None,
    step: jax.Array | int | None,
    deterministic: bool,
  ) -> tuple[jax.Array, MoEAux | None]:
    """`__call__`'s computation, with positional arguments (as `nnx.remat` takes them)."""

    def residual(x, update):
      return x + self.dropout(update, deterministic=deterministic, rngs=rngs)

    normed = self.attention_norm(x_BxLxD)
    attended = self.attention(
      normed, normed, mask_Bx1xLxL, positions_BxQ=positions_BxL, deterministic=deterministic, rngs=rngs
    )
    x_BxLxD = residual(x_BxLxD, attended)
    if self.has_cross_attention:
      normed = self.cross_attention_norm(x_BxLxD)
      attended = self.cross_attention(
        normed, memory_BxSxD, cross_mask_Bx1xLxS, deterministic=deterministic, rngs=rngs
      )
      x_BxLxD = residual(x_BxLxD, attended)
    y, aux = self.ffn(
      self.ffn_norm(x_BxLxD), token_mask_BxL, deterministic=deterministic, rngs=rngs, step=step
    )
    return residual(x_BxLxD, y), aux

  def init_cache(
    self, batch_size: int, max_length: int, dtype, memory_BxSxD: jax.Array | None = None
  ) -> BlockCache:
    """Empty self-attention caches for `max_length` positions; the memory projected once."""
    return BlockCache(
      self_attention=self.attention.empty_cache(batch_size, max_length, dtype),
      cross_attention=(
        self.cross_attention.project_key_value(memory_BxSxD) if self.has_cross_attention else None
      ),
    )

  def prefill(
    self,
    x_BxLxD: jax.Array,
    mask_Bx1xLxL: jax.Array,
    token_mask_BxL: jax.Array | None,
    positions_BxL: jax.Array,
    max_length: int,
  ) -> tuple[jax.Array, BlockCache]:
    """The block over a whole prompt (inference), and its self-attention cache of `max_length` slots
    with the prompt in the first L (a decoder-only block: no cross-attention)."""
    if self.has_cross_attention:
      raise ValueError("prefill is for decoder-only blocks; a cross-attention block uses init_cache")
    normed = self.attention_norm(x_BxLxD)
    key_value = self.attention.project_key_value(normed, positions_BxL)
    x_BxLxD = x_BxLxD + self.attention.attend(
      normed, key_value, mask_Bx1xLxL, positions_BxQ=positions_BxL, deterministic=True, rngs=None
    )
    y, _ = self.ffn(self.ffn_norm(x_BxLxD), token_mask_BxL, deterministic=True, rngs=None, drop_tokens=False)
    free_slots = ((0, 0), (0, max_length - x_BxLxD.shape[1]), (0, 0), (0, 0))
    cache = KeyValueCache(
      jnp.pad(key_value.key_BxKxHxDh, free_slots), jnp.pad(key_value.value_BxKxHxDh, free_slots)
    )
    return x_BxLxD + y, BlockCache(self_attention=cache, cross_attention=None)

  def decode_step(
    self,
    x_Bx1xD: jax.Array,
    cache: BlockCache,
    position,
    cross_mask_Bx1x1xS: jax.Array | None = None,
    *,
    positions_Bx1: jax.Array | None = None,
    key_mask_Bx1x1xK: jax.Array | None = None,
  ) -> tuple[jax.Array, BlockCache]:
    """One position (cache slot `position`) of cached decoding (inference: no dropout, no capacity
    limit). `positions_Bx1` and `key_mask_Bx1x1xK`: see `MultiHeadAttention.decode_step`."""
    attended, self_cache = self.attention.decode_step(
      self.attention_norm(x_Bx1xD),
      cache.self_attention,
      position,
      positions_Bx1=positions_Bx1,
      key_mask_Bx1x1xK=key_mask_Bx1x1xK,
    )
    x_Bx1xD = x_Bx1xD + attended
    if self.has_cross_attention:
      normed = self.cross_attention_norm(x_Bx1xD)
      x_Bx1xD = x_Bx1xD + self.cross_attention.attend(
        normed, cache.cross_attention, cross_mask_Bx1x1xS, deterministic=True, rngs=None
      )
    y, _ = self.ffn(self.ffn_norm(x_Bx1xD), None, deterministic=True, rngs=None, drop_tokens=False)
    return x_Bx1xD + y, BlockCache(self_cache, cache.cross_attention)


def run_stack(layers, x_BxLxD: jax.Array, *args, **kwargs) -> tuple[jax.Array, tuple[MoEAux, ...]]:
  """Each block of `layers` in turn over `x` (the other arguments the same for each): (the last
  block's output, the MoEAux of every block whose feed-forward layer has one, in order)."""
  auxes = []
  for layer in layers:
    x_BxLxD, aux = layer(x_BxLxD, *args, **kwargs)
    if aux is not None:
      auxes.append(aux)
  return x_BxLxD, tuple(auxes)


def build_block(
  model,
  layer_id: int,
  *,
  kind: str,
  hidden_width: int,
  cross_attention: bool = False,
  ffn_dropout_rate: float = 0.0,
  mesh=None,
  rngs: nnx.Rngs,
) -> ResidualBlock:
  """A `ResidualBlock` whose feed-forward layer is `kind` (`FEED_FORWARDS`).

  `model`: the model's settings, with d_model, num_heads, activation, dtype, dropout_rate,
  remat, moe and smoe (and optionally attention_dropout_rate). `layer_id` seeds the sMoE's masks;
  `mesh` places the MoE experts.
  """
  if kind not in FEED_FORWARD_BUILDERS:
    raise ValueError(f"feed-forward kind must be one of {FEED_FORWARDS}, got {kind!r}")
  build = FEED_FORWARD_BUILDERS[kind]
  return ResidualBlock(
    d_model=model.d_model,
    num_heads=model.num_heads,
    make_feed_forward=lambda: build(model, hidden_width, ffn_dropout_rate, layer_id, mesh, rngs),
    cross_attention=cross_attention,
    dropout_rate=model.dropout_rate,
    attention_dropout_rate=getattr(model, "attention_dropout_rate", 0.0),
    # Settings only the decoder LM of Hugging Face families has (`models.causal_lm`).
    attention_options=getattr(model, "attention_options", None),
    norm=getattr(model, "norm", "layer"),
    norm_epsilon=getattr(model, "norm_epsilon", 1e-6),
    dtype=model.dtype,
    remat=model.remat,
    rngs=rngs,
  )


def check_block_settings(model) -> None:
  """The checks every model built of these blocks shares (ConfigError naming the `model.*` field):
  a known activation and remat policy."""
  require(model.activation in ACTIVATIONS, "model.activation", f"must be one of {ACTIVATIONS}")
  require(model.remat in REMATS, "model.remat", f"must be one of {REMATS}, got {model.remat!r}")


def check_stack_settings(model) -> None:
  """`check_block_settings`, and those of the stacks with added position embeddings: heads that
  divide d_model and a known position embedding."""
  require(
    model.d_model % model.num_heads == 0,
    "model.num_heads",
    f"must divide d_model={model.d_model}, got {model.num_heads}",
  )
  require(
    model.position_embedding in POSITION_EMBEDDINGS,
    "model.position_embedding",
    f"must be one of {POSITION_EMBEDDINGS}, got {model.position_embedding!r}",
  )
  check_block_settings(model)


def check_causal_feed_forward(model) -> None:
  """A decoder's MoE layers need a causal router: a token's experts may not depend on later tokens."""
  require(
    model.ffn != "moe" or model.moe.router in CAUSAL_ROUTERS,
    "model.router",
    f"{model.moe.router} is not causal (a token's experts depend on later tokens), so a language "
    f"model cannot use it; use one of {CAUSAL_ROUTERS}",
  )
