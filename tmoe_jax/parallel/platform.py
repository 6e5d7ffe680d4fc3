"""Which backend the code being traced will run on: the local one, or the one a lowering targets.

Kernels with a per-backend implementation (`moe.dropless`'s "auto" method,
`parallel.ragged_exchange`'s "auto" exchange) ask `target_backend()` while they
are traced. It is `jax.default_backend()`, unless the tracing runs inside
`lowering_for(platform)`, which makes a CPU machine trace the GPU or TPU program
(`tasks.lowering` exports it with `jax.export`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

# jax.export platform -> the backend name `jax.default_backend()` gives there.
BACKEND_OF_PLATFORM = {"cuda": "gpu", "rocm": "gpu", "tpu": "tpu", "cpu": "cpu"}
PLATFORMS = tuple(BACKEND_OF_PLATFORM)

_TARGET_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("target_backend", default=None)


def target_backend() -> str:
  """ "cpu", "gpu" or "tpu": the backend the computation being traced is for."""
  return _TARGET_BACKEND.get() or jax.default_backend()


@contextlib.contextmanager
def lowering_for(platform: str) -> Iterator[None]:
  """Inside, `target_backend()` answers for `platform` (a jax.export platform: cuda, rocm, tpu, cpu).

  Trace inside it with a fresh jit: a cached trace keeps the choices it was made with.
  """
  if platform not in BACKEND_OF_PLATFORM:
    raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
  token = _TARGET_BACKEND.set(BACKEND_OF_PLATFORM[platform])
  try:
    yield
  finally:
    _TARGET_BACKEND.reset(token)
