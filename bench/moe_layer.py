"""Time of one MoE feed-forward layer per dispatch method, against a dense FFN of equal active FLOPs.

Run from the repository root:
  python -m bench.moe_layer [--json PATH] [--num-experts 8,16,32,64] [--tokens 8192] [--repeats N]
                            [--dispatch dense_ffn,capacity,...]

One layer at d_model 512, d_ff 1024, top-2, float32, with a loss of mean((y - target)^2).
For each dispatch it measures, in one process:
  fwd_bwd   forward + backward (`jax.value_and_grad`, jitted);
  step      a full train step: forward, backward and `optax.adam` on all parameters
            (jitted, parameters and optimizer state donated).
Both take the gradient of the layer input too, as the layer below needs it in a
network. (Without it XLA would drop one of the dense FFN's three backward matmuls,
which a custom_vjp cannot do: the comparison would measure that, not the dispatch.)
Dispatches (every MoE one routes by softmax top-2 over a float32 router matrix that
is a trained parameter, and shares the same initial weights):
  dense_ffn             a dense FFN of width d_ff * k = 2048: the same FLOPs per token;
  capacity              the library's `MoEFeedForward` (capacity factor 1.25, training capacity);
  dropless_block_loop   `tmoe_jax.moe.dropless`, the CPU kernel;
  dropless_ragged_dot   `tmoe_jax.moe.dropless` with `jax.lax.ragged_dot` (the GPU/TPU path);
  every_expert          every expert runs on every token, softmax-weighted sum (E/k times the FLOPs);
  onehot_einsum         GShard: one-hot dispatch/combine tensors [T, E, C] and einsums, capacity 1.25;
  balanced_batched_einsum
                        not a layer, a reference: the experts' matmuls alone as XLA's batched einsum
                        over E groups of exactly T*k/E rows (the k copies of the tokens dealt out in
                        order): perfect balance, no router, sort, gather or padding. On
                        XLA:CPU it is slower than dropless_block_loop, which does all of those.
Also the time of the Adam update alone, on all expert parameters (`adam_update_experts`)
and on the dense FFN's (`adam_update_dense`).

Times are medians of --repeats runs after one warm-up run (which compiles), taken
round-robin over the dispatches so that load from other processes hits all alike;
the JSON rows also keep the fastest run (`min_*`) as a sign of that noise. A case
whose first timed fwd_bwd + step took over 2 * `SLOW_SECONDS` is timed once.
`seconds` and `ratio_to_dense` are the train step's, `fwd_bwd_*` the forward +
backward's; for the Adam rows, `ratio_to_dense` is against the dense train step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tmoe_jax.moe import dropless
from tmoe_jax.moe.layer import MoEFeedForward
from tmoe_jax.moe.routing import top_k_route
from tmoe_jax.moe.settings import MoEConfig

D_MODEL = 512
D_FF = 1024
TOP_K = 2
CAPACITY_FACTOR = 1.25
LEARNING_RATE = 1e-3
SLOW_SECONDS = 5.0
DISPATCHES = (
  "dense_ffn",
  "capacity",
  "dropless_block_loop",
  "dropless_ragged_dot",
  "every_expert",
  "onehot_einsum",
  "balanced_batched_einsum",
)


# ---------------------------------------------------------------------------
# Layers: (params, apply(params, x_TxD) -> y_TxD).


def _route(router_DxE, x_TxD):
  return top_k_route(x_TxD.astype(jnp.float32) @ router_DxE, TOP_K)


def _expert_params(layer: MoEFeedForward) -> dict[str, jax.Array]:
  experts = layer.experts
  return {
    "router_DxE": layer.router.kernel[...],
    "w_in_ExDxF": experts.w_in_ExDxF[...],
    "b_in_ExF": experts.b_in_ExF[...],
    "w_out_ExFxD": experts.w_out_ExFxD[...],
    "b_out_ExD": experts.b_out_ExD[...],
  }


def _weights(params):
  return params["w_in_ExDxF"], params["b_in_ExF"], params["w_out_ExFxD"], params["b_out_ExD"]


def dense_ffn(key):
  k_in, k_out = jax.random.split(key)
  d_hidden = D_FF * TOP_K
  init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
  params = {
    "w_in": init(k_in, (D_MODEL, d_hidden)),
    "b_in": jnp.zeros((d_hidden,)),
    "w_out": init(k_out, (d_hidden, D_MODEL)),
    "b_out": jnp.zeros((D_MODEL,)),
  }

  def apply(params, x_TxD):
    hidden = jax.nn.relu(x_TxD @ params["w_in"] + params["b_in"])
    return hidden @ params["w_out"] + params["b_out"]

  return params, apply


def capacity(layer: MoEFeedForward):
  graphdef, params = nnx.split(layer, nnx.Param)

  def apply(params, x_TxD):
    y_1xTxD, _ = nnx.merge(graphdef, params)(x_TxD[None], deterministic=False)
    return y_1xTxD[0]

  return params, apply


def dropless_method(method: str):
  def build(layer: MoEFeedForward):
    def apply(params, x_TxD):
      route = _route(params["router_DxE"], x_TxD)
      return dropless.dropless_moe(
        x_TxD, route.expert_indices_TxK, route.gates_TxK, _weights(params), "relu", method=method
      )

    return _expert_params(layer), apply

  return build


def every_expert(layer: MoEFeedForward):
  def apply(params, x_TxD):
    w_in, b_in, w_out, b_out = _weights(params)
    probs_TxE = jax.nn.softmax(x_TxD @ params["router_DxE"], axis=-1)
    hidden_TxExF = jax.nn.relu(jnp.einsum("td,edf->tef", x_TxD, w_in) + b_in)
    y_TxExD = jnp.einsum("tef,efd->ted", hidden_TxExF, w_out) + b_out
    return jnp.einsum("ted,te->td", y_TxExD, probs_TxE)

  return _expert_params(layer), apply


def gshard_masks(expert_indices_TxK, gates_TxK, num_experts: int, capacity_: int):
  """GShard dispatch (0/1) and combine (gate) tensors [T, E, C]; choice-major slot priority."""
  num_tokens, top_k = expert_indices_TxK.shape
  mask_KxTxE = jax.nn.one_hot(expert_indices_TxK.T, num_experts, dtype=jnp.int32)
  position_KxTxE = jnp.cumsum(mask_KxTxE.reshape(top_k * num_tokens, num_experts), axis=0).reshape(
    top_k, num_tokens, num_experts
  )
  position_KxTxE = position_KxTxE * mask_KxTxE - 1
  dispatch_TxExC = jnp.zeros((num_tokens, num_experts, capacity_), jnp.float32)
  combine_TxExC = jnp.zeros((num_tokens, num_experts, capacity_), jnp.float32)
  for k in range(top_k):
    # one_hot of -1 (not routed) or >= C (over capacity) is all zeros: the assignment is dropped.
    slot_TxExC = jax.nn.one_hot(position_KxTxE[k], capacity_, dtype=jnp.float32)
    dispatch_TxExC = dispatch_TxExC + slot_TxExC
    combine_TxExC = combine_TxExC + gates_TxK[:, k, None, None] * slot_TxExC
  return dispatch_TxExC, combine_TxExC


def onehot_einsum(layer: MoEFeedForward):
  num_experts = layer.config.num_experts

  def apply(params, x_TxD):
    w_in, b_in, w_out, b_out = _weights(params)
    route = _route(params["router_DxE"], x_TxD)
    capacity_ = layer.config.capacity(x_TxD.shape[0], training=True)
    dispatch_TxExC, combine_TxExC = gshard_masks(
      route.expert_indices_TxK, route.gates_TxK, num_experts, capacity_
    )
    x_ExCxD = jnp.einsum("tec,td->ecd", dispatch_TxExC, x_TxD)
    hidden_ExCxF = jax.nn.relu(jnp.einsum("ecd,edf->ecf", x_ExCxD, w_in) + b_in[:, None])
    y_ExCxD = jnp.einsum("ecf,efd->ecd", hidden_ExCxF, w_out) + b_out[:, None]
    return jnp.einsum("tec,ecd->td", combine_TxExC, y_ExCxD)

  return _expert_params(layer), apply


def balanced_batched_einsum(layer: MoEFeedForward):
  num_experts = layer.config.num_experts

  def apply(params, x_TxD):
    w_in, b_in, w_out, b_out = _weights(params)
    num_tokens, d_model = x_TxD.shape
    if (num_tokens * TOP_K) % num_experts:
      raise ValueError(f"balanced_batched_einsum needs tokens * top_k divisible by num_experts {num_experts}")
    x_ExCxD = jnp.broadcast_to(x_TxD, (TOP_K, num_tokens, d_model)).reshape(num_experts, -1, d_model)
    hidden_ExCxF = jax.nn.relu(jnp.einsum("ecd,edf->ecf", x_ExCxD, w_in) + b_in[:, None])
    y_ExCxD = jnp.einsum("ecf,efd->ecd", hidden_ExCxF, w_out) + b_out[:, None]
    return jnp.mean(y_ExCxD.reshape(TOP_K, num_tokens, d_model), axis=0)

  return _expert_params(layer), apply


BUILDERS: dict[str, Callable[[MoEFeedForward], tuple[Any, Callable]]] = {
  "capacity": capacity,
  "dropless_block_loop": dropless_method("block_loop"),
  "dropless_ragged_dot": dropless_method("ragged_dot"),
  "every_expert": every_expert,
  "onehot_einsum": onehot_einsum,
  "balanced_batched_einsum": balanced_batched_einsum,
}


# ---------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass
class Case:
  """One dispatch at one expert count, with its compiled functions and live training state."""

  dispatch: str
  fwd_bwd: Callable
  step: Callable
  params: Any
  opt_state: Any
  fwd_bwd_times: list[float] = dataclasses.field(default_factory=list)
  step_times: list[float] = dataclasses.field(default_factory=list)
  timed_once: bool = False

  def run_fwd_bwd(self, x, target) -> float:
    start = time.perf_counter()
    jax.block_until_ready(self.fwd_bwd(self.params, x, target))
    return time.perf_counter() - start

  def run_step(self, x, target) -> float:
    start = time.perf_counter()
    self.params, self.opt_state, outputs = self.step(self.params, self.opt_state, x, target)
    jax.block_until_ready((self.params, self.opt_state, outputs))
    return time.perf_counter() - start


def make_case(dispatch: str, params, apply) -> Case:
  optimizer = optax.adam(LEARNING_RATE)

  def loss_fn(params, x, target):
    return jnp.mean(jnp.square(apply(params, x) - target))

  value_and_grads = jax.value_and_grad(loss_fn, argnums=(0, 1))

  def train_step(params, opt_state, x, target):
    loss, (grads, dx) = value_and_grads(params, x, target)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, (loss, dx)

  return Case(
    dispatch=dispatch,
    fwd_bwd=jax.jit(value_and_grads),
    step=jax.jit(train_step, donate_argnums=(0, 1)),
    # Own copies: the step donates them, and the layer's arrays seed the other dispatches.
    params=jax.tree.map(jnp.copy, params),
    opt_state=optimizer.init(params),
  )


def time_adam(params, repeats: int) -> float:
  """Median time of one Adam update + apply on `params` with fixed random gradients."""
  optimizer = optax.adam(LEARNING_RATE)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  grads = jax.tree.unflatten(treedef, [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])
  params = jax.tree.map(jnp.copy, params)
  opt_state = optimizer.init(params)

  def update(params, opt_state, grads):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  update = jax.jit(update, donate_argnums=(0, 1))
  params, opt_state = jax.block_until_ready(update(params, opt_state, grads))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    params, opt_state = jax.block_until_ready(update(params, opt_state, grads))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_num_experts(num_experts: int, tokens: int, repeats: int, dispatches: list[str], log) -> list[dict]:
  key_x, key_t, key_dense = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(key_x, (tokens, D_MODEL), jnp.float32)
  target = jax.random.normal(key_t, (tokens, D_MODEL), jnp.float32)
  config = MoEConfig(
    num_experts=num_experts, top_k=TOP_K, d_model=D_MODEL, d_ff=D_FF, capacity_factor=CAPACITY_FACTOR
  )
  layer = MoEFeedForward(config, rngs=nnx.Rngs(0))

  cases = []
  for dispatch in ["dense_ffn"] + [d for d in dispatches if d != "dense_ffn"]:
    params, apply = dense_ffn(key_dense) if dispatch == "dense_ffn" else BUILDERS[dispatch](layer)
    case = make_case(dispatch, params, apply)
    warm = case.run_fwd_bwd(x, target) + case.run_step(x, target)
    log(f"  E={num_experts} {dispatch}: warm-up (compile + one run of each) {warm:.1f} s")
    cases.append(case)

  for repeat in range(repeats):
    for case in cases:
      if case.timed_once:
        continue
      case.fwd_bwd_times.append(case.run_fwd_bwd(x, target))
      case.step_times.append(case.run_step(x, target))
      case.timed_once = case.fwd_bwd_times[-1] + case.step_times[-1] > 2 * SLOW_SECONDS

  dense = cases[0]
  dense_step = statistics.median(dense.step_times)
  dense_fwd_bwd = statistics.median(dense.fwd_bwd_times)
  rows = []
  for case in cases:
    if case.dispatch == "dense_ffn" and "dense_ffn" not in dispatches:
      continue
    step, fwd_bwd = statistics.median(case.step_times), statistics.median(case.fwd_bwd_times)
    rows.append(
      {
        "dispatch": case.dispatch,
        "num_experts": num_experts,
        "top_k": TOP_K,
        "seconds": step,
        "ratio_to_dense": step / dense_step,
        "fwd_bwd_seconds": fwd_bwd,
        "fwd_bwd_ratio_to_dense": fwd_bwd / dense_fwd_bwd,
        "repeats": len(case.step_times),
        # Fastest runs: with other jobs on the machine, a sign of how noisy the medians are.
        "min_seconds": min(case.step_times),
        "min_fwd_bwd_seconds": min(case.fwd_bwd_times),
      }
    )
  del cases
  expert_params = {k: v for k, v in _expert_params(layer).items() if k != "router_DxE"}
  for name, params in (
    ("adam_update_experts", expert_params),
    ("adam_update_dense", dense_ffn(key_dense)[0]),
  ):
    seconds = time_adam(params, repeats)
    rows.append(
      {
        "dispatch": name,
        "num_experts": num_experts,
        "top_k": TOP_K,
        "seconds": seconds,
        "ratio_to_dense": seconds / dense_step,
        "fwd_bwd_seconds": None,
        "fwd_bwd_ratio_to_dense": None,
        "repeats": repeats,
        "min_seconds": None,
        "min_fwd_bwd_seconds": None,
      }
    )
  return rows


def markdown_table(rows: list[dict]) -> str:
  lines = [
    "| dispatch | experts | top_k | train step s | ratio_to_dense | fwd+bwd s | fwd_bwd ratio_to_dense |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for row in rows:
    fwd_bwd = "-" if row["fwd_bwd_seconds"] is None else f"{row['fwd_bwd_seconds']:.3f}"
    fwd_bwd_ratio = "-" if row["fwd_bwd_ratio_to_dense"] is None else f"{row['fwd_bwd_ratio_to_dense']:.2f}"
    lines.append(
      f"| {row['dispatch']} | {row['num_experts']} | {row['top_k']} | {row['seconds']:.3f} | "
      f"{row['ratio_to_dense']:.2f} | {fwd_bwd} | {fwd_bwd_ratio} |"
    )
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", help="write the rows to this file as a JSON list")
  parser.add_argument("--num-experts", default="8,16,32,64", help="comma-separated expert counts")
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dispatch", default=",".join(DISPATCHES), help=f"comma-separated, of {DISPATCHES}")
  args = parser.parse_args(argv)
  dispatches = [d for d in args.dispatch.split(",") if d]
  unknown = sorted(set(dispatches) - set(DISPATCHES))
  if unknown:
    parser.error(f"unknown dispatch {unknown}; choose from {DISPATCHES}")
  num_experts_list = [int(n) for n in args.num_experts.split(",") if n]
  if args.repeats < 1 or args.tokens < 1 or any(n < TOP_K for n in num_experts_list):
    parser.error(f"--repeats and --tokens must be >= 1 and every --num-experts >= top_k = {TOP_K}")

  log = lambda message: print(message, flush=True)
  log(
    f"backend {jax.default_backend()}, {jax.device_count()} device(s); tokens {args.tokens}, "
    f"d_model {D_MODEL}, d_ff {D_FF}, top-{TOP_K}, float32; dropless 'auto' = {dropless.resolve_method('auto')}"
  )
  rows = []
  for num_experts in num_experts_list:
    rows.extend(bench_num_experts(num_experts, args.tokens, args.repeats, dispatches, log))
  print(markdown_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
