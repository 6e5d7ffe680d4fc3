"""The dropless exchange: the padded stand-in for ragged_all_to_all, the plan, the round trip.

References: the example and the send/receive pseudocode in `jax.lax.ragged_all_to_all`'s
docstring, written out in NumPy; a per-row loop for the round trip through the experts.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tmoe_jax.moe.expert_parallel import expert_parallel_moe
from tmoe_jax.parallel import ragged_exchange
from tmoe_jax.parallel.mesh import make_mesh

AXIS = "expert"


def per_device(fn, num_devices, *args):
  """Runs fn on per-device slices [num_devices, ...] of each arg under shard_map over AXIS."""
  mesh = jax.make_mesh((num_devices,), (AXIS,), devices=jax.devices()[:num_devices])
  sharded = [jax.device_put(a, NamedSharding(mesh, P(AXIS))) for a in args]
  mapped = jax.shard_map(
    lambda *local: jax.tree.map(lambda y: y[None], fn(*(a[0] for a in local))),
    mesh=mesh,
    in_specs=P(AXIS),
    out_specs=P(AXIS),
  )
  return jax.tree.map(np.asarray, jax.jit(mapped)(*sharded))


def test_padded_exchange_reproduces_the_ragged_all_to_all_docstring_example():
  operand = jnp.array([[1, 2, 2], [3, 4, 0]], jnp.float32)
  output = jnp.zeros((2, 4), jnp.float32)
  input_offsets = jnp.array([[0, 1], [0, 1]], jnp.int32)
  send_sizes = jnp.array([[1, 2], [1, 1]], jnp.int32)
  output_offsets = jnp.array([[0, 0], [1, 2]], jnp.int32)
  recv_sizes = jnp.array([[1, 1], [2, 1]], jnp.int32)
  result = per_device(
    lambda *a: ragged_exchange.padded_ragged_all_to_all(*a, axis_name=AXIS, max_rows=2),
    2,
    operand,
    output,
    input_offsets,
    send_sizes,
    output_offsets,
    recv_sizes,
  )
  np.testing.assert_array_equal(result, [[1, 3, 0, 0], [2, 2, 4, 0]])


def reference_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
  """The docstring's pseudocode over all devices at once (NumPy, one slice per peer)."""
  num_devices = operand.shape[0]
  result = np.array(output)
  for sender in range(num_devices):
    for receiver in range(num_devices):
      start, size = input_offsets[sender, receiver], send_sizes[sender, receiver]
      assert size == recv_sizes[receiver, sender]
      at = output_offsets[sender, receiver]
      result[receiver, at : at + size] = operand[sender, start : start + size]
  return result


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_padded_exchange_matches_the_documented_semantics_on_random_slices(seed):
  rng = np.random.default_rng(seed)
  devices, rows, width, max_rows = 4, 12, 3, 5
  send_sizes = rng.integers(0, max_rows + 1, (devices, devices)).astype(np.int32)
  input_offsets = np.stack([rng.integers(0, rows - s + 1) for s in send_sizes.reshape(-1)]).reshape(
    devices, -1
  )
  recv_sizes = send_sizes.T.copy()
  # Each receiver packs its senders' slices back to back, in a shuffled sender order.
  output_offsets = np.zeros_like(send_sizes)
  for receiver in range(devices):
    order = rng.permutation(devices)
    starts = np.cumsum(np.r_[0, recv_sizes[receiver, order]])[:-1]
    output_offsets[order, receiver] = starts + 1  # one row of headroom at the front
  output_rows = 1 + devices * max_rows
  operand = rng.normal(size=(devices, rows, width)).astype(np.float32)
  output = np.full((devices, output_rows, width), -7.0, np.float32)  # untouched rows keep it
  args = (operand, output, input_offsets.astype(np.int32), send_sizes, output_offsets, recv_sizes)
  result = per_device(
    lambda *a: ragged_exchange.padded_ragged_all_to_all(*a, axis_name=AXIS, max_rows=max_rows),
    devices,
    *map(jnp.asarray, args),
  )
  np.testing.assert_array_equal(np.asarray(result), reference_ragged_all_to_all(*args))


def test_plan_offsets_follow_from_the_counts():
  rng = np.random.default_rng(3)
  devices, experts_per_device = 4, 2
  counts = rng.integers(0, 6, (devices, devices * experts_per_device)).astype(np.int32)
  plan = per_device(
    lambda c: ragged_exchange.plan_exchange(c, axis_name=AXIS, axis_size=devices),
    devices,
    jnp.asarray(counts),
  )
  for me in range(devices):
    mine = counts[me].reshape(devices, experts_per_device)
    np.testing.assert_array_equal(plan.send_sizes_X[me], mine.sum(1))
    np.testing.assert_array_equal(plan.input_offsets_X[me], np.cumsum(mine.sum(1)) - mine.sum(1))
    received = counts[:, me * experts_per_device : (me + 1) * experts_per_device]
    np.testing.assert_array_equal(plan.recv_counts_XxL[me], received)
    np.testing.assert_array_equal(plan.recv_offsets_X[me], np.cumsum(received.sum(1)) - received.sum(1))
    for peer in range(devices):
      # My slice lands at the peer after the slices of the senders before me.
      peer_received = counts[:, peer * experts_per_device : (peer + 1) * experts_per_device].sum(1)
      assert plan.output_offsets_X[me, peer] == peer_received[:me].sum()
      peer_sent = counts[peer].reshape(devices, experts_per_device).sum(1)
      assert plan.return_offsets_X[me, peer] == peer_sent[:me].sum()


def test_round_trip_runs_every_row_through_its_own_expert():
  """Expert e multiplies by (e + 1): each row must come back scaled by its own expert's factor."""
  devices, experts, tokens, top_k, width = 4, 8, 6, 2, 3
  experts_per_device = experts // devices
  rng = np.random.default_rng(4)
  # Sorted rows: each device's assignments sorted by expert, some left unsent at the end.
  expert_rows = [np.sort(rng.integers(0, experts, tokens * top_k - 2)) for _ in range(devices)]
  counts = np.stack([np.bincount(e, minlength=experts) for e in expert_rows]).astype(np.int32)
  x = rng.normal(size=(devices, tokens * top_k, width)).astype(np.float32)

  def run_local(rows_RxD, group_sizes_L):
    me = jax.lax.axis_index(AXIS)
    local_R = jnp.searchsorted(jnp.cumsum(group_sizes_L), jnp.arange(rows_RxD.shape[0]), side="right")
    factor_R = jnp.where(local_R < experts_per_device, me * experts_per_device + local_R + 1, 0)
    return rows_RxD * factor_R[:, None]

  max_rows = ragged_exchange.max_slice_rows(tokens, top_k, experts_per_device)
  y = per_device(
    lambda rows, sizes: ragged_exchange.exchange_and_run_experts(
      rows, sizes, run_local, axis_name=AXIS, axis_size=devices, max_rows=max_rows, exchange="padded"
    ),
    devices,
    jnp.asarray(x),
    jnp.asarray(counts),
  )
  expected = np.zeros_like(x)
  for device, experts_of_rows in enumerate(expert_rows):
    for row, expert in enumerate(experts_of_rows):
      expected[device, row] = x[device, row] * (expert + 1)
  chex.assert_trees_all_close(np.asarray(y), expected, rtol=1e-6)


def test_exchange_names_are_checked_and_auto_is_padded_on_cpu():
  assert ragged_exchange.resolve_exchange("auto") == (
    "padded" if jax.default_backend() == "cpu" else "ragged"
  )
  with pytest.raises(ValueError, match="exchange must be one of"):
    ragged_exchange.resolve_exchange("nccl")


def test_the_ragged_exchange_lowers_to_ragged_all_to_all():
  """XLA:CPU cannot compile it, but the program GPU/TPU would run is built and uses the op."""
  tokens, width, experts = 64, 8, 8
  mesh = make_mesh(1, 4)
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  weights = (
    jax.random.normal(keys[0], (experts, width, 16)),
    jnp.zeros((experts, 16)),
    jax.random.normal(keys[1], (experts, 16, width)),
    jnp.zeros((experts, width)),
  )
  x_TxD = jax.random.normal(keys[2], (tokens, width))
  router_DxE = jax.random.normal(keys[3], (width, experts))

  def loss(x_TxD, weights):
    y, _ = expert_parallel_moe(
      x_TxD.reshape(4, tokens // 4, width),
      jnp.ones((4, tokens // 4), bool),
      router_DxE,
      weights,
      mesh=mesh,
      top_k=2,
      capacity=None,
      exchange="ragged",
    )
    return jnp.sum(y**2)

  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x_TxD, weights).as_text()
  # Two exchanges forward, their two transposes backward.
  assert text.count("ragged_all_to_all") >= 4, text[:2000]
