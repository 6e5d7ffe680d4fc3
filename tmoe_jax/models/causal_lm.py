"""The decoder-only MoE language model of the Mixtral / Qwen-MoE / OLMoE kind.

Shapes: B batch, L length, P prompt length, D d_model, V vocabulary, S cache slots.

Each layer is the one `blocks.ResidualBlock` with RMSNorm, rotary grouped-query
self-attention (optional q/k norm, optional q/k/v biases) and, as its feed-forward layer
(`model.ffn`), a dense SwiGLU FFN, the top-k `moe.layer.MoEFeedForward` (SwiGLU experts,
dropless by default, optionally shared experts with a sigmoid gate) or the sMoE. Every MoE
setting of `MoEConfig` applies, expert parallelism included; the routing conventions of
each Hugging Face family are settings too (`hf.families`): softmax over all experts, top-k,
gates renormalised (`model.normalize_gates`) or not.

Tokens are not scaled by sqrt(D) and there are no position embeddings: positions enter only
through the rotation of queries and keys, so a left-padded batch just gives each row its own
positions (`positions_of`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from tmoe_jax.attention import QK_NORMS, causal_mask
from tmoe_jax.models.blocks import (
  FEED_FORWARDS,
  BlockCache,
  build_block,
  check_block_settings,
  check_causal_feed_forward,
  run_stack,
)
from tmoe_jax.moe.settings import HoldsMoESettings, MoEConfig, SMoEConfig
from tmoe_jax.moe.statistics import MoEAux
from tmoe_jax.validation import require


@dataclasses.dataclass(frozen=True)
class CausalLMConfig(HoldsMoESettings):
  """Settings of `CausalLM`, from the flat `model` config section.

  `d_ff` is the hidden width of each expert (ffn "moe"), of the dense FFN ("dense") or of
  the sMoE's shared FFN ("smoe"). `head_size` 0 means d_model / num_heads. `moe` holds
  every top-k MoE setting; its shape is this model's.
  """

  vocab_size: int
  d_model: int = 64
  num_heads: int = 4
  num_kv_heads: int = 4
  head_size: int = 0
  num_layers: int = 2
  d_ff: int = 128
  ffn: str = "moe"
  activation: str = "silu"
  rotary_base: float = 10000.0
  qk_norm: str = "none"
  qkv_bias: bool = False
  norm_epsilon: float = 1e-6
  tie_embeddings: bool = False
  max_length: int = 2048
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: str = "none"
  moe: MoEConfig | None = None
  smoe: SMoEConfig | None = None

  # The LLaMA-family expert: SwiGLU, every assignment computed (no capacity), Mixtral's gates.
  MOE_DEFAULTS: ClassVar[dict[str, Any]] = {
    "num_experts": 8,
    "top_k": 2,
    "expert_type": "gated",
    "dispatch": "dropless",
    "sequences_per_group": 0,
  }
  # The norm of every block (`blocks.NORMS`): this model's is RMSNorm.
  norm: ClassVar[str] = "rms"

  def __post_init__(self):
    moe = self.moe or MoEConfig(**self.MOE_DEFAULTS)
    shape = {"d_model": self.d_model, "d_ff": self.d_ff, "activation": self.activation, "dtype": self.dtype}
    object.__setattr__(self, "moe", dataclasses.replace(moe, **shape))
    object.__setattr__(self, "smoe", self.smoe or SMoEConfig(**self.SMOE_DEFAULTS))
    for name in ("vocab_size", "d_model", "num_heads", "num_kv_heads", "num_layers", "d_ff", "max_length"):
      require(getattr(self, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
    require(self.ffn in FEED_FORWARDS, "model.ffn", f"must be one of {FEED_FORWARDS}, got {self.ffn!r}")
    require(
      self.num_heads % self.num_kv_heads == 0,
      "model.num_kv_heads",
      f"must divide num_heads={self.num_heads}, got {self.num_kv_heads}",
    )
    require(
      self.head_size > 0 or self.d_model % self.num_heads == 0,
      "model.num_heads",
      f"must divide d_model={self.d_model} when head_size is 0, got {self.num_heads}",
    )
    require(self.head_size >= 0, "model.head_size", f"must be >= 0, got {self.head_size}")
    require(self.attention_head_size % 2 == 0, "model.head_size", "rotary positions need an even head size")
    require(self.qk_norm in QK_NORMS, "model.qk_norm", f"must be one of {QK_NORMS}, got {self.qk_norm!r}")
    require(self.rotary_base > 0, "model.rotary_base", f"must be > 0, got {self.rotary_base}")
    require(self.norm_epsilon > 0, "model.norm_epsilon", f"must be > 0, got {self.norm_epsilon}")
    require(
      0.0 <= self.dropout_rate < 1.0, "model.dropout_rate", f"must be in [0, 1), got {self.dropout_rate}"
    )
    check_block_settings(self)
    check_causal_feed_forward(self)

  @property
  def attention_head_size(self) -> int:
    return self.head_size or self.d_model // self.num_heads

  @property
  def attention_options(self) -> dict[str, Any]:
    """`MultiHeadAttention`'s keywords for this model's attention (`blocks.build_block` reads them)."""
    return {
      "num_kv_heads": self.num_kv_heads,
      "head_size": self.attention_head_size,
      "qkv_bias": self.qkv_bias,
      "output_bias": False,
      "rotary_base": self.rotary_base,
      "qk_norm": self.qk_norm,
      "norm_epsilon": self.norm_epsilon,
    }


def positions_of(token_mask_BxL: jax.Array) -> jax.Array:
  """int32 [B, L]: each real token's position counted from its row's first real token (pads: 0).

  With left padding a row's tokens start after its pads; this is what Hugging Face computes
  from the attention mask, so a padded row decodes as it would alone.
  """
  mask = token_mask_BxL.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


class CausalLM(nnx.Module):
  """`__call__(tokens [B, L])` -> (next-token logits [B, L, V] float32, MoEAux per MoE layer)."""

  def __init__(self, config: CausalLMConfig, *, mesh=None, rngs: nnx.Rngs):
    """`mesh`: a ('data', 'fsdp', 'expert') mesh to run the MoE layers expert-parallel; None = one device."""
    self.config = config
    self.embedding = nnx.Embed(
      config.vocab_size,
      config.d_model,
      embedding_init=nnx.initializers.normal(0.02),
      dtype=config.dtype,
      rngs=rngs,
    )
    self.layers = nnx.List(
      [
        build_block(config, i, kind=config.ffn, hidden_width=config.d_ff, mesh=mesh, rngs=rngs)
        for i in range(config.num_layers)
      ]
    )
    self.final_norm = nnx.RMSNorm(config.d_model, epsilon=config.norm_epsilon, dtype=config.dtype, rngs=rngs)
    if not config.tie_embeddings:
      self.output = nnx.Linear(
        config.d_model,
        config.vocab_size,
        use_bias=False,
        kernel_init=nnx.initializers.normal(0.02),
        dtype=config.dtype,
        rngs=rngs,
      )

  def logits(self, x_BxLxD: jax.Array) -> jax.Array:
    """float32 [B, L, V] of the last layer's output."""
    x_BxLxD = self.final_norm(x_BxLxD)
    logits = self.embedding.attend(x_BxLxD) if self.config.tie_embeddings else self.output(x_BxLxD)
    return logits.astype(jnp.float32)

  def __call__(
    self,
    tokens_BxL: jax.Array,
    token_mask_BxL: jax.Array | None = None,
    *,
    deterministic: bool = True,
    rngs: nnx.Rngs | None = None,
    step: jax.Array | int | None = None,
  ) -> tuple[jax.Array, tuple[MoEAux, ...]]:
    """`token_mask_BxL` (None: every token real) marks real tokens; padding is hidden from attention
    and from the experts. `step` drives the sMoE's sampling schedule in training."""
    x, mask, positions = self._inputs(tokens_BxL, token_mask_BxL)
    x, auxes = run_stack(
      self.layers,
      x,
      mask,
      token_mask_BxL,
      positions_BxL=positions,
      deterministic=deterministic,
      rngs=rngs,
      step=step,
    )
    return self.logits(x), auxes

  def _inputs(self, tokens_BxL, token_mask_BxL):
    """(embedded tokens, attention mask [B|1, 1, L, L], positions [B, L])."""
    length = tokens_BxL.shape[1]
    mask = causal_mask(length)
    if token_mask_BxL is None:
      positions = jnp.broadcast_to(jnp.arange(length)[None], tokens_BxL.shape)
    else:
      mask = mask & token_mask_BxL.astype(bool)[:, None, None, :]
      positions = positions_of(token_mask_BxL)
    return self.embedding(tokens_BxL), mask, positions

  def prefill(
    self, tokens_BxP: jax.Array, token_mask_BxP: jax.Array, max_length: int
  ) -> tuple[jax.Array, tuple[BlockCache, ...]]:
    """Runs the prompts once: (logits of their last slot [B, V], caches with S = `max_length` slots).

    Prompts are left-padded, so every row's last prompt token is in slot P - 1 and decoding
    continues from slot P for the whole batch.
    """
    x, mask, positions = self._inputs(tokens_BxP, token_mask_BxP)
    caches = []
    for layer in self.layers:
      x, cache = layer.prefill(x, mask, token_mask_BxP, positions, max_length)
      caches.append(cache)
    return self.logits(x[:, -1:])[:, 0], tuple(caches)

  def decode_step(
    self,
    tokens_Bx1: jax.Array,
    caches: tuple[BlockCache, ...],
    slot: jax.Array,
    positions_Bx1: jax.Array,
    key_mask_BxS: jax.Array,
  ) -> tuple[jax.Array, tuple[BlockCache, ...]]:
    """The next-token logits [B, V] after the token written to cache `slot`; `key_mask_BxS` marks the
    slots that hold tokens (not padding)."""
    x = self.embedding(tokens_Bx1)
    key_mask = key_mask_BxS[:, None, None, :]
    new_caches = []
    for layer, cache in zip(self.layers, caches, strict=True):
      x, cache = layer.decode_step(x, cache, slot, positions_Bx1=positions_Bx1, key_mask_Bx1x1xK=key_mask)
      new_caches.append(cache)
    return self.logits(x)[:, 0], tuple(new_caches)
