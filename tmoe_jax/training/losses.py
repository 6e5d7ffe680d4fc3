"""The task losses every experiment shares: token cross-entropy and class negative log-likelihood.

Shapes: B batch, L length, V vocabulary, C classes. Token id 0 is padding and
never counts (every vocabulary of `tmoe_jax.data` reserves it). The MoE
auxiliary losses (balancing, router z) are routing math and live in
`moe.losses`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from tmoe_jax.embeddings import PAD_ID


def token_cross_entropy(
  logits_BxLxV: jax.Array,
  targets_BxL: jax.Array,
  label_smoothing: float = 0.0,
  valid_BxL: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """(sum of per-token losses over the valid targets, number of such tokens).

  `valid_BxL` (None: every target but PAD_ID) marks the targets that count; vocabularies from
  elsewhere (a Hugging Face tokenizer) may use id 0 for a real token.
  """
  vocab_size = logits_BxLxV.shape[-1]
  labels = jax.nn.one_hot(targets_BxL, vocab_size, dtype=jnp.float32)
  if label_smoothing:
    labels = optax.smooth_labels(labels, label_smoothing)
  loss_BxL = optax.softmax_cross_entropy(logits_BxLxV.astype(jnp.float32), labels)
  weights_BxL = (targets_BxL != PAD_ID if valid_BxL is None else valid_BxL).astype(jnp.float32)
  return jnp.sum(loss_BxL * weights_BxL), jnp.sum(weights_BxL)


def token_prediction_sums(
  logits_BxLxV: jax.Array, targets_BxL: jax.Array, valid_BxL: jax.Array | None = None
) -> dict[str, jax.Array]:
  """Sums to pool over evaluation batches: cross-entropy, correct argmax predictions, tokens.

  Padding targets (or those `valid_BxL` excludes) add nothing, so padded rows and positions can
  be evaluated freely.
  """
  loss_sum, num_tokens = token_cross_entropy(logits_BxLxV, targets_BxL, valid_BxL=valid_BxL)
  valid_BxL = targets_BxL != PAD_ID if valid_BxL is None else valid_BxL.astype(bool)
  correct = jnp.sum((jnp.argmax(logits_BxLxV, -1) == targets_BxL) & valid_BxL)
  return {"loss_sum": loss_sum, "correct_tokens": correct, "num_tokens": num_tokens}


def classification_loss(
  log_probs_BxC: jax.Array, labels_B: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean negative log-likelihood of the labels and the batch accuracy."""
  nll = -jnp.mean(jnp.take_along_axis(log_probs_BxC, labels_B[:, None], axis=1))
  accuracy = jnp.mean((jnp.argmax(log_probs_BxC, axis=1) == labels_B).astype(jnp.float32))
  return nll, {"accuracy": accuracy}
