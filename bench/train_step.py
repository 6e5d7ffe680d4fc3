"""Tokens per second and model FLOPs utilisation of the full Transformer-MoE training step.

Run from the repository root:
  python -m bench.train_step [--json PATH] [--sizes small,medium] [--dtype float32|bfloat16]
                             [--dispatch capacity|dropless] [--repeats 5]

The step is the one `python -m train` runs: `tmoe_jax.transformer.Transformer` and
`seq2seq_steps.jit_train_step` (forward with dropout, cross-entropy plus balancing
and z losses, backward, global-norm clipping and Adam from `configs/tmoe.py`), on
random token batches without padding, source and target of `seq_len` tokens each.
Sizes (`SIZES`): "small" is the default experiment's model (configs/tmoe.py);
"medium" a d_model 512 model that takes a few seconds a step on 2 CPU cores;
"large" the GPU size, d_model 1024, 8 experts top-2, sequence 1024; "tiny" is for tests.
Every second FFN is MoE in all of them.

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
MFU = model FLOPs per second / the device's dense bf16 peak (`PEAK_FLOPS`, matched
on `jax.devices()[0].device_kind`); "n/a" where the peak is unknown (CPU). The peak
is the bf16 one whatever --dtype, so a float32 run's MFU is against bf16 peak too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import jax
import numpy as np
from flax import nnx

from bench.timing import round_robin, summarize, timed
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


def bench_size(name: str, *, dtype: str, dispatch: str, repeats: int, log) -> dict[str, Any]:
  size = SIZES[name]
  config = transformer_config(size, dtype=dtype, dispatch=dispatch)
  step, state = make_train_step(config)
  batch = jax.device_put(synthetic_batch(size))
  num_params = count_params(state.params)

  def one_step():
    nonlocal state
    state, metrics = step(state, batch)
    return state, metrics

  run = lambda: timed(one_step)

  compile_seconds = run()
  warm = run()
  log(f"  {name}: first step (compile) {compile_seconds:.1f} s, second {warm:.2f} s, {num_params:,} params")
  times = round_robin({name: run}, repeats)[name]
  summary = summarize(times)
  tokens_per_step = size.batch_size * 2 * size.seq_len
  flops = train_flops_per_step(config, size.batch_size, size.seq_len, size.seq_len)
  device_kind = jax.devices()[0].device_kind
  peak = peak_flops(device_kind)
  achieved = flops / summary["seconds"]
  return {
    "size": name,
    "backend": jax.default_backend(),
    "device_kind": device_kind,
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
    "tokens_per_step": tokens_per_step,
    **summary,
    "compile_seconds": compile_seconds,
    "tokens_per_second": tokens_per_step / summary["seconds"],
    "flops_per_step": flops,
    "model_tflops_per_second": achieved / 1e12,
    "peak_flops": peak,
    "mfu": None if peak is None else achieved / peak,
  }


def markdown_table(rows: list[dict]) -> str:
  lines = [
    "| size | device | dtype | params | tokens/step | step s | fastest s | tokens/s | model TFLOP/s | MFU |",
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for row in rows:
    mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    lines.append(
      f"| {row['size']} | {row['device_kind']} | {row['dtype']} | {row['params']:,} | "
      f"{row['tokens_per_step']:,} | {row['seconds']:.3f} | {row['min_seconds']:.3f} | "
      f"{row['tokens_per_second']:,.0f} | {row['model_tflops_per_second']:.3f} | {mfu} |"
    )
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", help="write the rows to this file as a JSON list")
  parser.add_argument("--sizes", default="small,medium", help=f"comma-separated, of {tuple(SIZES)}")
  parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
  parser.add_argument("--dispatch", default="capacity", choices=("capacity", "dropless"))
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  names = [n for n in args.sizes.split(",") if n]
  unknown = sorted(set(names) - set(SIZES))
  if unknown or not names:
    parser.error(f"--sizes: unknown {unknown}; choose from {tuple(SIZES)}")
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")

  log = lambda message: print(message, flush=True)
  log(
    f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), {args.dtype}, "
    f"dispatch {args.dispatch}, median of {args.repeats}"
  )
  rows = [
    bench_size(name, dtype=args.dtype, dispatch=args.dispatch, repeats=args.repeats, log=log)
    for name in names
  ]
  print(markdown_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
