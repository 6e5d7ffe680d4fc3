"""The dropless grouped expert kernel for GPU/TPU: `jax.lax.ragged_dot` for every matmul.

Shapes: A sorted rows, D model width, F expert hidden width, E experts.

XLA lowers `ragged_dot` to a grouped kernel on GPU and TPU. XLA:CPU instead runs
every expert on every row and masks (E times the FLOPs), so `dropless` picks the
block loop there; bench/RESULTS.md has the timings.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from tmoe_jax.moe.experts import EXPERT_REGISTRY

Activation = Callable[[jax.Array], jax.Array]


def ragged_dot_experts(x_AxD, group_sizes_E, weights, expert_type, activation):
  w_in, b_in, w_out_ExFxD, b_out_ExD = EXPERT_REGISTRY[expert_type].parts(weights)
  num_rows = x_AxD.shape[0]
  num_experts = w_out_ExFxD.shape[0]
  ends_E = jnp.cumsum(group_sizes_E)
  # Expert of each row; E (no expert, zero bias, zero output) past the last group.
  expert_A = jnp.searchsorted(ends_E, lax.iota(jnp.int32, num_rows), side="right")

  def project(x_AxN, w_ExNxM, b_ExM):
    y_AxM = lax.ragged_dot(x_AxN, w_ExNxM, group_sizes_E)
    if b_ExM is None:
      return y_AxM
    return y_AxM + jnp.take(b_ExM, expert_A, axis=0, mode="fill", fill_value=0)

  hidden_AxF = EXPERT_REGISTRY[expert_type].hidden(activation)(
    *(project(x_AxD, w, b) for w, b in zip(w_in, b_in))
  )
  y_AxD = project(hidden_AxF.astype(w_out_ExFxD.dtype), w_out_ExFxD, b_out_ExD)
  return jnp.where((expert_A < num_experts)[:, None], y_AxD, 0)


# ---------------------------------------------------------------------------
# Public API.
