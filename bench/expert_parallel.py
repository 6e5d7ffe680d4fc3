"""Train-step time of one MoE layer with and without expert parallelism, and its all-to-all bytes.

Run from the repository root (8 virtual CPU devices unless XLA_FLAGS says otherwise):
  python -m bench.expert_parallel [--tokens 2048 --d_model 128 --d_ff 256 --experts 8 --top_k 2] [--json PATH]

A step is forward + backward + Adam (optax) of one top-k MoE layer on a loss
mixing the output with the balancing and z losses. Variants:
  single device    the library's single-device path (route, assign_slots,
                   dispatch, MlpExperts math, combine) on one device, global capacity;
  gspmd            the same function jitted with the batch split over all devices
                   and the weights replicated (what jit does without shard_map);
  ep data=d x=X    `expert_parallel_moe` on a (data, expert) mesh, per-device
                   capacity; the expert weights and their Adam moments are split on 'expert'.
Virtual CPU devices share the host's cores, so this measures overhead, not speed-up.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tmoe_jax.feedforward import ACTIVATIONS
from tmoe_jax.moe import assign_slots, combine_outputs, dispatch_tokens, top_k_route
from tmoe_jax.moe.dispatch import expert_capacity
from tmoe_jax.moe.expert_parallel import bytes_moved_per_layer, expert_parallel_moe
from tmoe_jax.moe.experts import mlp_experts
from tmoe_jax.moe.losses import load_balancing_loss, router_z_loss
from tmoe_jax.moe.parameter_sharding import tree_shardings
from tmoe_jax.moe.statistics import finalize
from tmoe_jax.parallel.mesh import make_mesh
from tmoe_jax.parallel.sharding import batch_sharding


def init_params(key, d_model, d_ff, num_experts):
  keys = jax.random.split(key, 3)
  return {
    "router": {"kernel": 0.02 * jax.random.normal(keys[0], (d_model, num_experts))},
    "experts": {
      "w_in_ExDxF": jax.random.normal(keys[1], (num_experts, d_model, d_ff)) * d_model**-0.5,
      "b_in_ExF": jnp.zeros((num_experts, d_ff)),
      "w_out_ExFxD": jax.random.normal(keys[2], (num_experts, d_ff, d_model)) * d_ff**-0.5,
      "b_out_ExD": jnp.zeros((num_experts, d_model)),
    },
  }


def _weights(params):
  e = params["experts"]
  return (e["w_in_ExDxF"], e["b_in_ExF"], e["w_out_ExFxD"], e["b_out_ExD"])


def single_device_layer(params, x_TxD, *, top_k, capacity):
  num_experts = params["router"]["kernel"].shape[-1]
  route = top_k_route(x_TxD @ params["router"]["kernel"], top_k)
  slots = assign_slots(route.expert_indices_TxK, num_experts, capacity)
  buffer_ExCxD = dispatch_tokens(x_TxD, slots, num_experts, capacity)
  y_ExCxD = mlp_experts(_weights(params), buffer_ExCxD, activation=ACTIVATIONS["relu"], dtype=jnp.float32)
  y_TxD = combine_outputs(y_ExCxD, slots, route.gates_TxK)
  lb = load_balancing_loss(route.router_probs_TxE, route.expert_indices_TxK)
  return y_TxD, lb, router_z_loss(route.router_logits_TxE)


def expert_parallel_layer(params, x_TxD, *, top_k, capacity_factor, mesh):
  """One routing group per device, so capacity is sized as in the single-device rows' T_local."""
  num_tokens, d_model = x_TxD.shape
  groups = mesh.size
  group_size = num_tokens // groups
  num_experts = params["router"]["kernel"].shape[-1]
  capacity = (
    None if capacity_factor is None else expert_capacity(group_size, num_experts, top_k, capacity_factor)
  )
  y_GxSxD, sums = expert_parallel_moe(
    x_TxD.reshape(groups, group_size, d_model),
    jnp.ones((groups, group_size), bool),
    params["router"]["kernel"],
    _weights(params),
    mesh=mesh,
    top_k=top_k,
    capacity=capacity,
  )
  stats = finalize(sums, top_k)
  return y_GxSxD.reshape(num_tokens, d_model), stats.load_balancing_loss, stats.router_z_loss


def make_step(layer_fn, optimizer):
  def loss_fn(params, x_TxD, target_TxD):
    y_TxD, lb, z = layer_fn(params, x_TxD)
    return jnp.mean((y_TxD - target_TxD) ** 2) + 1e-2 * lb + 1e-3 * z

  def step(params, opt_state, x_TxD, target_TxD):
    loss, grads = jax.value_and_grad(loss_fn)(params, x_TxD, target_TxD)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def time_step(
  step, params, opt_state, x, target, *, repeats, warmup=2, in_shardings=None, out_shardings=None
):
  kwargs = {"donate_argnums": (0, 1)}
  if in_shardings is not None:
    kwargs.update(in_shardings=in_shardings, out_shardings=out_shardings)
  jitted = jax.jit(step, **kwargs)
  start = time.perf_counter()
  params, opt_state, loss = jitted(params, opt_state, x, target)
  loss.block_until_ready()
  compile_s = time.perf_counter() - start
  for _ in range(warmup - 1):
    params, opt_state, loss = jitted(params, opt_state, x, target)
  jax.block_until_ready(params)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    params, opt_state, loss = jitted(params, opt_state, x, target)
    jax.block_until_ready((params, opt_state, loss))
    times.append(time.perf_counter() - start)
  return statistics.median(times), min(times), compile_s, params


def parse_meshes(text: str, capacity_factor: float) -> list[tuple[tuple[int, int], float | None]]:
  """ "2x4,1x8:dropless" -> [((2, 4), capacity_factor), ((1, 8), None)]."""
  variants = []
  for item in text.split(","):
    shape, _, dispatch = item.partition(":")
    data, expert = (int(size) for size in shape.split("x"))
    variants.append(((data, expert), None if dispatch == "dropless" else capacity_factor))
  return variants


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--d_model", type=int, default=128)
  parser.add_argument("--d_ff", type=int, default=256)
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--top_k", type=int, default=2)
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument(
    "--meshes",
    default="8x1,4x2,2x4,1x8,2x4:dropless,1x8:dropless",
    help="expert-parallel variants: DATAxEXPERT, with :dropless for dropless dispatch",
  )
  parser.add_argument("--json", help="write the rows (and the settings) to this file as JSON")
  args = parser.parse_args(argv)
  rows = []

  def record(variant, median, best, compile_s, **extra):
    rows.append(
      {
        "variant": variant,
        "median_ms": median * 1e3,
        "min_ms": best * 1e3,
        "first_call_s": compile_s,
        **extra,
      }
    )

  num_tokens, top_k, cf = args.tokens, args.top_k, args.capacity_factor
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(keys[0], (num_tokens, args.d_model))
  target = jax.random.normal(keys[1], (num_tokens, args.d_model))
  fresh_params = lambda: init_params(keys[2], args.d_model, args.d_ff, args.experts)
  optimizer = optax.adam(1e-3)
  print(
    f"one MoE layer train step (fwd+bwd+Adam): T={num_tokens} D={args.d_model} F={args.d_ff} "
    f"E={args.experts} K={top_k} cf={cf}; {jax.device_count()} {jax.default_backend()} devices, "
    f"median of {args.repeats}"
  )
  print(f"{'variant':<28} {'median ms':>10} {'min ms':>8} {'1st call s':>10} {'all-to-all fwd bytes':>22}")

  # The single-device layer sizes capacity from the global token count.
  capacity = expert_capacity(num_tokens, args.experts, top_k, cf)
  device0 = jax.devices()[0]
  params = jax.device_put(fresh_params(), device0)
  step = make_step(lambda p, xx: single_device_layer(p, xx, top_k=top_k, capacity=capacity), optimizer)
  median, best, compile_s, _ = time_step(
    step,
    params,
    optimizer.init(params),
    jax.device_put(x, device0),
    jax.device_put(target, device0),
    repeats=args.repeats,
  )
  print(f"{'single device':<28} {median * 1e3:>10.2f} {best * 1e3:>8.2f} {compile_s:>10.2f} {0:>22,}")
  record("single device", median, best, compile_s, all_to_all_forward_bytes=0)

  mesh = make_mesh()
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(fresh_params(), replicated)
  opt_state = optimizer.init(params)
  batch = batch_sharding(mesh)
  median, best, compile_s, _ = time_step(
    step,
    params,
    opt_state,
    jax.device_put(x, batch),
    jax.device_put(target, batch),
    repeats=args.repeats,
    in_shardings=(replicated, replicated, batch, batch),
    out_shardings=(replicated, replicated, replicated),
  )
  print(
    f"{'gspmd (batch split, x8)':<28} {median * 1e3:>10.2f} {best * 1e3:>8.2f} {compile_s:>10.2f} {'-':>22}"
  )
  record("gspmd (batch split, x8)", median, best, compile_s, all_to_all_forward_bytes=None)

  for (data, expert), factor in parse_meshes(args.meshes, cf):
    mesh = make_mesh(data, expert)
    params = fresh_params()
    param_shardings = tree_shardings(params, mesh)
    params = jax.device_put(params, param_shardings)
    opt_state = optimizer.init(params)
    opt_shardings = tree_shardings(opt_state, mesh)
    batch = batch_sharding(mesh)
    step = make_step(
      lambda p, xx, mesh=mesh, factor=factor: expert_parallel_layer(
        p, xx, top_k=top_k, capacity_factor=factor, mesh=mesh
      ),
      optimizer,
    )
    median, best, compile_s, params = time_step(
      step,
      params,
      opt_state,
      jax.device_put(x, batch),
      jax.device_put(target, batch),
      repeats=args.repeats,
      in_shardings=(param_shardings, opt_shardings, batch, batch),
      out_shardings=(param_shardings, opt_shardings, NamedSharding(mesh, P())),
    )
    assert params["experts"]["w_in_ExDxF"].sharding.spec == param_shardings["experts"]["w_in_ExDxF"].spec
    moved = bytes_moved_per_layer(
      num_tokens, args.d_model, args.experts, top_k, factor, data=data, expert=expert
    )
    name = f"ep data={data} expert={expert}" + (" dropless" if factor is None else "")
    print(
      f"{name:<28} {median * 1e3:>10.2f} {best * 1e3:>8.2f} {compile_s:>10.2f} {moved.total_bytes:>22,}"
      f"  ({moved.rows_per_device} rows/device buffer, C={moved.capacity}, "
      f"{moved.sent_bytes_per_device:,} B sent per device, "
      f"payload {moved.payload_bytes:,} B)"
    )
    record(
      name,
      median,
      best,
      compile_s,
      data=data,
      expert=expert,
      dropless=factor is None,
      all_to_all_forward_bytes=moved.total_bytes,
      rows_per_device=moved.rows_per_device,
      capacity=moved.capacity,
      sent_bytes_per_device=moved.sent_bytes_per_device,
      payload_bytes=moved.payload_bytes,
    )
  if args.json:
    settings = {key: value for key, value in vars(args).items() if key != "json"}
    settings.update(devices=jax.device_count(), backend=jax.default_backend())
    with open(args.json, "w") as file:
      json.dump({"settings": settings, "rows": rows}, file, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
