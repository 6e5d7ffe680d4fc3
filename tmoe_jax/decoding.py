"""Autoregressive decoding (greedy and beam search) that knows nothing of the model.

The model is seen only through a step function (see `DecodeStepFn`): given the
token fed at this step, the decoding cache and the step index, it returns the
logits of the next token and the updated cache. Both decoders run a fixed
number of steps with `jax.lax.scan`, so they trace once and work under
`jax.jit` (everything but the arrays is static).

Shape legend (suffixes on tensor names):
  B  batch size                  W  beam size
  V  vocabulary size             L  max_length (decoded tokens, BOS excluded)
  N  B * W flattened beam rows; row b * W + w is beam w of example b
  2W finished hypotheses concatenated with W new candidates, before pruning
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

# tokens_B int32 [batch], cache (every leaf [batch, ...]), step int32 [] ->
# (logits_BxV [batch, vocab] for the next token, new cache of the same shapes).
DecodeStepFn = Callable[[jax.Array, PyTree, jax.Array], tuple[jax.Array, PyTree]]

# Log-probability of a hypothesis that does not exist. A true -inf (not a large
# finite number) so that such hypotheses stay impossible whatever is added to
# them and can never pass for a real, merely unlikely, sequence.
_NEG_INF = float("-inf")


def _check_positive(**values: int) -> None:
  for name, value in values.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_token_ids(**ids: int) -> None:
  for name, value in ids.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _check_cache(cache: PyTree, rows: int, what: str) -> None:
  """Every leaf must have `rows` as its leading dimension (the row it belongs to)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
    shape = jnp.shape(leaf)
    if not shape or shape[0] != rows:
      raise ValueError(
        f"{what} leaf {jax.tree_util.keystr(path)} has shape {shape}; its leading dimension must be {rows}"
      )


def _check_step_output(logits, new_cache, old_cache, rows: int) -> int:
  """Checks the step function's output against the contract; returns the vocab size.

  `lax.scan` would reject a mismatch too, but with a message about carry types
  that does not point at the step function.
  """
  if logits.ndim != 2 or logits.shape[0] != rows:
    raise ValueError(f"step_fn must return logits of shape [{rows}, vocab], got {logits.shape}")
  old_def = jax.tree.structure(old_cache)
  new_def = jax.tree.structure(new_cache)
  if old_def != new_def:
    raise ValueError(f"step_fn changed the cache structure from {old_def} to {new_def}")
  for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(old_cache), jax.tree.leaves(new_cache)):
    old_type = (jnp.shape(old), jnp.result_type(old))
    new_type = (jnp.shape(new), jnp.result_type(new))
    if old_type != new_type:
      raise ValueError(
        f"step_fn changed cache leaf {jax.tree_util.keystr(path)} from "
        f"{old_type[1]}{list(old_type[0])} to {new_type[1]}{list(new_type[0])}"
      )
  return logits.shape[1]


def greedy_decode(
  step_fn: DecodeStepFn,
  initial_cache: PyTree,
  *,
  batch_size: int,
  max_length: int,
  bos_id: int,
  eos_id: int,
  pad_id: int = 0,
) -> jax.Array:
  """Decodes `max_length` tokens per example, taking the argmax at every step.

  Args:
    step_fn: the model, see `DecodeStepFn`; called exactly `max_length` times
      on [batch_size] tokens.
    initial_cache: pytree whose every leaf is [batch_size, ...], e.g. the
      cross-attention keys/values and empty self-attention caches.
    batch_size, max_length, bos_id, eos_id, pad_id: static ints.

  Returns:
    tokens_BxL int32 [batch_size, max_length], BOS not included. The first EOS
    of a row is kept and every position after it is `pad_id`.
  """
  _check_positive(batch_size=batch_size, max_length=max_length)
  _check_token_ids(bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
  _check_cache(initial_cache, batch_size, "initial_cache")

  def step(carry, step_index):
    tokens_B, done_B, cache = carry
    logits_BxV, new_cache = step_fn(tokens_B, cache, step_index)
    _check_step_output(logits_BxV, new_cache, cache, batch_size)
    next_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    # Rows that already ended keep running (shapes are fixed); they emit padding
    # and are fed it back, which is harmless since their outputs are discarded.
    next_B = jnp.where(done_B, jnp.int32(pad_id), next_B)
    done_B = done_B | (next_B == eos_id)
    return (next_B, done_B, new_cache), next_B

  init = (
    jnp.full((batch_size,), bos_id, jnp.int32),
    jnp.zeros((batch_size,), bool),
    initial_cache,
  )
  _, tokens_LxB = jax.lax.scan(step, init, jnp.arange(max_length, dtype=jnp.int32))
  return tokens_LxB.T


def _length_norm(length, length_penalty: float) -> jax.Array:
  """GNMT length normalisation ((5 + length) / 6) ** alpha (Wu et al., 2016)."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** length_penalty


def beam_search(
  step_fn: DecodeStepFn,
  initial_cache: PyTree,
  *,
  batch_size: int,
  beam_size: int,
  max_length: int,
  bos_id: int,
  eos_id: int,
  pad_id: int = 0,
  length_penalty: float = 0.6,
) -> tuple[jax.Array, jax.Array]:
  """Beam search with separate alive and finished hypotheses (tensor2tensor style).

  Every step extends each of the W alive hypotheses of an example by every
  vocabulary token, in one call of `step_fn` on [batch_size * beam_size] rows.
  The extensions that end with EOS are scored
  `sum(log p) / ((5 + length) / 6) ** length_penalty` (length counts the EOS)
  and merged into the W best finished hypotheses; the W most probable
  extensions that do not end with EOS become the new alive hypotheses, and the
  cache rows are gathered from their parents.

  This selects the same alive set as taking the top 2W candidates and dropping
  the EOS ones (the Flax WMT example): at most W of them end in EOS. It differs
  only in offering the finished set every EOS extension, where the 2W cut can
  drop one that would have been the best finished hypothesis.

  Args:
    step_fn: the model, see `DecodeStepFn`; called exactly `max_length` times
      on [batch_size * beam_size] tokens.
    initial_cache: pytree whose every leaf is [batch_size, ...]. It is repeated
      to [batch_size * beam_size, ...] with the beam index minor.
    batch_size, beam_size, max_length, bos_id, eos_id, pad_id: static ints.
    length_penalty: alpha of the GNMT normalisation; 0 ranks by raw log-prob.

  Returns:
    sequences_BxWxL int32 [batch_size, beam_size, max_length], best first, BOS
      not included; after the EOS come `pad_id`s.
    scores_BxW float32 [batch_size, beam_size], length-normalised log-probs.
    Finished hypotheses rank above unfinished ones; unfinished hypotheses (no
    EOS within max_length, scored with length = max_length) fill the slots that
    finished ones leave empty. A slot that no distinct hypothesis can fill
    (only when the model has fewer than beam_size possible sequences) holds
    `pad_id`s and score -inf.
  """
  _check_positive(batch_size=batch_size, beam_size=beam_size, max_length=max_length)
  _check_token_ids(bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
  _check_cache(initial_cache, batch_size, "initial_cache")
  length_penalty = float(length_penalty)
  B, W, L = batch_size, beam_size, max_length
  N = B * W

  cache_N = jax.tree.map(lambda leaf: jnp.repeat(leaf, W, axis=0), initial_cache)
  # Only beam 0 exists at the start; the other W - 1 copies are impossible, so
  # the first step does not pick the same continuation W times.
  alive_logp_BxW = jnp.full((B, W), _NEG_INF, jnp.float32).at[:, 0].set(0.0)
  alive_seq_BxWxL = jnp.full((B, W, L), pad_id, jnp.int32)
  finished_score_BxW = jnp.full((B, W), _NEG_INF, jnp.float32)
  finished_seq_BxWxL = jnp.full((B, W, L), pad_id, jnp.int32)
  tokens_N = jnp.full((N,), bos_id, jnp.int32)

  def step(carry, step_index):
    (tokens_N, cache_N, alive_logp_BxW, alive_seq_BxWxL, finished_score_BxW, finished_seq_BxWxL) = carry
    logits_NxV, new_cache_N = step_fn(tokens_N, cache_N, step_index)
    V = _check_step_output(logits_NxV, new_cache_N, cache_N, N)
    if eos_id >= V:
      raise ValueError(f"eos_id={eos_id} is outside the vocabulary of size {V}")
    logp_BxWxV = jax.nn.log_softmax(logits_NxV.astype(jnp.float32), axis=-1).reshape(B, W, V)
    candidate_logp_BxWxV = alive_logp_BxW[:, :, None] + logp_BxWxV

    # Finished: every alive hypothesis followed by EOS competes with the best
    # W finished so far, on the length-normalised score.
    eos_score_BxW = candidate_logp_BxWxV[:, :, eos_id] / _length_norm(step_index + 1, length_penalty)
    eos_seq_BxWxL = alive_seq_BxWxL.at[:, :, step_index].set(eos_id)
    merged_score_Bx2W = jnp.concatenate([finished_score_BxW, eos_score_BxW], axis=1)
    merged_seq_Bx2WxL = jnp.concatenate([finished_seq_BxWxL, eos_seq_BxWxL], axis=1)
    finished_score_BxW, keep_BxW = jax.lax.top_k(merged_score_Bx2W, W)
    finished_seq_BxWxL = jnp.take_along_axis(merged_seq_Bx2WxL, keep_BxW[:, :, None], axis=1)

    # Alive: the W most probable continuations that do not end here. Ranked by
    # raw log-prob: they all have the same length, so the norm cannot reorder them.
    continue_logp_BxWV = candidate_logp_BxWxV.at[:, :, eos_id].set(_NEG_INF).reshape(B, W * V)
    alive_logp_BxW, flat_BxW = jax.lax.top_k(continue_logp_BxWV, W)
    parent_BxW = flat_BxW // V
    token_BxW = (flat_BxW % V).astype(jnp.int32)
    alive_seq_BxWxL = (
      jnp.take_along_axis(alive_seq_BxWxL, parent_BxW[:, :, None], axis=1).at[:, :, step_index].set(token_BxW)
    )
    # The cache row of each new hypothesis is its parent's, as updated by this step.
    parent_row_N = (jnp.arange(B)[:, None] * W + parent_BxW).reshape(N)
    cache_N = jax.tree.map(lambda leaf: jnp.take(leaf, parent_row_N, axis=0), new_cache_N)

    return (
      token_BxW.reshape(N),
      cache_N,
      alive_logp_BxW,
      alive_seq_BxWxL,
      finished_score_BxW,
      finished_seq_BxWxL,
    ), None

  init = (tokens_N, cache_N, alive_logp_BxW, alive_seq_BxWxL, finished_score_BxW, finished_seq_BxWxL)
  carry, _ = jax.lax.scan(step, init, jnp.arange(L, dtype=jnp.int32))
  (_, _, alive_logp_BxW, alive_seq_BxWxL, finished_score_BxW, finished_seq_BxWxL) = carry

  # Final ranking: valid finished hypotheses first, then valid unfinished ones
  # (which ran the full max_length), then impossible ones; by score within each.
  alive_score_BxW = alive_logp_BxW / _length_norm(L, length_penalty)
  pool_score_Bx2W = jnp.concatenate([finished_score_BxW, alive_score_BxW], axis=1)
  pool_seq_Bx2WxL = jnp.concatenate([finished_seq_BxWxL, alive_seq_BxWxL], axis=1)
  valid_Bx2W = pool_score_Bx2W > _NEG_INF
  group_Bx2W = jnp.where(
    valid_Bx2W, jnp.concatenate([jnp.zeros((B, W), jnp.int32), jnp.ones((B, W), jnp.int32)], axis=1), 2
  )
  order_Bx2W = jnp.lexsort((-pool_score_Bx2W, group_Bx2W), axis=-1)
  best_BxW = order_Bx2W[:, :W]
  scores_BxW = jnp.take_along_axis(pool_score_Bx2W, best_BxW, axis=1)
  sequences_BxWxL = jnp.take_along_axis(pool_seq_Bx2WxL, best_BxW[:, :, None], axis=1)
  # An impossible slot's tokens are whatever top_k tie-breaking left there.
  sequences_BxWxL = jnp.where((scores_BxW > _NEG_INF)[:, :, None], sequences_BxWxL, jnp.int32(pad_id))
  return sequences_BxWxL, scores_BxW
