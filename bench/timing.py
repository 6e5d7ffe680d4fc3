"""Wall-clock timing shared by the benchmarks: one timed call, and medians taken round-robin.

`bench.moe_layer` keeps its own `Case` class for its JAX layers; these helpers time any
callable, so the same loop also serves PyTorch steps (`bench.vs_pytorch`) and the
Transformer train step (`bench.train_step`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax


def timed(fn: Callable[[], Any]) -> float:
  """Seconds one `fn()` takes, waiting for every JAX array it returns.

  PyTorch on CPU computes eagerly, so its results are ready when `fn` returns.
  """
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def round_robin(
  runners: Mapping[str, Callable[[], float]], repeats: int, *, slow_seconds: float | None = None
) -> dict[str, list[float]]:
  """Times `repeats` runs of each runner (each returns its own seconds), taking them in turn.

  Taking turns lets load from other processes hit every case alike, where timing one
  case after the other would charge a burst of load to whichever case ran then.
  A runner whose first run took over `slow_seconds` is run only once.
  """
  times: dict[str, list[float]] = {name: [] for name in runners}
  for _ in range(repeats):
    for name, run in runners.items():
      if times[name] and slow_seconds is not None and times[name][0] > slow_seconds:
        continue
      times[name].append(run())
  return times


def summarize(times: list[float]) -> dict[str, Any]:
  """`seconds` (median), `min_seconds` (the fastest run: a sign of the noise), `repeats` and every run's `times`."""
  return {
    "seconds": statistics.median(times),
    "min_seconds": min(times),
    "repeats": len(times),
    "times": list(times),
  }
