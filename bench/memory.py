"""Peak memory of the MoE layer's and the full model's train step, against the number of experts.

Run from the repository root:
  python -m bench.memory [--json PATH [--update]] [--num-experts 8,16,32,64] [--tokens 8192]
                         [--dispatch dense_ffn,capacity,...] [--size medium]
                         [--remat none,full,save_dots,save_dots_no_batch] [--remat-size small]
                         [--mesh 1x1x1,1x2x1,1x4x1,1x8x1,2x2x2]
                         [--grad-accum 1,4,16] [--grad-accum-batch 256] [--grad-accum-length 32]

Compiles, without running them, two train steps (forward, backward, optimizer update,
parameters and optimizer state donated) for each expert count:
  moe_layer   one layer of `bench.moe_layer` per dispatch (d_model 512, d_ff 1024,
              top-2, float32, `--tokens` tokens, Adam);
  train_step  the full Transformer-MoE step of `bench.train_step` at `--size`
              (configs/tmoe.py's optimizer), capacity dispatch, num_experts replaced;
and one train step per rematerialisation policy (`model.remat`, `blocks.REMATS`):
  train_step_remat  the same step at `--remat-size` ("small": configs/tmoe.py's model and
              batch), its variant the policy; `residual_bytes` adds what the forward pass
              keeps for the backward pass (the leaves of `jax.vjp`'s backward function, params
              included), which does not depend on how a backend schedules the step,
one train step per microbatch count (`train.grad_accum_steps`, `training.grad_accumulation`):
  train_step_grad_accum  the default experiment's step (configs/tmoe.py: model, losses,
              dropout, optimizer; vocabulary 64) as `tasks.lowering.sharded_train_step` builds
              it for `python -m train`, on one device, with `--grad-accum-batch` sequences of
              `--grad-accum-length` source and target tokens, its variant the microbatch count;
              the batch is an argument of the step, so the saving is in temp_bytes,
and, per `--mesh` shape (data x fsdp x expert; needs that many devices, e.g.
XLA_FLAGS=--xla_force_host_platform_device_count=8):
  state_per_device  bytes of parameters + Adam state one device holds for the default
              model (configs/tmoe.py, 8 experts) under `training.state.train_state_shardings`,
              from each leaf's shard shape (nothing is allocated): 'fsdp' splits every weight,
              'expert' the expert stacks, so the bytes fall about 1 / (fsdp * expert share);
and reads XLA's buffer assignment (`jit(f).lower(...).compile().memory_analysis()`):
argument, output, aliased (donated inputs reused as outputs) and temp bytes. The
peak estimate is arguments + outputs - aliased + temps: every argument lives through
the step, donated ones are reused for outputs, and temp is the size of the buffer
XLA assigns to all intermediates (already the peak of their live ranges).
On a GPU or TPU each step also runs once and `measured_peak_bytes` is the device's
`memory_stats()["peak_bytes_in_use"]`: the process's peak so far, so cases run in
growing size; None on CPU, which keeps no such statistics. `--update` merges the rows into
the JSON file's, replacing those of the same step, variant, expert count and tokens.

On CPU, XLA merges a rematerialised block's recomputation back into the forward pass
(the compiled program recomputes nothing), so the remat rows' temp bytes do not fall
there; residual_bytes shows what each policy keeps, and a GPU or TPU shows the saving.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from bench import moe_layer
from bench import train_step as train_step_bench
from configs import tmoe as configs_tmoe
from tmoe_jax.models.blocks import REMATS
from tmoe_jax.models.transformer import Transformer, TransformerConfig
from tmoe_jax.moe.layer import MoEFeedForward
from tmoe_jax.moe.settings import MoEConfig
from tmoe_jax.parallel.mesh import make_mesh
from tmoe_jax.tasks.lowering import sharded_train_step
from tmoe_jax.tasks.seq2seq import seq2seq_loss
from tmoe_jax.training.optimizer import make_optimizer
from tmoe_jax.training.state import count_params, create_train_state, train_state_shardings

MIB = 2**20


def compiled_memory(jitted, *args) -> dict[str, int]:
  """XLA's buffer sizes of `jitted` on `args` (arrays or ShapeDtypeStructs), and the peak estimate."""
  stats = jitted.lower(*args).compile().memory_analysis()
  sizes = {
    "argument_bytes": stats.argument_size_in_bytes,
    "output_bytes": stats.output_size_in_bytes,
    "alias_bytes": stats.alias_size_in_bytes,
    "temp_bytes": stats.temp_size_in_bytes,
  }
  sizes["peak_bytes"] = (
    sizes["argument_bytes"] + sizes["output_bytes"] - sizes["alias_bytes"] + sizes["temp_bytes"]
  )
  return sizes


def measured_peak_bytes(run) -> int | None:
  """The device's peak bytes in use after `run()`, None where the backend keeps no statistics."""
  stats = jax.devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  jax.block_until_ready(run())
  return int(jax.devices()[0].memory_stats()["peak_bytes_in_use"])


def layer_memory(num_experts: int, tokens: int, dispatch: str) -> dict:
  x = jax.random.normal(jax.random.key(0), (tokens, moe_layer.D_MODEL), jnp.float32)
  if dispatch == "dense_ffn":
    params, apply = moe_layer.dense_ffn(jax.random.key(1))
  else:
    config = MoEConfig(
      num_experts=num_experts,
      top_k=moe_layer.TOP_K,
      d_model=moe_layer.D_MODEL,
      d_ff=moe_layer.D_FF,
      capacity_factor=moe_layer.CAPACITY_FACTOR,
    )
    params, apply = moe_layer.BUILDERS[dispatch](MoEFeedForward(config, rngs=nnx.Rngs(0)))
  case = moe_layer.make_case(dispatch, params, apply)
  sizes = compiled_memory(case.step, case.params, case.opt_state, x, x)
  return {
    "step": "moe_layer",
    "variant": dispatch,
    "num_experts": num_experts,
    "tokens": tokens,
    "params": count_params(case.params),
    **sizes,
    "measured_peak_bytes": measured_peak_bytes(lambda: case.step(case.params, case.opt_state, x, x)),
  }


def train_step_memory(num_experts: int, size_name: str) -> dict:
  size = train_step_bench.SIZES[size_name]
  config = train_step_bench.transformer_config(size, num_experts=num_experts)
  step, state_shapes = train_step_bench.make_train_step(config, abstract=True)
  batch = train_step_bench.synthetic_batch(size)
  sizes = compiled_memory(step, state_shapes, batch)

  def run():
    _, state = train_step_bench.make_train_step(config)
    return step(state, batch)

  return {
    "step": "train_step",
    "variant": size_name,
    "num_experts": num_experts,
    "tokens": size.batch_size * 2 * size.seq_len,
    "params": count_params(state_shapes.params),
    **sizes,
    "measured_peak_bytes": measured_peak_bytes(run),
  }


def residual_bytes(loss, params, *rest) -> int:
  """Bytes the forward pass of `loss(params, *rest)` keeps for its backward pass with respect to
  `params` (arrays or ShapeDtypeStructs; only traced, nothing computed)."""

  def backward_leaves(params, *rest):
    return jax.tree.leaves(jax.vjp(lambda p: loss(p, *rest), params)[1])

  shapes = jax.eval_shape(backward_leaves, params, *rest)
  return sum(shape.size * shape.dtype.itemsize for shape in shapes)


def remat_memory(remat: str, size_name: str) -> dict:
  """The train step of `size_name` with `model.remat` = `remat`."""
  size = train_step_bench.SIZES[size_name]
  config = train_step_bench.transformer_config(size, remat=remat)
  step, state_shapes = train_step_bench.make_train_step(config, abstract=True)
  batch = train_step_bench.synthetic_batch(size)
  sizes = compiled_memory(step, state_shapes, batch)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(params=0))))

  def loss(params, model_state):
    model = nnx.merge(graphdef, params, model_state, copy=True)
    return seq2seq_loss(model, batch, nnx.Rngs(dropout=0), 0)[0]

  def run():
    _, state = train_step_bench.make_train_step(config)
    return step(state, batch)

  return {
    "step": "train_step_remat",
    "variant": remat,
    "num_experts": config.moe.num_experts,
    "tokens": size.batch_size * 2 * size.seq_len,
    "params": count_params(state_shapes.params),
    **sizes,
    "residual_bytes": residual_bytes(loss, state_shapes.params, state_shapes.model_state),
    "measured_peak_bytes": measured_peak_bytes(run),
  }


def grad_accum_memory(microbatches: int, batch_size: int, length: int) -> dict:
  """The default experiment's train step on one device, its gradient accumulated over `microbatches`."""
  config = configs_tmoe.get_config()
  config.model.max_length = length
  config.train.batch_size = batch_size
  config.train.grad_accum_steps = microbatches
  built = sharded_train_step(config, vocab_size=64, mesh=make_mesh(1, 1))
  sizes = compiled_memory(built.step, *built.args)

  def run():
    batch = {
      name: jnp.ones(shape.shape, shape.dtype, device=shape.sharding) for name, shape in built.batch.items()
    }
    return built.step(built.init(), batch)

  return {
    "step": "train_step_grad_accum",
    "variant": str(microbatches),
    "num_experts": built.model_config.moe.num_experts,
    "tokens": batch_size * 2 * length,
    "params": count_params(built.state.params),
    "microbatches": microbatches,
    "batch_size": batch_size,
    **sizes,
    "measured_peak_bytes": measured_peak_bytes(run),
  }


def state_per_device(mesh_shape: str) -> dict:
  """Parameter + optimizer-state bytes on one device of a (data, fsdp, expert) mesh, e.g. "2x2x2"."""
  data, fsdp, expert = (int(size) for size in mesh_shape.split("x"))
  mesh = make_mesh(data, expert, fsdp=fsdp)
  config = configs_tmoe.get_config()
  config.model.num_experts = 8
  model_config = TransformerConfig.from_config(config.model, vocab_size=64)
  optimizer = make_optimizer(config.train)
  _, state = nnx.eval_shape(
    lambda: create_train_state(Transformer(model_config, rngs=nnx.Rngs(0)), optimizer, 0)
  )
  shardings = train_state_shardings(state, mesh)

  def device_bytes(leaf, sharding):
    return math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize

  per_leaf = jax.tree.map(
    device_bytes, (state.params, state.opt_state), (shardings.params, shardings.opt_state)
  )
  total = sum(
    math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves((state.params, state.opt_state))
  )
  return {
    "step": "state_per_device",
    "variant": mesh_shape,
    "num_experts": 8,
    "tokens": 0,
    "params": count_params(state.params),
    "state_bytes": total,
    "device_state_bytes": sum(jax.tree.leaves(per_leaf)),
  }


def remat_lines(rows: list[dict]) -> list[str]:
  """Per remat policy: temp, peak and residual bytes, and their share of the "none" row's."""
  remat_rows = [row for row in rows if row["step"] == "train_step_remat"]
  base = next((row for row in remat_rows if row["variant"] == "none"), None)
  lines = []
  for row in remat_rows:
    line = f"remat {row['variant']}:"
    for key in ("temp_bytes", "peak_bytes", "residual_bytes"):
      line += f" {key[: -len('_bytes')]} {row[key] / MIB:,.2f} MiB"
      if base is not None:
        line += f" ({row[key] / base[key]:.2f}x)"
    lines.append(line)
  return lines


def grad_accum_lines(rows: list[dict]) -> list[str]:
  """Per microbatch count: temp and peak bytes, and their share of the one-batch row's."""
  accum_rows = [row for row in rows if row["step"] == "train_step_grad_accum"]
  base = next((row for row in accum_rows if row["microbatches"] == 1), None)
  lines = []
  for row in accum_rows:
    line = (
      f"grad_accum {row['microbatches']} microbatches of {row['batch_size'] // row['microbatches']} rows:"
    )
    for key in ("temp_bytes", "peak_bytes"):
      line += f" {key[: -len('_bytes')]} {row[key] / MIB:,.2f} MiB ({row[key] / 1e6:,.1f} MB)"
      if base is not None:
        line += f" ({row[key] / base[key]:.2f}x)"
    lines.append(line)
  return lines


def growth_lines(rows: list[dict]) -> list[str]:
  """Per (step, variant): peak at the fewest and most experts, and bytes per added expert."""
  lines = []
  groups: dict[tuple[str, str], list[dict]] = {}
  for row in rows:
    if row["step"] not in ("train_step_remat", "train_step_grad_accum"):  # one expert count: their own lines
      groups.setdefault((row["step"], row["variant"]), []).append(row)
  for (step, variant), group in groups.items():
    first, last = min(group, key=lambda r: r["num_experts"]), max(group, key=lambda r: r["num_experts"])
    line = f"{step} {variant}: peak {first['peak_bytes'] / MIB:,.0f} MiB at E={first['num_experts']}"
    if last is not first:
      added = last["num_experts"] - first["num_experts"]
      per_expert = (last["peak_bytes"] - first["peak_bytes"]) / added
      # Each parameter is held ~4 times over a step: itself, its gradient, 2 Adam moments (float32).
      state_per_expert = 4 * 4 * (last["params"] - first["params"]) / added
      line += (
        f" -> {last['peak_bytes'] / MIB:,.0f} MiB at E={last['num_experts']} "
        f"({last['peak_bytes'] / first['peak_bytes']:.2f}x): {per_expert / MIB:,.1f} MiB per added expert "
        f"(its parameters, gradients and Adam moments: {state_per_expert / MIB:,.1f} MiB)"
      )
    lines.append(line)
  return lines


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
  """`old` with each row `new` has again (same step, variant, experts, tokens) replaced in place,
  and `new`'s other rows after them."""
  key = lambda row: (row["step"], row["variant"], row["num_experts"], row["tokens"])
  fresh = {key(row): row for row in new}
  merged = [fresh.pop(key(row), row) for row in old]
  return merged + [row for row in new if key(row) in fresh]


def markdown_table(rows: list[dict]) -> str:
  lines = [
    (
      "| step | variant | experts | params | arguments MiB | outputs MiB | aliased MiB | temp MiB | "
      "peak MiB | measured peak MiB |"
    ),
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for row in rows:
    measured = "-" if row["measured_peak_bytes"] is None else f"{row['measured_peak_bytes'] / MIB:,.1f}"
    mib = [
      f"{row[key] / MIB:,.1f}"
      for key in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes")
    ]
    lines.append(
      f"| {row['step']} | {row['variant']} | {row['num_experts']} | {row['params']:,} | "
      + " | ".join(mib)
      + f" | {measured} |"
    )
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", help="write the rows to this file as a JSON list")
  parser.add_argument(
    "--update", action="store_true", help="keep the --json file's other rows, replacing those run again"
  )
  parser.add_argument("--num-experts", default="8,16,32,64", help="comma-separated expert counts")
  parser.add_argument("--tokens", type=int, default=8192, help="tokens of the moe_layer step")
  parser.add_argument(
    "--dispatch",
    default="dense_ffn,capacity,dropless_block_loop,every_expert,onehot_einsum",
    help=f"comma-separated moe_layer dispatches, of {moe_layer.DISPATCHES}; empty for none",
  )
  parser.add_argument(
    "--size", default="medium", help=f"train_step size, of {tuple(train_step_bench.SIZES)}; empty for none"
  )
  parser.add_argument(
    "--remat",
    default=",".join(REMATS),
    help=f"comma-separated model.remat policies for train_step_remat, of {REMATS}; empty for none",
  )
  parser.add_argument(
    "--remat-size", default="small", help=f"train_step_remat size, of {tuple(train_step_bench.SIZES)}"
  )
  parser.add_argument(
    "--mesh", default="", help="comma-separated data x fsdp x expert meshes for state_per_device, e.g. 1x8x1"
  )
  parser.add_argument(
    "--grad-accum",
    default="1,4,16",
    help="comma-separated train.grad_accum_steps values for train_step_grad_accum; empty for none",
  )
  parser.add_argument("--grad-accum-batch", type=int, default=256, help="train_step_grad_accum batch rows")
  parser.add_argument(
    "--grad-accum-length", type=int, default=32, help="train_step_grad_accum source and target tokens"
  )
  args = parser.parse_args(argv)
  dispatches = [d for d in args.dispatch.split(",") if d]
  unknown = sorted(set(dispatches) - set(moe_layer.DISPATCHES))
  if unknown:
    parser.error(f"--dispatch: unknown {unknown}; choose from {moe_layer.DISPATCHES}")
  if args.size and args.size not in train_step_bench.SIZES:
    parser.error(f"--size: unknown {args.size!r}; choose from {tuple(train_step_bench.SIZES)}")
  remats = [r for r in args.remat.split(",") if r]
  unknown = sorted(set(remats) - set(REMATS))
  if unknown:
    parser.error(f"--remat: unknown {unknown}; choose from {REMATS}")
  if args.remat_size not in train_step_bench.SIZES:
    parser.error(f"--remat-size: unknown {args.remat_size!r}; choose from {tuple(train_step_bench.SIZES)}")
  num_experts_list = sorted(int(n) for n in args.num_experts.split(",") if n)
  if args.tokens < 1 or any(n < moe_layer.TOP_K for n in num_experts_list):
    parser.error(f"--tokens must be >= 1 and every --num-experts >= top_k = {moe_layer.TOP_K}")

  try:
    # Most microbatches (the smallest step) first: cases run in growing size (`measured_peak_bytes`).
    microbatch_counts = sorted((int(n) for n in args.grad_accum.split(",") if n), reverse=True)
  except ValueError:
    parser.error(f"--grad-accum: comma-separated integers, got {args.grad_accum!r}")
  if args.grad_accum_batch < 1 or args.grad_accum_length < 1 or any(n < 1 for n in microbatch_counts):
    parser.error("--grad-accum counts, --grad-accum-batch and --grad-accum-length must be >= 1")

  log = lambda message: print(message, flush=True)
  log(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind})")
  rows = []
  for dispatch in dispatches:
    # The dense FFN does not depend on the expert count.
    for num_experts in num_experts_list[:1] if dispatch == "dense_ffn" else num_experts_list:
      rows.append(layer_memory(num_experts, args.tokens, dispatch))
      log(f"  moe_layer {dispatch} E={num_experts}: peak {rows[-1]['peak_bytes'] / MIB:,.0f} MiB")
  if args.size:
    for num_experts in num_experts_list:
      rows.append(train_step_memory(num_experts, args.size))
      log(f"  train_step {args.size} E={num_experts}: peak {rows[-1]['peak_bytes'] / MIB:,.0f} MiB")
  for remat in remats:
    rows.append(remat_memory(remat, args.remat_size))
    log(f"  train_step_remat {args.remat_size} remat={remat}: temp {rows[-1]['temp_bytes'] / MIB:,.1f} MiB")
  for microbatches in microbatch_counts:
    rows.append(grad_accum_memory(microbatches, args.grad_accum_batch, args.grad_accum_length))
    log(
      f"  train_step_grad_accum batch {args.grad_accum_batch}x{args.grad_accum_length} "
      f"microbatches={microbatches}: temp {rows[-1]['temp_bytes'] / MIB:,.1f} MiB"
    )
  for mesh_shape in [shape for shape in args.mesh.split(",") if shape]:
    rows.append(state_per_device(mesh_shape))
    row = rows[-1]
    share = row["device_state_bytes"] / row["state_bytes"]
    log(f"  state_per_device {mesh_shape}: {row['device_state_bytes'] / MIB:,.2f} MiB ({share:.3f} of all)")
  compiled = [row for row in rows if "peak_bytes" in row]
  print(markdown_table(compiled))
  print("\n".join(growth_lines(compiled) + remat_lines(compiled) + grad_accum_lines(compiled)))
  if args.json:
    if args.update and os.path.exists(args.json):
      with open(args.json) as f:
        rows = merge_rows(json.load(f), rows)
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
