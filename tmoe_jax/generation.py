"""Text generation with a KV cache for `models.causal_lm.CausalLM`: greedy, temperature, top-k, top-p.

Shapes: B batch, P (padded) prompt length, N new tokens, V vocabulary, S = P + N cache slots.

Prompts of different lengths are left-padded (`left_pad`), so every row's next token goes to
the same cache slot; each row keeps its own positions (`causal_lm.positions_of`), so a row
decodes exactly as it would alone. The prompt runs once (`CausalLM.prefill`), then one
`decode_step` per new token inside one `jax.lax.scan`, all under one `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen. temperature 0: greedy (argmax). Otherwise a draw from
  softmax(logits / temperature) restricted to the `top_k` likeliest tokens (0: all) and to the
  smallest set of likeliest tokens whose probabilities reach `top_p` (1.0: all)."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [B, P], real-token mask bool [B, P]) with each prompt right-aligned."""
  if not prompts or any(len(prompt) == 0 for prompt in prompts):
    raise ValueError("every prompt needs at least one token")
  length = max(len(prompt) for prompt in prompts)
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for row, prompt in enumerate(prompts):
    tokens[row, length - len(prompt) :] = prompt
    mask[row, length - len(prompt) :] = True
  return tokens, mask


def restrict_logits(logits_BxV: jax.Array, *, top_k: int, top_p: float) -> jax.Array:
  """float32 logits with every token outside the top-k / top-p set at -inf."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  if top_k:
    kth_best_Bx1 = jax.lax.top_k(logits_BxV, min(top_k, logits_BxV.shape[-1]))[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_best_Bx1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    order_BxV = jnp.argsort(-logits_BxV, axis=-1)
    sorted_BxV = jnp.take_along_axis(logits_BxV, order_BxV, axis=-1)
    # A token stays if the likelier tokens before it have not yet reached top_p (the best always does).
    before_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1) - jax.nn.softmax(
      sorted_BxV, axis=-1
    )
    keep_sorted_BxV = before_BxV < top_p
    keep_BxV = (
      jnp.zeros_like(keep_sorted_BxV)
      .at[jnp.arange(logits_BxV.shape[0])[:, None], order_BxV]
      .set(keep_sorted_BxV)
    )
    logits_BxV = jnp.where(keep_BxV, logits_BxV, -jnp.inf)
  return logits_BxV


def choose_next(logits_BxV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """int32 [B]: the next token of each row."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  restricted = restrict_logits(logits_BxV / sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
  return jax.random.categorical(key, restricted, axis=-1).astype(jnp.int32)


def generate(
  model,
  tokens_BxP,
  token_mask_BxP,
  *,
  max_new_tokens: int,
  sampling: Sampling = Sampling(),
  eos_id: int | None = None,
  pad_id: int = 0,
  seed: int = 0,
) -> np.ndarray:
  """int32 [B, N]: `max_new_tokens` new tokens per left-padded prompt row; after a row's `eos_id`
  (which is kept) the row is `pad_id`."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if tokens_BxP.shape[1] + max_new_tokens > model.config.max_length:
    raise ValueError(
      f"prompt ({tokens_BxP.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
      f"max_length {model.config.max_length}"
    )
  graphdef, state = nnx.split(model)
  new_tokens = _generate(
    graphdef,
    state,
    jnp.asarray(tokens_BxP, jnp.int32),
    jnp.asarray(token_mask_BxP, bool),
    jax.random.key(seed),
    max_new_tokens=max_new_tokens,
    sampling=sampling,
    eos_id=eos_id,
    pad_id=pad_id,
  )
  return np.asarray(new_tokens)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "eos_id", "pad_id"))
def _generate(graphdef, state, tokens_BxP, token_mask_BxP, key, *, max_new_tokens, sampling, eos_id, pad_id):
  model = nnx.merge(graphdef, state)
  batch, prompt_length = tokens_BxP.shape
  num_slots = prompt_length + max_new_tokens
  logits_BxV, caches = model.prefill(tokens_BxP, token_mask_BxP, num_slots)
  key_mask_BxS = jnp.concatenate([token_mask_BxP, jnp.ones((batch, max_new_tokens), bool)], axis=1)
  prompt_lengths_B = jnp.sum(token_mask_BxP, axis=1).astype(jnp.int32)

  def emit(logits_BxV, key, done_B):
    token_B = choose_next(logits_BxV, key, sampling)
    token_B = jnp.where(done_B, pad_id, token_B)
    if eos_id is not None:
      done_B = done_B | (token_B == eos_id)
    return token_B, done_B

  first_key, key = jax.random.split(key)
  first_B, done_B = emit(logits_BxV, first_key, jnp.zeros((batch,), bool))

  def step(carry, index):
    caches, token_B, done_B, key = carry
    key, draw_key = jax.random.split(key)
    positions_Bx1 = (prompt_lengths_B + index)[:, None]
    logits_BxV, caches = model.decode_step(
      token_B[:, None], caches, prompt_length + index, positions_Bx1, key_mask_BxS
    )
    token_B, done_B = emit(logits_BxV, draw_key, done_B)
    return (caches, token_B, done_B, key), token_B

  _, rest_NxB = jax.lax.scan(step, (caches, first_B, done_B, key), jnp.arange(max_new_tokens - 1))
  return jnp.concatenate([first_B[:, None], rest_NxB.T], axis=1)


def generate_texts(
  model,
  tokenizer,
  prompts: Sequence[str] | Sequence[Sequence[int]],
  max_new_tokens: int,
  *,
  sampling: Sampling = Sampling(),
  eos_id: int | None = None,
  pad_id: int = 0,
  seed: int = 0,
) -> list[str] | list[list[int]]:
  """`generate` for a list of prompts: texts (encoded with `tokenizer`, a `tokenizers.Tokenizer`) give
  texts, token-id lists give id lists; each continuation stops before its `eos_id`."""
  prompts = list(prompts)
  as_text = all(isinstance(prompt, str) for prompt in prompts)
  if as_text and tokenizer is None:
    raise ValueError("text prompts need a tokenizer; pass token ids instead")
  ids = (
    [tokenizer.encode(prompt).ids for prompt in prompts] if as_text else [list(map(int, p)) for p in prompts]
  )
  tokens, mask = left_pad(ids, pad_id)
  new = generate(
    model,
    tokens,
    mask,
    max_new_tokens=max_new_tokens,
    sampling=sampling,
    eos_id=eos_id,
    pad_id=pad_id,
    seed=seed,
  )
  rows = [row[: row.index(eos_id)] if eos_id in row else row for row in new.tolist()]
  return [tokenizer.decode(row) for row in rows] if as_text else rows
