"""One prepared check of the accelerator path, to run unchanged the first time a GPU or TPU is at hand.

Run from the repository root (under 8 minutes on one H100; `--tiny` is the CPU version the tests run):
  python -m bench.device_check [--json bench/device_check.json] [--tiny] [--budget-seconds 420]

On whatever devices `jax.devices()` gives, three checks, each recorded in the JSON
(written again after every check, so a run cut short keeps what it did):

1. ragged_dot_vs_block_loop: `moe.dropless.dropless_moe` with method "ragged_dot"
   (the GPU/TPU kernel) on the accelerator against method "block_loop" on the CPU
   (the CPU kernel, run where it is meant to run) and on the accelerator, for MLP
   and gated experts and a routing that leaves one expert empty: outputs and the
   gradients of x, the gates and every weight, float32 at "highest" matmul precision.
2. expert_parallel_vs_one_device: the top-k `MoEFeedForward` run expert-parallel over
   every local device (mesh data x expert, expert = gcd(devices, experts)) against
   the same layer on one device, for capacity and dropless dispatch: outputs,
   routing statistics and gradients. With one device there is no exchange to test
   and the JSON says so.
3. train_step: the full Transformer-MoE step of `python -m train`
   (`tasks.lowering.sharded_train_step`: configs/tmoe.py's optimizer and losses)
   with d_model 1024, 6 + 6 layers, d_ff 4096, 8 experts top-2 every second FFN,
   sequences of 1024, vocabulary 32768, bfloat16, 8 sequences per device, for each
   dispatch: tokens/s and model FLOPs utilisation (MFU). Model FLOPs are
   `bench.train_step.train_flops_per_step`; MFU divides them by the seconds and by
   device_count x the device's dense bf16 peak (`PEAK_FLOPS`); an unknown device
   gets null and a note. It also records which collectives and ragged ops XLA
   kept in the compiled step.

Check 1 and 2 fail (exit 1, "passed": false) when a relative error
max|a - b| / max|b| exceeds `TOLERANCE`; the train step fails on a non-finite loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.train_step import train_flops_per_step
from configs import tmoe as tmoe_config
from tmoe_jax.moe import dropless
from tmoe_jax.moe.experts import EXPERT_PARAMS_BY_TYPE
from tmoe_jax.moe.layer import MoEFeedForward
from tmoe_jax.moe.settings import MoEConfig
from tmoe_jax.parallel.mesh import make_mesh
from tmoe_jax.parallel.ragged_exchange import resolve_exchange
from tmoe_jax.parallel.sharding import batch_sharding
from tmoe_jax.tasks.lowering import ops_found, sharded_train_step

DEFAULT_JSON = "bench/device_check.json"
# Relative error max|a - b| / max|b| allowed between two float32 computations of the same values.
TOLERANCE = 2e-3

# Dense bf16 peak FLOP/s per device by a substring of `device_kind`; first match wins.
PEAK_FLOPS = (
  ("H100 PCIe", 756e12),
  ("H100", 989e12),  # SXM
  ("H200", 989e12),
  ("A100", 312e12),
  ("TPU v4", 275e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5e", 197e12),
  ("TPU v5p", 459e12),
  ("TPU v5", 459e12),  # v5p reports itself as "TPU v5"
)

# Op name -> regex over the compiled (optimised HLO) text.
COMPILED_OP_PATTERNS = {
  "all_to_all": r"\ball-to-all(?:-start)?\(",
  "ragged_all_to_all": r"\bragged-all-to-all(?:-start)?\(",
  "all_reduce": r"\ball-reduce(?:-start)?\(",
  "all_gather": r"\ball-gather(?:-start)?\(",
  "reduce_scatter": r"\breduce-scatter\(",
  "ragged_dot": r"\bragged-dot\(",
  "while": r"\bwhile\(",
}


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Shapes of the three checks (`SIZES`)."""

  # 1. ragged_dot vs block loop: tokens, d_model, d_ff, experts, top-k.
  kernel: tuple[int, int, int, int, int]
  # 2. expert-parallel layer: sequences per device, length, d_model, d_ff, experts, top-k.
  layer: tuple[int, int, int, int, int, int]
  # 3. train step: configs/tmoe.py `model` fields, sequences per device, vocabulary, steps timed.
  model: dict[str, Any]
  rows_per_device: int
  vocab_size: int
  warmup_steps: int
  timed_steps: int
  # The block loop's block_size and granule; 0 = `moe.dropless`'s defaults (fewer tail sizes compile faster).
  block_size: int = 0
  granule: int = 0


SIZES = {
  "full": Sizes(
    kernel=(4096, 512, 1024, 8, 2),
    layer=(8, 256, 256, 512, 8, 2),
    model={
      "d_model": 1024,
      "num_heads": 16,
      "num_layers": 6,
      "num_decoder_layers": 6,
      "d_ff": 4096,
      "num_experts": 8,
      "top_k": 2,
      "moe_every": 2,
      "max_length": 1024,
      "dtype": "bfloat16",
      "sequences_per_group": 4,
    },
    rows_per_device=8,
    vocab_size=32768,
    warmup_steps=2,
    timed_steps=10,
  ),
  "tiny": Sizes(
    kernel=(64, 16, 32, 4, 2),
    layer=(2, 4, 8, 16, 8, 2),
    model={
      "d_model": 32,
      "num_heads": 2,
      "num_layers": 2,
      "num_decoder_layers": 2,
      "d_ff": 64,
      "num_experts": 8,
      "top_k": 2,
      "moe_every": 2,
      "max_length": 16,
      "dtype": "bfloat16",
      "sequences_per_group": 1,
    },
    rows_per_device=2,
    vocab_size=64,
    warmup_steps=1,
    timed_steps=1,
    block_size=32,
    granule=8,
  ),
}


def peak_flops(device_kind: str) -> float | None:
  """The dense bf16 peak FLOP/s of one device of this kind, None when unknown (e.g. CPU)."""
  for name, peak in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None


def relative_error(a, b) -> float:
  """max|a - b| / max|b| over every leaf of two pytrees (0 where b is all zeros and a equals it)."""
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = float(np.max(np.abs(y))) if y.size else 0.0
    diff = float(np.max(np.abs(x - y))) if y.size else 0.0
    worst = max(worst, diff / scale if scale else diff)
  return worst


def _mesh_shape(num_devices: int, num_experts: int) -> tuple[int, int]:
  expert = math.gcd(num_devices, num_experts)
  return num_devices // expert, expert


# ---------------------------------------------------------------------------
# 1. ragged_dot against the block loop.


def _expert_weights(
  key, expert_type: str, num_experts: int, d_model: int, d_ff: int
) -> tuple[jax.Array, ...]:
  shapes = {
    "w_in_ExDxF": (num_experts, d_model, d_ff),
    "b_in_ExF": (num_experts, d_ff),
    "w_out_ExFxD": (num_experts, d_ff, d_model),
    "b_out_ExD": (num_experts, d_model),
    "w_gate_ExDxF": (num_experts, d_model, d_ff),
    "w_up_ExDxF": (num_experts, d_model, d_ff),
    "w_down_ExFxD": (num_experts, d_ff, d_model),
  }
  names = EXPERT_PARAMS_BY_TYPE[expert_type]
  keys = jax.random.split(key, len(names))
  return tuple(
    jax.random.normal(k, shapes[name]) * (shapes[name][-2] ** -0.5 if name.startswith("w_") else 0.1)
    for k, name in zip(keys, names)
  )


def _kernel_inputs(sizes: Sizes, expert_type: str, empty_expert: bool):
  tokens, d_model, d_ff, num_experts, top_k = sizes.kernel
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  x_TxD = jax.random.normal(keys[0], (tokens, d_model))
  logits_TxE = jax.random.normal(keys[1], (tokens, num_experts))
  if empty_expert:
    logits_TxE = logits_TxE.at[:, 0].set(-1e9)  # nobody picks expert 0: a zero-size group
  gates_TxK, indices_TxK = jax.lax.top_k(jax.nn.softmax(logits_TxE), top_k)
  weights = _expert_weights(keys[2], expert_type, num_experts, d_model, d_ff)
  cotangent_TxD = jax.random.normal(keys[3], (tokens, d_model))
  return x_TxD, indices_TxK, gates_TxK, weights, cotangent_TxD


def _kernel_fn(method: str, expert_type: str, activation: str, **block):
  """(x, indices, gates, weights, cotangent) -> (y, grads of x, gates and weights), jitted.

  `block`: the block loop's block_size and granule (its defaults if not given).
  """

  def loss(x_TxD, gates_TxK, weights, indices_TxK, cotangent_TxD):
    y_TxD = dropless.dropless_moe(
      x_TxD, indices_TxK, gates_TxK, weights, activation, expert_type=expert_type, method=method, **block
    )
    return jnp.sum(y_TxD * cotangent_TxD), y_TxD

  def run(x_TxD, indices_TxK, gates_TxK, weights, cotangent_TxD):
    grads, y_TxD = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(
      x_TxD, gates_TxK, weights, indices_TxK, cotangent_TxD
    )
    return y_TxD, grads

  return jax.jit(run)


def check_ragged_dot(sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
  accelerator = jax.devices()[0]
  # The block loop on the host CPU as well, unless the accelerator is that CPU (or JAX_PLATFORMS hides it).
  cpu = None
  if accelerator.platform != "cpu":
    try:
      cpu = jax.devices("cpu")[0]
    except RuntimeError:
      pass
  block = {"block_size": sizes.block_size, "granule": sizes.granule} if sizes.block_size else {}
  cases = []
  with jax.default_matmul_precision("highest"):
    for expert_type, activation in (("mlp", "relu"), ("gated", "silu")):
      ragged_fn = _kernel_fn("ragged_dot", expert_type, activation)
      loop_fn = _kernel_fn("block_loop", expert_type, activation, **block)
      for empty_expert in (False, True):
        inputs = _kernel_inputs(sizes, expert_type, empty_expert)
        ragged = ragged_fn(*jax.device_put(inputs, accelerator))
        case = {
          "expert_type": expert_type,
          "empty_expert": empty_expert,
          "error_vs_block_loop_same_device": relative_error(
            ragged, loop_fn(*jax.device_put(inputs, accelerator))
          ),
        }
        if cpu is not None:
          case["error_vs_block_loop_cpu"] = relative_error(ragged, loop_fn(*jax.device_put(inputs, cpu)))
        case["passed"] = all(v <= TOLERANCE for k, v in case.items() if k.startswith("error"))
        log(f"  ragged_dot vs block loop, {expert_type}, empty expert {empty_expert}: {case}")
        cases.append(case)
  tokens, d_model, d_ff, num_experts, top_k = sizes.kernel
  return {
    "passed": all(case["passed"] for case in cases),
    "tokens": tokens,
    "d_model": d_model,
    "d_ff": d_ff,
    "num_experts": num_experts,
    "top_k": top_k,
    "block_size": sizes.block_size or dropless.DEFAULT_BLOCK_SIZE,
    "granule": sizes.granule or dropless.DEFAULT_GRANULE,
    "block_loop_on_cpu": cpu is not None,
    "cases": cases,
  }


# ---------------------------------------------------------------------------
# 2. The expert-parallel layer against one device.


def _layer_scalar(layer, x_BxLxD, mask_BxL, cotangent_BxLxD):
  y_BxLxD, aux = layer(x_BxLxD, mask_BxL, deterministic=False)
  value = (
    jnp.sum(y_BxLxD * cotangent_BxLxD)
    + 3.0 * aux.load_balancing_loss
    + 0.5 * aux.router_z_loss
    + aux.router_entropy
  )
  return value, (y_BxLxD, aux)


def check_expert_parallel(sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
  rows_per_device, length, d_model, d_ff, num_experts, top_k = sizes.layer
  devices = jax.devices()
  data, expert = _mesh_shape(len(devices), num_experts)
  mesh = make_mesh(data, expert, devices)
  batch = rows_per_device * len(devices)
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  x_BxLxD = jax.random.normal(keys[0], (batch, length, d_model))
  mask_BxL = jax.random.uniform(keys[1], (batch, length)) > 0.05  # some padding on most devices
  cotangent_BxLxD = jax.random.normal(keys[2], (batch, length, d_model))
  cases = []
  with jax.default_matmul_precision("highest"):
    for dispatch in ("capacity", "dropless"):
      config = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        d_model=d_model,
        d_ff=d_ff,
        # Room for every token: capacity is per routing group, so nothing drops on any mesh.
        capacity_factor=num_experts / top_k,
        eval_capacity_factor=num_experts / top_k,
        dispatch=dispatch,
        sequences_per_group=1,
      )
      sharded_layer = MoEFeedForward(config, mesh=mesh, rngs=nnx.Rngs(0))
      # A router scale without near-ties, so that summation order never flips a token's experts.
      sharded_layer.router.kernel[...] = sharded_layer.router.kernel[...] * 50.0
      graphdef, params, rest = nnx.split(sharded_layer, nnx.Param, ...)
      one_graphdef, _, _ = nnx.split(MoEFeedForward(config, rngs=nnx.Rngs(0)), nnx.Param, ...)

      def run(graphdef, params, x, mask, cotangent, rest=rest):
        value_and_grad = jax.value_and_grad(
          lambda p, x: _layer_scalar(nnx.merge(graphdef, p, rest), x, mask, cotangent),
          argnums=(0, 1),
          has_aux=True,
        )
        (value, (y, aux)), grads = value_and_grad(params, x)
        return value, y, aux, grads

      on_mesh = jax.jit(functools.partial(run, graphdef))(
        params,
        jax.device_put(x_BxLxD, batch_sharding(mesh)),
        jax.device_put(mask_BxL, batch_sharding(mesh)),
        jax.device_put(cotangent_BxLxD, batch_sharding(mesh)),
      )
      one = jax.jit(functools.partial(run, one_graphdef))(
        *jax.device_put((params, x_BxLxD, mask_BxL, cotangent_BxLxD), devices[0])
      )
      value, y, aux, grads = on_mesh
      one_value, one_y, one_aux, one_grads = one
      case = {
        "dispatch": dispatch,
        "error_output": relative_error(y, one_y),
        "error_statistics": relative_error(aux, one_aux),
        "error_loss": relative_error(value, one_value),
        "error_gradients": relative_error(nnx.to_pure_dict(grads[0]), nnx.to_pure_dict(one_grads[0])),
        "error_input_gradient": relative_error(grads[1], one_grads[1]),
        "dropped_fraction": float(aux.dropped_fraction),
      }
      case["passed"] = all(v <= TOLERANCE for k, v in case.items() if k.startswith("error"))
      log(f"  expert-parallel over (data {data}, expert {expert}) vs one device, {dispatch}: {case}")
      cases.append(case)
  result = {
    "passed": all(case["passed"] for case in cases),
    "mesh": {"data": data, "expert": expert},
    "device_count": len(devices),
    "tokens": batch * length,
    "d_model": d_model,
    "d_ff": d_ff,
    "num_experts": num_experts,
    "top_k": top_k,
    "dropless_exchange": resolve_exchange("auto") if expert > 1 else None,
    "cases": cases,
  }
  if len(devices) == 1:
    result["note"] = "one device: the layer runs without exchange (no all_to_all / ragged_all_to_all tested)"
  return result


# ---------------------------------------------------------------------------
# 3. The full train step.


def throughput(
  flops_per_step: int, tokens_per_step: int, seconds: float, device_kind: str, device_count: int
) -> dict[str, Any]:
  """tokens/s, model TFLOP/s and MFU of a step of `seconds` on `device_count` devices of `device_kind`.

  MFU is against device_count x the kind's dense bf16 peak; null with an `mfu_note` when the peak is unknown.
  """
  peak = peak_flops(device_kind)
  achieved = flops_per_step / seconds
  result = {
    "tokens_per_step": tokens_per_step,
    "tokens_per_second": tokens_per_step / seconds,
    "flops_per_step": flops_per_step,
    "model_tflops_per_second": achieved / 1e12,
    "device_kind": device_kind,
    "peak_flops_per_device": peak,
    "mfu": None if peak is None else achieved / (peak * device_count),
  }
  if peak is None:
    result["mfu_note"] = (
      f"no dense bf16 peak known for device kind {device_kind!r} (PEAK_FLOPS): MFU not computed"
    )
  return result


def train_config(sizes: Sizes, dispatch: str, num_devices: int):
  """configs/tmoe.py with the check's model, batch and mesh; (config, (mesh.data, mesh.expert))."""
  config = tmoe_config.get_config()
  config.model.update({**sizes.model, "dispatch": dispatch})
  config.train.batch_size = sizes.rows_per_device * num_devices
  data, expert = _mesh_shape(num_devices, sizes.model["num_experts"])
  config.mesh.data, config.mesh.expert = data, expert
  return config, (data, expert)


def _synthetic_batch(rows: int, length: int, vocab_size: int, seed: int) -> dict[str, np.ndarray]:
  """Random int32 source / decoder_input / target [rows, length] without padding (ids 1..V-1)."""
  rng = np.random.default_rng(seed)
  source = rng.integers(1, vocab_size, (rows, length), dtype=np.int32)
  target = rng.integers(1, vocab_size, (rows, length), dtype=np.int32)
  decoder_input = np.concatenate([np.ones((rows, 1), np.int32), target[:, :-1]], axis=1)
  return {"source": source, "decoder_input": decoder_input, "target": target}


def check_train_step(sizes: Sizes, dispatch: str, log: Callable[[str], None]) -> dict[str, Any]:
  devices = jax.devices()
  config, (data, expert) = train_config(sizes, dispatch, len(devices))
  mesh = make_mesh(data, expert, devices)
  built = sharded_train_step(config, vocab_size=sizes.vocab_size, mesh=mesh)
  start = time.perf_counter()
  lowered = built.step.lower(*built.args)
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - start
  state = built.init()
  rows, length = config.train.batch_size, config.model.max_length
  batches = [
    jax.device_put(_synthetic_batch(rows, length, sizes.vocab_size, seed), batch_sharding(mesh))
    for seed in range(2)
  ]
  losses, times, finite = [], [], True
  for i in range(sizes.warmup_steps + sizes.timed_steps):
    step_start = time.perf_counter()
    state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
    if i >= sizes.warmup_steps:
      times.append(time.perf_counter() - step_start)
    losses.append(float(metrics["loss"]))
    finite = finite and bool(metrics["is_finite"])
  seconds = float(np.median(times))
  flops = train_flops_per_step(built.model_config, rows, length, length)
  memory = devices[0].memory_stats() or {}
  result = {
    "passed": finite and all(math.isfinite(loss) for loss in losses),
    "dispatch": dispatch,
    "mesh": {"data": data, "expert": expert},
    "dtype": config.model.dtype,
    **{name: config.model[name] for name in ("d_model", "num_layers", "num_decoder_layers", "d_ff")},
    "num_experts": config.model.num_experts,
    "top_k": config.model.top_k,
    "moe_every": config.model.moe_every,
    "seq_len": length,
    "batch_size": rows,
    "vocab_size": sizes.vocab_size,
    "params": sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(built.state.params)),
    "compile_seconds": compile_seconds,
    "seconds": seconds,
    "min_seconds": min(times),
    "times": times,
    "losses": losses,
    **throughput(flops, rows * 2 * length, seconds, devices[0].device_kind, len(devices)),
    # The device's peak since the process started (so far, over every check), where it reports one.
    "peak_bytes_in_use": memory.get("peak_bytes_in_use"),
    "lowered_ops": ops_found(lowered.as_text()),
    "compiled_ops": ops_found(compiled.as_text() or "", COMPILED_OP_PATTERNS),
  }
  log(
    f"  train step, {dispatch}: {seconds:.3f} s/step (compile {compile_seconds:.0f} s), "
    f"{result['tokens_per_second']:,.0f} tokens/s, MFU "
    + ("n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%")
  )
  return result


# ---------------------------------------------------------------------------
# The run.


def _guarded(name: str, check: Callable[[], dict[str, Any]], log) -> dict[str, Any]:
  """Runs one check; an exception fails it (recorded with its traceback) instead of ending the run."""
  start = time.perf_counter()
  try:
    result = check()
  except Exception as error:  # noqa: BLE001 (recorded in the JSON, and the run fails)
    log(f"  {name} raised {type(error).__name__}: {error}")
    result = {
      "passed": False,
      "error": f"{type(error).__name__}: {error}",
      "traceback": traceback.format_exc(),
    }
  result["check_seconds"] = time.perf_counter() - start
  return result


def run_checks(
  sizes: Sizes, json_path: pathlib.Path, *, dispatches: tuple[str, ...], budget_seconds: float, log
) -> dict[str, Any]:
  """Runs every check, rewriting `json_path` after each; returns the report."""
  start = time.perf_counter()
  devices = jax.devices()
  report: dict[str, Any] = {
    "backend": jax.default_backend(),
    "device_kind": devices[0].device_kind,
    "device_count": len(devices),
    "jax_version": jax.__version__,
    "tiny": sizes is SIZES["tiny"],
    "dropless_method_auto": dropless.resolve_method("auto"),
    "dropless_exchange_auto": resolve_exchange("auto"),
    "tolerance": TOLERANCE,
    "checks": {},
  }

  def save() -> None:
    report["total_seconds"] = time.perf_counter() - start
    report["passed"] = all(check["passed"] for check in report["checks"].values())
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")

  log(f"backend {report['backend']} ({report['device_kind']}) x {report['device_count']}")
  for name, check in (
    ("ragged_dot_vs_block_loop", lambda: check_ragged_dot(sizes, log)),
    ("expert_parallel_vs_one_device", lambda: check_expert_parallel(sizes, log)),
  ):
    report["checks"][name] = _guarded(name, check, log)
    save()
  for dispatch in dispatches:
    name = f"train_step_{dispatch}"
    left = budget_seconds - (time.perf_counter() - start)
    if report["checks"] and left < 0:
      report["checks"][name] = {"passed": False, "skipped": f"over --budget-seconds {budget_seconds:g}"}
    else:
      report["checks"][name] = _guarded(name, functools.partial(check_train_step, sizes, dispatch, log), log)
    save()
  return report


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--json", default=DEFAULT_JSON, help=f"where to write the report (default {DEFAULT_JSON})"
  )
  parser.add_argument("--tiny", action="store_true", help="tiny shapes, for CPU and the tests")
  parser.add_argument(
    "--dispatches", default="capacity,dropless", help="train-step dispatches, comma-separated"
  )
  parser.add_argument(
    "--budget-seconds",
    type=float,
    default=420.0,
    help="train steps that would start after this many seconds are skipped (default 420)",
  )
  args = parser.parse_args(argv)
  dispatches = tuple(d for d in args.dispatches.split(",") if d)
  unknown = sorted(set(dispatches) - {"capacity", "dropless"})
  if unknown:
    parser.error(f"--dispatches: unknown {unknown}; choose from capacity, dropless")
  if jax.default_backend() == "cpu" and not args.tiny:
    parser.error("no GPU or TPU found (backend cpu): the full sizes need one; --tiny runs the CPU version")
  log = lambda message: print(message, flush=True)
  sizes = SIZES["tiny" if args.tiny else "full"]
  report = run_checks(
    sizes, pathlib.Path(args.json), dispatches=dispatches, budget_seconds=args.budget_seconds, log=log
  )
  log(f"{'passed' if report['passed'] else 'FAILED'} in {report['total_seconds']:.0f} s; report: {args.json}")
  return 0 if report["passed"] else 1


if __name__ == "__main__":
  sys.exit(main())
