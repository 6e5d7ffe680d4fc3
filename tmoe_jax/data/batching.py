"""Deterministic batching: the batch at a step is a pure function of (seed, step).

Each epoch is a fresh permutation of the examples keyed by (seed, epoch), and
the batches walk the concatenation of those permutations. Resuming at step s
therefore needs nothing but s: no iterator state to checkpoint.
"""

from __future__ import annotations

import functools

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


@functools.lru_cache(maxsize=2)
def _bucketed_epoch(
  lengths_key: bytes, num_examples: int, batch_size: int, seed: int, epoch: int, window: int
):
  lengths = np.frombuffer(lengths_key, dtype=np.int64)
  num_batches = num_examples // batch_size
  permutation = np.random.default_rng([seed, epoch]).permutation(num_examples)[: num_batches * batch_size]
  # Sorting inside windows of `window` batches keeps the epoch shuffled at large scale while
  # putting examples of similar length together, so a batch needs little padding.
  span = window * batch_size
  for start in range(0, len(permutation), span):
    chunk = permutation[start : start + span]
    permutation[start : start + span] = chunk[np.argsort(lengths[chunk], kind="stable")]
  batches = permutation.reshape(num_batches, batch_size)
  return batches[np.random.default_rng([seed, epoch, 1]).permutation(num_batches)]


def length_bucketed_indices(
  lengths_N: np.ndarray, batch_size: int, seed: int, step: int, *, window: int = 50
) -> np.ndarray:
  """int64 [batch_size]: the example ids of batch `step`, grouped by length; a pure function of (seed, step).

  Each epoch is a permutation keyed by (seed, epoch), cut into windows of `window` batches, each
  window sorted by length and cut into batches, whose order is then shuffled (keyed). Every
  example appears at most once per epoch (the remainder of num_examples // batch_size is left
  out of that epoch, a different remainder each epoch).
  """
  lengths_N = np.asarray(lengths_N, dtype=np.int64)
  num_examples = len(lengths_N)
  if num_examples < batch_size:
    raise ValueError(f"length bucketing needs at least batch_size={batch_size} examples, got {num_examples}")
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  num_batches = num_examples // batch_size
  epoch, index = divmod(step, num_batches)
  batches = _bucketed_epoch(lengths_N.tobytes(), num_examples, batch_size, seed, epoch, window)
  return batches[index].copy()
