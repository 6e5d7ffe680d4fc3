"""Pure, jit-compiled train / eval / decode steps of the Transformer-MoE seq2seq model.

Shapes: B batch, S source length, L target length, V vocabulary, E experts.
Each step is a function of explicit inputs: (graphdef static) + TrainState +
batch -> new TrainState + metrics. Nothing is read from or written to a module
behind the caller's back.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tmoe_jax import decoding
from tmoe_jax.moe.statistics import MoEAux
from tmoe_jax.parallel import sharding
from tmoe_jax.training.state import TrainState
from tmoe_jax.transformer import PAD_ID


@dataclasses.dataclass(frozen=True)
class LossWeights:
  label_smoothing: float = 0.0
  load_balancing: float = 1e-2
  router_z: float = 1e-3


def token_cross_entropy(logits_BxLxV, targets_BxL, label_smoothing: float = 0.0):
  """(sum of per-token losses over non-padding targets, number of such tokens)."""
  vocab_size = logits_BxLxV.shape[-1]
  labels = jax.nn.one_hot(targets_BxL, vocab_size, dtype=jnp.float32)
  if label_smoothing:
    labels = optax.smooth_labels(labels, label_smoothing)
  loss_BxL = optax.softmax_cross_entropy(logits_BxLxV.astype(jnp.float32), labels)
  weights_BxL = (targets_BxL != PAD_ID).astype(jnp.float32)
  return jnp.sum(loss_BxL * weights_BxL), jnp.sum(weights_BxL)


def moe_losses(auxes: tuple[MoEAux, ...]) -> tuple[jax.Array, jax.Array]:
  """Mean over MoE layers of the load-balancing and z losses (0 when the model has none)."""
  if not auxes:
    return jnp.zeros(()), jnp.zeros(())
  balance = jnp.mean(jnp.stack([aux.load_balancing_loss for aux in auxes]))
  z = jnp.mean(jnp.stack([aux.router_z_loss for aux in auxes]))
  return balance, z


def routing_metrics(auxes: tuple[MoEAux, ...]) -> dict[str, jax.Array]:
  """Per MoE layer (in encoder-then-decoder order): expert load, drops, router entropy."""
  if not auxes:
    return {}
  return {
    "expert_fraction": jnp.stack([aux.expert_fraction_E for aux in auxes]),
    "dropped_fraction": jnp.stack([aux.dropped_fraction for aux in auxes]),
    "router_entropy": jnp.stack([aux.router_entropy for aux in auxes]),
  }


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  graphdef: nnx.GraphDef,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule,
  loss_weights: LossWeights,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update; returns the new state and float metrics of this batch."""
  rng, dropout_key = jax.random.split(state.rng)

  def loss_fn(params):
    # copy=True: fresh Variables at this trace level, so the forward pass may update
    # non-parameter state (e.g. the expert bias) inside the differentiated function.
    model = nnx.merge(graphdef, params, state.model_state, copy=True)
    logits, auxes = model(
      batch["source"], batch["decoder_input"], deterministic=False, rngs=nnx.Rngs(dropout=dropout_key)
    )
    loss_sum, num_tokens = token_cross_entropy(logits, batch["target"], loss_weights.label_smoothing)
    task_loss = loss_sum / jnp.maximum(num_tokens, 1.0)
    balance, z = moe_losses(auxes)
    aux_loss = loss_weights.load_balancing * balance + loss_weights.router_z * z
    metrics = {
      "loss": task_loss,
      "aux_loss": aux_loss,
      "load_balancing_loss": balance,
      "router_z_loss": z,
      "num_tokens": num_tokens,
      **routing_metrics(auxes),
    }
    # Non-parameter variables the forward pass updated (outside the gradient).
    return task_loss + aux_loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

  grads, (metrics, model_state) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["learning_rate"] = schedule(state.step)
  new_state = TrainState(
    step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state, rng=rng
  )
  # Checked on device so the host reads one flag per step; it covers the optimizer
  # moments too, which can overflow while the parameters do not.
  metrics["is_finite"] = all_finite((metrics["loss"], metrics["aux_loss"], metrics["grad_norm"], new_state))
  return new_state, metrics


def all_finite(tree) -> jax.Array:
  """bool scalar: every floating-point leaf of `tree` is finite (integer leaves cannot overflow)."""
  flags = [
    jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


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


def jit_train_step(graphdef, optimizer, schedule, loss_weights, *, state_shardings=None, mesh=None):
  """`state_shardings` (`parallel.sharding.train_state_shardings`) and `mesh` pin the layout:
  the state keeps its shardings step after step and the batch is split over every device."""
  step = functools.partial(
    train_step, graphdef=graphdef, optimizer=optimizer, schedule=schedule, loss_weights=loss_weights
  )
  # The state is donated: its buffers are reused for the new state, halving peak memory.
  if state_shardings is None:
    return jax.jit(step, donate_argnums=0)
  return jax.jit(
    step,
    donate_argnums=0,
    in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
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
