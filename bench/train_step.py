"""Tokens per second and model FLOPs utilisation of the full Transformer-MoE training step.

Run from the repository root:
  python -m bench.train_step [--json PATH] [--sizes small,medium] [--dtype float32|bfloat16]
                             [--dispatch dropless|capacity] [--repeats 5]
                             [--gemm-sizes 512,1024,2048] [--no-matmuls]

The step is the one `python -m train` runs: `tmoe_jax.transformer.Transformer` and
`seq2seq_steps.jit_train_step` (forward with dropout, cross-entropy plus balancing
and z losses, backward, global-norm clipping and Adam from `configs/tmoe.py`), on
random token batches without padding, source and target of `seq_len` tokens each.
Sizes (`SIZES`): "small" is the default experiment's model (configs/tmoe.py);
"medium" a d_model 512 model that takes a few seconds a step on 2 CPU cores;
"large" the GPU size, d_model 1024, 8 experts top-2, sequence 1024; "tiny" is for tests.
Every second FFN is MoE in all of them. The MoE dispatch is `model.dispatch=dropless` unless
--dispatch says otherwise: the fastest on CPU, where it runs the block loop (`ragged_dot` on
GPU/TPU); `transformer_config` itself keeps "capacity" for its other callers.

Tokens per second count source and target tokens: B * (S + L) per step.

Model FLOPs (`train_flops_per_step`) count matmuls only, as in PaLM's MFU (biases,
norms, softmax, embedding lookups and the optimizer are left out). A weight matrix of
n entries costs each token that passes through it 2n FLOPs forward and 4n backward
(the gradients of its input and of the weight): 6n. Each token is charged the weights
it actually passes through, with D d_model, F d_ff, E experts, K top-k, V vocabulary:
  source token: per encoder layer 4 D^2 (Q, K, V, O projections) + its FFN; per
    decoder layer 2 D^2 (the cross-attention K and V of the encoder output);
  target token: per decoder layer 4 D^2 (self-attention) + 2 D^2 (cross-attention Q
    and O) + its FFN; and D V for the output logits;
  FFN: dense 2 D F; MoE D E (router) + K * 2 D F (K * 3 D F for gated experts) plus
    num_shared_experts * 2 D F: the active weights, not the capacity-padded buffers
    the `capacity` dispatch also computes.
Attention: Q K^T and A V cost 2 * Q_len * K_len * D each forward, so 12 * Q_len *
K_len * D forward + backward per layer, i.e. 12 * K_len * D per query token: 12 S D
per source token per encoder layer, 12 (L + S) D per target token per decoder layer
(self + cross). The causal mask does not halve it: the full L x L scores are computed.
`mfu` = model FLOPs per second / the device's dense bf16 peak (`PEAK_FLOPS`, matched
on `jax.devices()[0].device_kind`); "n/a" where the peak is unknown (CPU). The peak
is the bf16 one whatever --dtype, so a float32 run's MFU is against bf16 peak too.

Measured peak, for every device (the only one on CPU): square [n, n] @ [n, n] matmuls in
--dtype (n in --gemm-sizes), timed in turns with the steps so that load from other jobs
hits both alike; each timing runs 2 x max(n)^3 FLOPs (several calls of the smaller
sizes). `gemm_peak_flops` = the fastest timing of any size, in FLOP/s. Against it:
  gemm_mfu: model FLOPs / median step seconds / gemm_peak_flops (the MFU column);
  gemm_mfu_fastest: the same with the fastest step;
  gemm_mfu_cpu_time: model FLOPs per CPU second of the step (this process, all threads,
    median) / the GEMM's best FLOPs per CPU second: it moves less than the wall-clock
    ones when other jobs take cores away (each side only counts the CPU it got);
  matmul_seconds: the step's matmuls alone (`step_matmuls`: every weight and attention
    matmul with its shape, forward and both backward products, experts given T K / E rows
    each), each shape timed by itself in the same turns, count x its fastest timing; its
    `matmul_gemm_mfu` (and `_cpu_time`) is the ceiling the step's MFU would reach if
    nothing but its matmuls took time (the shapes' own efficiency against the peak).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.timing import round_robin, summarize
from configs import tmoe as tmoe_config
from tmoe_jax.models.transformer import Transformer, TransformerConfig
from tmoe_jax.tasks import seq2seq as seq2seq_steps
from tmoe_jax.training.optimizer import make_optimizer, make_schedule
from tmoe_jax.training.state import TrainState, count_params, create_train_state
from tmoe_jax.training.steps import LossWeights
from tmoe_jax.validation import DTYPES


@dataclasses.dataclass(frozen=True)
class BenchSize:
  """One benchmark model and batch: `model` holds TransformerConfig fields."""

  batch_size: int
  seq_len: int  # source and target length
  vocab_size: int
  model: dict[str, Any]


SIZES = {
  "tiny": BenchSize(
    batch_size=2,
    seq_len=8,
    vocab_size=16,
    model={
      "d_model": 16,
      "num_heads": 2,
      "num_layers": 1,
      "num_decoder_layers": 1,
      "d_ff": 32,
      "num_experts": 4,
      "moe_every": 1,
    },
  ),
  "small": BenchSize(
    batch_size=32,
    seq_len=32,
    vocab_size=64,
    model={
      "d_model": 128,
      "num_heads": 4,
      "num_layers": 2,
      "num_decoder_layers": 2,
      "d_ff": 256,
      "num_experts": 4,
    },
  ),
  "medium": BenchSize(
    batch_size=8,
    seq_len=128,
    vocab_size=1024,
    model={
      "d_model": 512,
      "num_heads": 8,
      "num_layers": 4,
      "num_decoder_layers": 4,
      "d_ff": 1024,
      "num_experts": 8,
    },
  ),
  "large": BenchSize(
    batch_size=8,
    seq_len=1024,
    vocab_size=32768,
    model={
      "d_model": 1024,
      "num_heads": 16,
      "num_layers": 6,
      "num_decoder_layers": 6,
      "d_ff": 4096,
      "num_experts": 8,
    },
  ),
}

# Dense bf16 peak FLOP/s by a substring of `device_kind`; first match wins.
PEAK_FLOPS = (
  ("H100", 989e12),
  ("H200", 989e12),
  ("A100", 312e12),
  ("TPU v4", 275e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5e", 197e12),
)


# `python -m bench.train_step`'s MoE dispatch: dropless is the fastest on CPU (the block loop);
# `transformer_config` keeps "capacity" for its other callers (bench.memory).
DEFAULT_DISPATCH = "dropless"
# The square matmuls timed for the dense-GEMM peak (each timing runs 2 x the largest^3 FLOPs).
GEMM_SIZES = (512, 1024, 2048)


def peak_flops(device_kind: str) -> float | None:
  """The dense bf16 peak FLOP/s of a device kind, None when unknown (e.g. CPU)."""
  for name, peak in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None


def transformer_config(
  size: BenchSize, *, dtype: str = "float32", dispatch: str = "capacity", **overrides
) -> TransformerConfig:
  """The size's model: top-2, every second FFN MoE, else TransformerConfig's defaults."""
  fields = {
    "top_k": 2,
    "moe_every": 2,
    "max_length": size.seq_len,
    "dispatch": dispatch,
    "dtype": DTYPES[dtype],
  }
  return TransformerConfig.from_flat(vocab_size=size.vocab_size, **{**fields, **size.model, **overrides})


def ffn_weights_per_token(config: TransformerConfig, layer_index: int) -> int:
  """Matmul weight entries one token passes through in this layer's FFN block."""
  if not config.is_moe_layer(layer_index):
    return 2 * config.d_model * config.d_ff
  moe = config.moe
  if config.moe_layer != "moe" or moe.router != "top_k":
    raise ValueError(f"FLOPs are counted for moe_layer 'moe' with router 'top_k', got {config}")
  matrices = {"mlp": 2, "gated": 3}[moe.expert_type]
  return (
    config.d_model * moe.num_experts
    + moe.top_k * matrices * config.d_model * config.d_ff
    + moe.num_shared_experts * 2 * config.d_model * config.d_ff
  )


def train_flops_per_step(config: TransformerConfig, batch_size: int, source_len: int, target_len: int) -> int:
  """Model FLOPs of one forward + backward over a [batch, source_len] -> [batch, target_len] batch.

  See the module docstring for the derivation.
  """
  d = config.d_model
  source_weights = sum(4 * d * d + ffn_weights_per_token(config, i) for i in range(config.num_layers))
  source_weights += config.num_decoder_layers * 2 * d * d
  target_weights = sum(6 * d * d + ffn_weights_per_token(config, i) for i in range(config.num_decoder_layers))
  target_weights += d * config.vocab_size
  source_attention = 12 * config.num_layers * source_len * d
  target_attention = 12 * config.num_decoder_layers * (target_len + source_len) * d
  per_source_token = 6 * source_weights + source_attention
  per_target_token = 6 * target_weights + target_attention
  return batch_size * (source_len * per_source_token + target_len * per_target_token)


def synthetic_batch(size: BenchSize, seed: int = 0) -> dict[str, np.ndarray]:
  """Random int32 source / decoder_input / target [B, seq_len], no padding (ids 1..V-1)."""
  rng = np.random.default_rng(seed)
  shape = (size.batch_size, size.seq_len)
  source = rng.integers(1, size.vocab_size, shape, dtype=np.int32)
  target = rng.integers(1, size.vocab_size, shape, dtype=np.int32)
  # Teacher forcing: the target shifted right behind a BOS-like first id.
  decoder_input = np.concatenate([np.ones((size.batch_size, 1), np.int32), target[:, :-1]], axis=1)
  return {"source": source, "decoder_input": decoder_input, "target": target}


def make_train_step(config: TransformerConfig, *, abstract: bool = False):
  """(jitted train step, initial TrainState) with configs/tmoe.py's optimizer and loss weights.

  `abstract=True` gives the state as ShapeDtypeStructs (nothing allocated), enough to
  `.lower(...)` the step.
  """
  experiment = tmoe_config.get_config()
  train_config = experiment.train
  optimizer = make_optimizer(train_config)

  def init() -> tuple[nnx.GraphDef, TrainState]:
    return create_train_state(Transformer(config, rngs=nnx.Rngs(params=0)), optimizer, seed=0)

  if abstract:
    graphdefs = []

    def init_state():
      graphdef, state = init()
      graphdefs.append(graphdef)  # static: safe to take out of the trace
      return state

    state = jax.eval_shape(init_state)
    graphdef = graphdefs[0]
  else:
    graphdef, state = init()
  step = seq2seq_steps.jit_train_step(
    graphdef, optimizer, make_schedule(train_config), LossWeights.from_config(experiment.model)
  )
  return step, state


class Runner:
  """One timed case for `round_robin`: `calls` back-to-back calls of `fn` per timing.

  Returns wall seconds per call and keeps the process CPU seconds per call (all
  threads; `time.process_time`) in `cpu_times`: CPU time counts only what this
  process ran, so it moves less than wall time when other jobs share the cores.
  """

  def __init__(self, fn, calls: int = 1):
    self.fn = fn
    self.calls = calls
    self.cpu_times: list[float] = []

  def __call__(self) -> float:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(self.calls):
      out = self.fn()
    jax.block_until_ready(out)
    self.cpu_times.append((time.process_time() - cpu) / self.calls)
    return (time.perf_counter() - wall) / self.calls


def gemm_runner(n: int, dtype: str, flops_per_timing: int) -> Runner:
  """A jitted [n, n] @ [n, n] matmul in `dtype` (2 n^3 FLOPs a call), called enough times per timing
  for `flops_per_timing` FLOPs, so that the timings of every size span about as long."""
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.random.normal(key, (n, n), DTYPES[dtype]) for key in keys)
  matmul = jax.jit(jnp.matmul).lower(a, b).compile()
  jax.block_until_ready(matmul(a, b))
  return Runner(lambda: matmul(a, b), calls=max(1, flops_per_timing // (2 * n**3)))


@dataclasses.dataclass(frozen=True)
class MatmulUse:
  """`count` weight (or attention) matmuls of [batch, m, k] x [batch, k, n] in the forward pass; each
  also costs two backward matmuls of the same FLOPs (the input's and the weight's gradient)."""

  batch: int
  m: int
  k: int
  n: int
  count: int

  @property
  def flops(self) -> int:
    """Forward + backward FLOPs of all `count` uses: 3 matmuls of 2 b m k n each."""
    return 6 * self.count * self.batch * self.m * self.k * self.n


def step_matmuls(
  config: TransformerConfig, batch_size: int, source_len: int, target_len: int
) -> list[MatmulUse]:
  """The model matmuls of one step, as shapes: what `train_flops_per_step` counts, with the routed
  tokens spread evenly over the experts (T K / E rows each, rounded up). Uses of one shape are merged."""
  d, h = config.d_model, config.num_heads
  source, target = batch_size * source_len, batch_size * target_len
  counts: dict[tuple[int, int, int, int], int] = {}

  def add(m, k, n, count=1, batch=1):
    counts[(batch, m, k, n)] = counts.get((batch, m, k, n), 0) + count

  def ffn(tokens, layer_index):
    if not config.is_moe_layer(layer_index):
      add(tokens, d, config.d_ff)
      add(tokens, config.d_ff, d)
      return
    ffn_weights_per_token(config, layer_index)  # raises for layers it does not count
    moe = config.moe
    add(tokens, d, moe.num_experts)  # router
    rows = -(-tokens * moe.top_k // moe.num_experts)
    inputs = {"mlp": 1, "gated": 2}[moe.expert_type]
    add(rows, d, config.d_ff, moe.num_experts * inputs)
    add(rows, config.d_ff, d, moe.num_experts)
    if moe.num_shared_experts:
      add(tokens, d, moe.num_shared_experts * config.d_ff)
      add(tokens, moe.num_shared_experts * config.d_ff, d)

  def attention(queries, keys):
    head = d // h
    add(queries, head, keys, batch=batch_size * h)  # Q K^T
    add(queries, keys, head, batch=batch_size * h)  # A V

  for i in range(config.num_layers):
    add(source, d, d, 4)
    attention(source_len, source_len)
    ffn(source, i)
  for i in range(config.num_decoder_layers):
    add(target, d, d, 4 + 2)  # self-attention Q K V O, cross-attention Q O
    add(source, d, d, 2)  # cross-attention K V of the encoder output
    attention(target_len, target_len)
    attention(target_len, source_len)
    ffn(target, i)
  add(target, d, config.vocab_size)
  return [MatmulUse(b, m, k, n, count) for (b, m, k, n), count in counts.items()]


def matmul_runner(use: MatmulUse, dtype: str, flops_per_timing: int) -> Runner:
  """One forward and two backward matmuls of `use`'s shape, jitted (`count` is left to the caller),
  called enough times per timing for about `flops_per_timing` FLOPs (at most 1000 calls)."""
  shapes = ((use.batch, use.m, use.k), (use.batch, use.k, use.n), (use.batch, use.m, use.n))
  x, w, dy = (jnp.ones(shape, DTYPES[dtype]) for shape in shapes)

  def forward_backward(x, w, dy):
    return (
      jnp.einsum("bmk,bkn->bmn", x, w),
      jnp.einsum("bmn,bkn->bmk", dy, w),
      jnp.einsum("bmk,bmn->bkn", x, dy),
    )

  compiled = jax.jit(forward_backward).lower(x, w, dy).compile()
  jax.block_until_ready(compiled(x, w, dy))
  calls = min(1000, max(1, flops_per_timing * use.count // use.flops))
  return Runner(lambda: compiled(x, w, dy), calls=calls)


def prepare_size(
  name: str, *, dtype: str, dispatch: str, log
) -> tuple[TransformerConfig, Runner, dict[str, Any]]:
  """Compiles the size's step and runs it once more: (config, a Runner of one step, the row's fixed fields)."""
  size = SIZES[name]
  config = transformer_config(size, dtype=dtype, dispatch=dispatch)
  step, state = make_train_step(config)
  batch = jax.device_put(synthetic_batch(size))
  num_params = count_params(state.params)

  def one_step():
    nonlocal state
    state, metrics = step(state, batch)
    return state, metrics

  run = Runner(one_step)
  compile_seconds = run()
  warm = run()
  run.cpu_times.clear()
  log(f"  {name}: first step (compile) {compile_seconds:.1f} s, second {warm:.2f} s, {num_params:,} params")
  fields = {
    "size": name,
    "backend": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
    "dtype": dtype,
    "dispatch": dispatch,
    "batch_size": size.batch_size,
    "seq_len": size.seq_len,
    "vocab_size": size.vocab_size,
    **{key: getattr(config, key) for key in ("d_model", "num_layers", "num_decoder_layers", "d_ff")},
    "num_experts": config.moe.num_experts,
    "top_k": config.moe.top_k,
    "moe_every": config.moe_every,
    "params": num_params,
    "compile_seconds": compile_seconds,
  }
  return config, run, fields


def size_row(
  fields: dict[str, Any],
  config: TransformerConfig,
  times: list[float],
  cpu_times: list[float],
  gemm: dict[str, Any],
  matmuls: tuple[float, float] | None,
) -> dict[str, Any]:
  """A JSON row: the step's timings, model FLOPs and utilisation against the table's and the GEMM peak."""
  size = SIZES[fields["size"]]
  summary = summarize(times)
  tokens_per_step = size.batch_size * 2 * size.seq_len
  flops = train_flops_per_step(config, size.batch_size, size.seq_len, size.seq_len)
  peak = peak_flops(fields["device_kind"])
  achieved = flops / summary["seconds"]
  cpu_seconds = statistics.median(cpu_times)
  gemm_peak = gemm["peak_flops"]
  return {
    **fields,
    "tokens_per_step": tokens_per_step,
    **summary,
    "tokens_per_second": tokens_per_step / summary["seconds"],
    "flops_per_step": flops,
    "model_tflops_per_second": achieved / 1e12,
    "peak_flops": peak,
    "mfu": None if peak is None else achieved / peak,
    "gemm_peak_flops": gemm_peak,
    "gemm_size": gemm["size"],
    "gemm_flops_by_size": gemm["flops_by_size"],
    "gemm_mfu": achieved / gemm_peak,
    "gemm_mfu_fastest": flops / summary["min_seconds"] / gemm_peak,
    "cpu_seconds": cpu_seconds,
    "gemm_mfu_cpu_time": (flops / cpu_seconds) / gemm["peak_flops_per_cpu_second"],
    "matmul_seconds": None if matmuls is None else matmuls[0],
    "matmul_cpu_seconds": None if matmuls is None else matmuls[1],
    "matmul_share": None if matmuls is None else matmuls[0] / summary["seconds"],
    "matmul_gemm_mfu": None if matmuls is None else flops / matmuls[0] / gemm_peak,
    "matmul_gemm_mfu_cpu_time": (
      None if matmuls is None else flops / matmuls[1] / gemm["peak_flops_per_cpu_second"]
    ),
    "load_average": gemm["load_average"],
  }


def gemm_peak(runners: dict[int, Runner], times: dict[str, list[float]], load_average) -> dict[str, Any]:
  """The dense-GEMM peak of this run: the best FLOP/s of any size's fastest timing."""
  by_size = {n: 2 * n**3 / min(times[f"gemm{n}"]) for n in runners}
  best = max(by_size, key=by_size.get)
  return {
    "peak_flops": by_size[best],
    "size": best,
    "flops_by_size": {str(n): flops for n, flops in by_size.items()},
    "peak_flops_per_cpu_second": max(2 * n**3 / min(runner.cpu_times) for n, runner in runners.items()),
    "load_average": load_average,
  }


def markdown_table(rows: list[dict]) -> str:
  lines = [
    (
      "| size | device | dtype | dispatch | params | tokens/step | step s | fastest s | tokens/s | "
      "model GFLOP/s | GEMM peak GFLOP/s | MFU | MFU (CPU time) | matmuls alone s | ceiling | "
      "ceiling (CPU time) | MFU (bf16 peak) |"
    ),
    "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  percent = lambda value: "n/a" if value is None else f"{100 * value:.1f}%"
  for row in rows:
    matmuls = "n/a" if row["matmul_seconds"] is None else f"{row['matmul_seconds']:.3f}"
    lines.append(
      f"| {row['size']} | {row['device_kind']} | {row['dtype']} | {row['dispatch']} | {row['params']:,} | "
      f"{row['tokens_per_step']:,} | {row['seconds']:.3f} | {row['min_seconds']:.3f} | "
      f"{row['tokens_per_second']:,.0f} | {1e3 * row['model_tflops_per_second']:.1f} | "
      f"{row['gemm_peak_flops'] / 1e9:.1f} | {percent(row['gemm_mfu'])} | {percent(row['gemm_mfu_cpu_time'])} | "
      f"{matmuls} | {percent(row['matmul_gemm_mfu'])} | {percent(row['matmul_gemm_mfu_cpu_time'])} | "
      f"{percent(row['mfu'])} |"
    )
  return "\n".join(lines)


def _int_list(text: str) -> list[int]:
  return [int(part) for part in text.split(",") if part]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", help="write the rows to this file as a JSON list")
  parser.add_argument("--sizes", default="small,medium", help=f"comma-separated, of {tuple(SIZES)}")
  parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
  parser.add_argument(
    "--dispatch",
    default=DEFAULT_DISPATCH,
    choices=("capacity", "dropless"),
    help="MoE dispatch (model.dispatch); dropless runs the block loop on CPU, ragged_dot on GPU/TPU",
  )
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--gemm-sizes",
    default=",".join(map(str, GEMM_SIZES)),
    help="n of the [n, n] @ [n, n] matmuls timed for the peak (the best counts)",
  )
  parser.add_argument(
    "--no-matmuls", action="store_true", help="skip timing the step's matmuls alone (`matmul_seconds`)"
  )
  args = parser.parse_args(argv)
  names = [n for n in args.sizes.split(",") if n]
  unknown = sorted(set(names) - set(SIZES))
  if unknown or not names:
    parser.error(f"--sizes: unknown {unknown}; choose from {tuple(SIZES)}")
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  try:
    gemm_sizes = _int_list(args.gemm_sizes)
  except ValueError:
    gemm_sizes = []
  if not gemm_sizes or min(gemm_sizes) < 1:
    parser.error(f"--gemm-sizes: positive integers, got {args.gemm_sizes!r}")

  log = lambda message: print(message, flush=True)
  load_start = os.getloadavg()[0]
  log(
    f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), {args.dtype}, "
    f"dispatch {args.dispatch}, median of {args.repeats}, load average {load_start:.1f}"
  )
  prepared = {name: prepare_size(name, dtype=args.dtype, dispatch=args.dispatch, log=log) for name in names}
  flops_per_timing = 2 * max(gemm_sizes) ** 3
  gemms = {n: gemm_runner(n, args.dtype, flops_per_timing) for n in gemm_sizes}
  matmul_uses = {}  # "size/matmul<i>" -> (size name, MatmulUse, Runner)
  if not args.no_matmuls:
    for name, (config, _, _) in prepared.items():
      size = SIZES[name]
      for i, use in enumerate(step_matmuls(config, size.batch_size, size.seq_len, size.seq_len)):
        matmul_uses[f"{name}/matmul{i}"] = (name, use, matmul_runner(use, args.dtype, flops_per_timing))
  # Steps, GEMMs and the steps' matmuls take turns, so that load from other processes hits them alike.
  runners = {name: run for name, (_, run, _) in prepared.items()}
  runners.update({f"gemm{n}": runner for n, runner in gemms.items()})
  runners.update({key: runner for key, (_, _, runner) in matmul_uses.items()})
  times = round_robin(runners, args.repeats)
  gemm = gemm_peak(gemms, times, [load_start, os.getloadavg()[0]])
  log(
    f"GEMM peak {gemm['peak_flops'] / 1e9:.1f} GFLOP/s ({gemm['size']}^3 matmul, fastest of {args.repeats}; "
    + ", ".join(f"{n}: {flops / 1e9:.1f}" for n, flops in gemm["flops_by_size"].items())
    + f"), load average {gemm['load_average'][1]:.1f}"
  )
  rows = []
  for name, (config, run, fields) in prepared.items():
    # The step's matmuls alone: count x the fastest timing of each shape (the peak is a fastest timing too).
    matmuls = None
    if not args.no_matmuls:
      mine = [
        (use, runner, times[key])
        for key, (size_name, use, runner) in matmul_uses.items()
        if size_name == name
      ]
      matmuls = (
        sum(use.count * min(wall) for use, _, wall in mine),
        sum(use.count * min(runner.cpu_times) for use, runner, _ in mine),
      )
    rows.append(size_row(fields, config, times[name], run.cpu_times, gemm, matmuls))
  print(markdown_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
