"""Train-step time of PyTorch MoE layers as most PyTorch code writes them, against ours in JAX.

Run from the repository root (needs the optional `torch`; a CPU-only build is enough):
  python -m bench.vs_pytorch [--json PATH] [--num-experts 8,64] [--tokens 8192] [--repeats 5]
                             [--jax-dispatch dropless_block_loop] [--torch-adam default,fused]
                             [--no-every-expert]

One layer at d_model 512, d_ff 1024, top-2, float32, tokens x d_model input, loss
mean((y - target)^2); a train step is forward, backward (with the input's gradient,
as the layer below would need it) and an Adam update of every parameter. Torch's
Adam runs as `--torch-adam` lists: "default" is `torch.optim.Adam` as most code calls
it, which on CPU updates one tensor after another; "fused" is `fused=True`, one
kernel for all (the loop and dense layers run once per variant, every_expert with
the first only). Layers (every_expert is timed last, see below):
  torch loop_over_experts  linear gate, softmax, top-k (gates renormalised to sum to 1),
                           then for each expert: its tokens by `nonzero` on the top-k
                           indices, the expert MLP on them, `index_add_` of the gated
                           output back (the Mixtral / most-PyTorch-code layer);
  torch every_expert       every expert on every token, softmax-weighted sum;
  torch dense_ffn          a dense FFN of width d_ff * k: the same FLOPs per token;
  jax <dispatch>           ours, from `bench.moe_layer` (default the dropless block loop,
                           the fastest top-2 dispatch there on CPU), and its dense_ffn.
The MoE layers share the JAX layer's initial weights, so all route alike.

Everything runs in one process, torch with as many threads as XLA:CPU uses (all
cores). Each case is compiled / warmed up once, then timed --repeats times taking
turns (`bench.timing.round_robin`); a case whose first timed step took over
`SLOW_SECONDS` (60 s) is timed once. The torch every_expert layer is warmed up and
timed only after all other cases at all expert counts: every torch loop-layer step
that ran after it in the same process took 4-7x longer (5 s -> 23-36 s at E=64;
presumably the allocator, after its E-fold activations were freed).
`torch_loop_ratio` is the median step time of the torch loop layer with the first
--torch-adam over the row's: how many times faster than that PyTorch loop layer a
row is. Rows also keep every run (`times`).
Exits with code 2 and one line saying how to install torch when it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from bench import moe_layer
from bench.timing import round_robin, summarize, timed
from tmoe_jax.moe.layer import MoEFeedForward
from tmoe_jax.moe.settings import MoEConfig

try:
  import torch
  import torch.nn.functional as F
except ImportError:
  torch = None

INSTALL_HINT = (
  "bench.vs_pytorch needs PyTorch, an optional extra: python -m pip install torch "
  "(a CPU-only build is enough)"
)
# Longer than bench.moe_layer's: the torch loop layer takes tens of seconds at E=64 and
# its ratio is the point, so it gets several runs.
SLOW_SECONDS = 60.0
# --torch-adam -> torch.optim.Adam keyword arguments.
TORCH_ADAM = {"default": {}, "fused": {"fused": True}}
JAX_DISPATCHES = tuple(moe_layer.BUILDERS)
# The base class exists only with torch installed; the module must import without it.
_Module = torch.nn.Module if torch is not None else object


class TorchLoopMoE(_Module):
  """Top-k MoE: a Python loop over experts, each on the tokens routed to it."""

  def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int):
    super().__init__()
    self.top_k = top_k
    self.gate = torch.nn.Linear(d_model, num_experts, bias=False)
    self.experts = torch.nn.ModuleList(
      torch.nn.Sequential(torch.nn.Linear(d_model, d_ff), torch.nn.ReLU(), torch.nn.Linear(d_ff, d_model))
      for _ in range(num_experts)
    )

  def forward(self, x_TxD):
    probs_TxE = F.softmax(self.gate(x_TxD), dim=-1)
    gates_TxK, experts_TxK = torch.topk(probs_TxE, self.top_k, dim=-1)
    gates_TxK = gates_TxK / gates_TxK.sum(dim=-1, keepdim=True)
    y_TxD = torch.zeros_like(x_TxD)
    for e, expert in enumerate(self.experts):
      tokens_N, choices_N = torch.nonzero(experts_TxK == e, as_tuple=True)
      if tokens_N.numel() == 0:
        continue
      y_NxD = expert(x_TxD[tokens_N]) * gates_TxK[tokens_N, choices_N, None]
      y_TxD.index_add_(0, tokens_N, y_NxD)
    return y_TxD


class TorchEveryExpertMoE(TorchLoopMoE):
  """Every expert on every token, outputs weighted by the full softmax (E/k times the FLOPs)."""

  def forward(self, x_TxD):
    probs_TxE = F.softmax(self.gate(x_TxD), dim=-1)
    y_TxExD = torch.stack([expert(x_TxD) for expert in self.experts], dim=1)
    return torch.einsum("ted,te->td", y_TxExD, probs_TxE)


def torch_dense_ffn(d_model: int, d_hidden: int):
  return torch.nn.Sequential(
    torch.nn.Linear(d_model, d_hidden), torch.nn.ReLU(), torch.nn.Linear(d_hidden, d_model)
  )


def load_jax_weights(layer: TorchLoopMoE, params: dict[str, jax.Array]) -> None:
  """Copies `bench.moe_layer`'s expert params (router_DxE, w_in_ExDxF, ...) into `layer`."""

  def tensor(array):
    return torch.from_numpy(jax.device_get(array).copy())

  with torch.no_grad():
    layer.gate.weight.copy_(tensor(params["router_DxE"]).T)
    for e, expert in enumerate(layer.experts):
      expert[0].weight.copy_(tensor(params["w_in_ExDxF"][e]).T)
      expert[0].bias.copy_(tensor(params["b_in_ExF"][e]))
      expert[2].weight.copy_(tensor(params["w_out_ExFxD"][e]).T)
      expert[2].bias.copy_(tensor(params["b_out_ExD"][e]))


def torch_step_runner(module, x, target, *, adam: str = "default"):
  """A callable running one train step of `module` (fwd, bwd incl. d loss/dx, Adam); returns seconds."""
  x = x.clone().requires_grad_(True)
  optimizer = torch.optim.Adam(module.parameters(), lr=moe_layer.LEARNING_RATE, **TORCH_ADAM[adam])

  def step():
    optimizer.zero_grad(set_to_none=True)
    x.grad = None
    loss = F.mse_loss(module(x), target)
    loss.backward()
    optimizer.step()
    return loss.item()

  return lambda: timed(step)


def jax_step_runner(dispatch: str, params, apply, x, target):
  case = moe_layer.make_case(dispatch, params, apply)
  return lambda: case.run_step(x, target)


def _inputs(num_experts: int, tokens: int):
  """x and target [tokens, d_model] (JAX and torch copies) and the JAX layer whose weights all share."""
  key_x, key_t = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, (tokens, moe_layer.D_MODEL), jnp.float32)
  target = jax.random.normal(key_t, (tokens, moe_layer.D_MODEL), jnp.float32)
  x_torch, target_torch = (torch.from_numpy(jax.device_get(a).copy()) for a in (x, target))
  config = MoEConfig(
    num_experts=num_experts,
    top_k=moe_layer.TOP_K,
    d_model=moe_layer.D_MODEL,
    d_ff=moe_layer.D_FF,
    capacity_factor=moe_layer.CAPACITY_FACTOR,
  )
  return x, target, x_torch, target_torch, MoEFeedForward(config, rngs=nnx.Rngs(0))


def time_main_cases(
  num_experts: int, tokens: int, repeats: int, jax_dispatch: str, log, *, torch_adams: list[str]
) -> dict[tuple[str, str, str], list[float]]:
  """(framework, layer, optimizer) -> step times of the loop and dense layers in torch, ours in JAX."""
  d_model, d_ff, top_k = moe_layer.D_MODEL, moe_layer.D_FF, moe_layer.TOP_K
  x, target, x_torch, target_torch, layer = _inputs(num_experts, tokens)
  runners = {}
  torch.manual_seed(0)
  for adam in torch_adams:
    loop = TorchLoopMoE(d_model, d_ff, num_experts, top_k)
    load_jax_weights(loop, moe_layer._expert_params(layer))
    runners["torch", "loop_over_experts", f"adam_{adam}"] = torch_step_runner(
      loop, x_torch, target_torch, adam=adam
    )
  for adam in torch_adams:
    dense = torch_dense_ffn(d_model, d_ff * top_k)
    runners["torch", "dense_ffn", f"adam_{adam}"] = torch_step_runner(dense, x_torch, target_torch, adam=adam)
  params, apply = moe_layer.BUILDERS[jax_dispatch](layer)
  runners["jax", jax_dispatch, "optax_adam"] = jax_step_runner(jax_dispatch, params, apply, x, target)
  dense_params, dense_apply = moe_layer.dense_ffn(jax.random.key(2))
  runners["jax", "dense_ffn", "optax_adam"] = jax_step_runner(
    "dense_ffn", dense_params, dense_apply, x, target
  )
  for key, run in runners.items():
    log(f"  E={num_experts} {' '.join(key)}: warm-up (compile + one step) {run():.1f} s")
  return round_robin(runners, repeats, slow_seconds=SLOW_SECONDS)


def time_every_expert(
  num_experts: int, tokens: int, repeats: int, log, *, adam: str
) -> dict[tuple[str, str, str], list[float]]:
  """Step times of the torch every-expert layer, keyed as in `time_main_cases`."""
  _, _, x_torch, target_torch, layer = _inputs(num_experts, tokens)
  every = TorchEveryExpertMoE(moe_layer.D_MODEL, moe_layer.D_FF, num_experts, moe_layer.TOP_K)
  load_jax_weights(every, moe_layer._expert_params(layer))
  key = ("torch", "every_expert", f"adam_{adam}")
  run = torch_step_runner(every, x_torch, target_torch, adam=adam)
  log(f"  E={num_experts} {' '.join(key)}: warm-up (one step) {run():.1f} s")
  return round_robin({key: run}, repeats, slow_seconds=SLOW_SECONDS)


def rows_of(times, num_experts: int, tokens: int, reference) -> list[dict]:
  """JSON rows of one expert count; `torch_loop_ratio` is the `reference` case's median over the row's."""
  reference_seconds = summarize(times[reference])["seconds"]
  rows = []
  for (framework, name, optimizer), case_times in times.items():
    summary = summarize(case_times)
    rows.append(
      {
        "framework": framework,
        "layer": name,
        "optimizer": optimizer,
        "num_experts": num_experts,
        "top_k": moe_layer.TOP_K,
        "tokens": tokens,
        **summary,
        "torch_loop_ratio": reference_seconds / summary["seconds"],
      }
    )
  return rows


def markdown_table(rows: list[dict]) -> str:
  lines = [
    "| framework | layer | optimizer | experts | train step s | fastest s | torch loop / this |",
    "|---|---|---|---:|---:|---:|---:|",
  ]
  for row in rows:
    lines.append(
      f"| {row['framework']} | {row['layer']} | {row['optimizer']} | {row['num_experts']} | {row['seconds']:.3f} | "
      f"{row['min_seconds']:.3f} | {row['torch_loop_ratio']:.2f} |"
    )
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", help="write the rows to this file as a JSON list")
  parser.add_argument("--num-experts", default="8,64", help="comma-separated expert counts")
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--jax-dispatch", default="dropless_block_loop", choices=JAX_DISPATCHES)
  parser.add_argument(
    "--torch-adam",
    default="default,fused",
    help=f"comma-separated torch.optim.Adam variants, of {tuple(TORCH_ADAM)}; the first is the reference",
  )
  parser.add_argument(
    "--every-expert",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="time the torch every-expert layer (the slowest case: E/k times the FLOPs)",
  )
  args = parser.parse_args(argv)
  num_experts_list = [int(n) for n in args.num_experts.split(",") if n]
  torch_adams = [a for a in args.torch_adam.split(",") if a]
  if not torch_adams or not set(torch_adams) <= set(TORCH_ADAM):
    parser.error(
      f"--torch-adam: expected a comma-separated list of {tuple(TORCH_ADAM)}, got {args.torch_adam!r}"
    )
  if args.repeats < 1 or args.tokens < 1 or any(n < moe_layer.TOP_K for n in num_experts_list):
    parser.error(f"--repeats and --tokens must be >= 1 and every --num-experts >= top_k = {moe_layer.TOP_K}")
  if torch is None:
    print(INSTALL_HINT, file=sys.stderr)
    return 2

  # XLA:CPU runs its matmuls on every core; give torch the same.
  threads = os.cpu_count() or 1
  torch.set_num_threads(threads)
  log = lambda message: print(message, flush=True)
  log(
    f"torch {torch.__version__} ({threads} threads), jax {jax.__version__} on {jax.default_backend()}; "
    f"tokens {args.tokens}, d_model {moe_layer.D_MODEL}, d_ff {moe_layer.D_FF}, top-{moe_layer.TOP_K}, "
    f"float32, median of {args.repeats}"
  )
  times = {
    num_experts: time_main_cases(
      num_experts, args.tokens, args.repeats, args.jax_dispatch, log, torch_adams=torch_adams
    )
    for num_experts in num_experts_list
  }
  if args.every_expert:
    # Last of all (see the module docstring: it slows what runs after it in this process).
    for num_experts in num_experts_list:
      times[num_experts].update(
        time_every_expert(num_experts, args.tokens, args.repeats, log, adam=torch_adams[0])
      )
  reference = ("torch", "loop_over_experts", f"adam_{torch_adams[0]}")
  rows = [row for n in num_experts_list for row in rows_of(times[n], n, args.tokens, reference)]
  print(markdown_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
