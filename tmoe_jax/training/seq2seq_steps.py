"""The Transformer-MoE seq2seq model's loss, eval and decode steps (pure, jit-compiled).

Shapes: B batch, S source length, L target length, V vocabulary, E experts.
The train step is the generic `training.steps.train_step` with `seq2seq_loss`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tmoe_jax import decoding
from tmoe_jax.training import steps
from tmoe_jax.transformer import PAD_ID


def token_cross_entropy(logits_BxLxV, targets_BxL, label_smoothing: float = 0.0):
  """(sum of per-token losses over non-padding targets, number of such tokens)."""
  vocab_size = logits_BxLxV.shape[-1]
  labels = jax.nn.one_hot(targets_BxL, vocab_size, dtype=jnp.float32)
  if label_smoothing:
    labels = optax.smooth_labels(labels, label_smoothing)
  loss_BxL = optax.softmax_cross_entropy(logits_BxLxV.astype(jnp.float32), labels)
  weights_BxL = (targets_BxL != PAD_ID).astype(jnp.float32)
  return jnp.sum(loss_BxL * weights_BxL), jnp.sum(weights_BxL)


def seq2seq_loss(model, batch, rngs: nnx.Rngs, step, *, label_smoothing: float = 0.0):
  """The generic step's `loss_fn`: mean token cross-entropy of teacher-forced decoding."""
  del step
  logits, auxes = model(batch["source"], batch["decoder_input"], deterministic=False, rngs=rngs)
  loss_sum, num_tokens = token_cross_entropy(logits, batch["target"], label_smoothing)
  return loss_sum / jnp.maximum(num_tokens, 1.0), {"num_tokens": num_tokens}, auxes


def eval_step(
  params: nnx.State, model_state: nnx.State, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef
):
  """Teacher-forced sums over the batch: loss, correct tokens, token count (to be pooled)."""
  model = nnx.merge(graphdef, params, model_state)
  logits, _ = model(batch["source"], batch["decoder_input"], deterministic=True)
  loss_sum, num_tokens = token_cross_entropy(logits, batch["target"])
  valid = batch["target"] != PAD_ID
  correct = jnp.sum((jnp.argmax(logits, -1) == batch["target"]) & valid)
  return {"loss_sum": loss_sum, "correct_tokens": correct, "num_tokens": num_tokens}


def decode_batch(
  params: nnx.State,
  model_state: nnx.State,
  source_BxS: jax.Array,
  *,
  graphdef: nnx.GraphDef,
  max_length: int,
  beam_size: int,
  bos_id: int,
  eos_id: int,
  length_penalty: float = 0.6,
) -> jax.Array:
  """Decodes [B, S] sources to int32 [B, max_length] tokens: greedy if beam_size == 1, else the best beam."""
  model = nnx.merge(graphdef, params, model_state)
  encoded_BxSxD, _ = model.encode(source_BxS)
  cache = model.init_decode_cache(encoded_BxSxD, source_BxS, max_length)
  common = dict(
    batch_size=source_BxS.shape[0], max_length=max_length, bos_id=bos_id, eos_id=eos_id, pad_id=PAD_ID
  )
  if beam_size == 1:
    return decoding.greedy_decode(model.decode_step, cache, **common)
  sequences, _ = decoding.beam_search(
    model.decode_step, cache, beam_size=beam_size, length_penalty=length_penalty, **common
  )
  return sequences[:, 0]


def jit_train_step(
  graphdef, optimizer, schedule, loss_weights, *, label_smoothing=0.0, state_shardings=None, mesh=None
):
  """`training.steps.jit_train_step` with the seq2seq loss."""
  loss_fn = functools.partial(seq2seq_loss, label_smoothing=label_smoothing)
  return steps.jit_train_step(
    graphdef, optimizer, schedule, loss_weights, loss_fn, state_shardings=state_shardings, mesh=mesh
  )


def jit_eval_step(graphdef):
  return jax.jit(functools.partial(eval_step, graphdef=graphdef))


def jit_decode(graphdef, *, max_length, beam_size, bos_id, eos_id, length_penalty=0.6):
  return jax.jit(
    functools.partial(
      decode_batch,
      graphdef=graphdef,
      max_length=max_length,
      beam_size=beam_size,
      bos_id=bos_id,
      eos_id=eos_id,
      length_penalty=length_penalty,
    )
  )
