"""Evaluation on consecutive windows of a token stream, for the character LM and the causal LM.

Windows start at 0, L, 2L, ... so that every token after a window's first is predicted exactly
once; they are read in batches whose last one is padded with repeated rows, which the task's
batch maker marks as counting for nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from tmoe_jax.data import batching, pydoc_corpus
from tmoe_jax.training.state import TrainState

SUMS = ("loss_sum", "correct_tokens", "num_tokens")


def pooled_window_sums(
  eval_sums: Callable,
  state: TrainState,
  ids: np.ndarray,
  length: int,
  batch_size: int,
  num_examples: int | None,
  make_batch: Callable[[np.ndarray, np.ndarray, int, int], dict[str, np.ndarray]],
) -> tuple[int, dict[str, float]]:
  """(windows read, the `SUMS` pooled over them). `eval_sums(params, model_state, batch)` returns
  the sums of one batch; `make_batch(ids, starts, length, num_real_rows)` builds it;
  `num_examples` (None: all) caps the windows read."""
  starts = pydoc_corpus.consecutive_window_starts(len(ids), length)
  count = len(starts) if num_examples is None else min(num_examples, len(starts))
  totals = dict.fromkeys(SUMS, 0.0)
  for indices, num_valid in batching.sequential_batches(count, batch_size):
    batch = make_batch(ids, starts[indices], length, num_valid)
    sums = jax.device_get(eval_sums(state.params, state.model_state, batch))
    for key in SUMS:
      totals[key] += float(sums[key])
  return count, totals
