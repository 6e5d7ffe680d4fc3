"""Peak memory of the MoE layer's and the full model's train step, against the number of experts.

Run from the repository root:
  python -m bench.memory [--json PATH] [--num-experts 8,16,32,64] [--tokens 8192]
                         [--dispatch dense_ffn,capacity,...] [--size medium]

Compiles, without running them, two train steps (forward, backward, optimizer update,
parameters and optimizer state donated) for each expert count:
  moe_layer   one layer of `bench.moe_layer` per dispatch (d_model 512, d_ff 1024,
              top-2, float32, `--tokens` tokens, Adam);
  train_step  the full Transformer-MoE step of `bench.train_step` at `--size`
              (configs/tmoe.py's optimizer), capacity dispatch, num_experts replaced.
and reads XLA's buffer assignment (`jit(f).lower(...).compile().memory_analysis()`):
argument, output, aliased (donated inputs reused as outputs) and temp bytes. The
peak estimate is arguments + outputs - aliased + temps: every argument lives through
the step, donated ones are reused for outputs, and temp is the size of the buffer
XLA assigns to all intermediates (already the peak of their live ranges).
On a GPU or TPU each step also runs once and `measured_peak_bytes` is the device's
`memory_stats()["peak_bytes_in_use"]`: the process's peak so far, so cases run in
growing size; None on CPU, which keeps no such statistics.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from bench import moe_layer
from bench import train_step as train_step_bench
from tmoe_jax.moe.layer import MoEFeedForward
from tmoe_jax.moe.settings import MoEConfig
from tmoe_jax.training.state import count_params

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


def growth_lines(rows: list[dict]) -> list[str]:
  """Per (step, variant): peak at the fewest and most experts, and bytes per added expert."""
  lines = []
  groups: dict[tuple[str, str], list[dict]] = {}
  for row in rows:
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
  args = parser.parse_args(argv)
  dispatches = [d for d in args.dispatch.split(",") if d]
  unknown = sorted(set(dispatches) - set(moe_layer.DISPATCHES))
  if unknown:
    parser.error(f"--dispatch: unknown {unknown}; choose from {moe_layer.DISPATCHES}")
  if args.size and args.size not in train_step_bench.SIZES:
    parser.error(f"--size: unknown {args.size!r}; choose from {tuple(train_step_bench.SIZES)}")
  num_experts_list = sorted(int(n) for n in args.num_experts.split(",") if n)
  if args.tokens < 1 or any(n < moe_layer.TOP_K for n in num_experts_list):
    parser.error(f"--tokens must be >= 1 and every --num-experts >= top_k = {moe_layer.TOP_K}")

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
  print(markdown_table(rows))
  print("\n".join(growth_lines(rows)))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
