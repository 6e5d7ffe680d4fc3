"""Deterministic batching: the batch at a step is a pure function of (seed, step).

Each epoch is a fresh permutation of the examples keyed by (seed, epoch), and
the batches walk the concatenation of those permutations. Resuming at step s
therefore needs nothing but s: no iterator state to checkpoint.
"""

from __future__ import annotations

import numpy as np


def example_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """int64 [batch_size]: the example ids of batch `step`; batches may straddle epochs."""
  if num_examples < 1:
    raise ValueError(f"num_examples must be >= 1, got {num_examples}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  start = step * batch_size
  positions = np.arange(start, start + batch_size)
  epochs, offsets = np.divmod(positions, num_examples)
  indices = np.empty(batch_size, dtype=np.int64)
  for epoch in np.unique(epochs):
    permutation = np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
    chosen = epochs == epoch
    indices[chosen] = permutation[offsets[chosen]]
  return indices


def sequential_batches(num_examples: int, batch_size: int):
  """Yields (indices, num_valid) covering every example once, in order, for evaluation.

  The last batch is padded by repeating index 0 so that every batch has the same
  shape (one compilation); `num_valid` says how many rows are real.
  """
  for start in range(0, num_examples, batch_size):
    indices = np.arange(start, min(start + batch_size, num_examples))
    num_valid = len(indices)
    if num_valid < batch_size:
      indices = np.concatenate([indices, np.zeros(batch_size - num_valid, dtype=indices.dtype)])
    yield indices, num_valid
