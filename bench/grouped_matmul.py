"""The three matmuls of an expert FFN, one large operand against E groups of equal FLOPs, on two GEMM libraries.

Run from the repository root:
  python -m bench.grouped_matmul [--json PATH] [--num-experts 8,64] [--tokens 8192] [--repeats 7]

A top-k MoE layer of T tokens, width D and expert width F runs its experts on T*k rows
split into E groups, one per expert; a dense FFN of width k*F has the same FLOPs in one
[T, D] x [D, k*F] matmul. This times each matmul kind of a forward + backward at both
shapes (float32, perfect balance: every group has T*k/E rows):
  forward          x W:    dense [T, D] x [D, kF];   grouped E x [T*k/E, D] x [D, F]
  input_gradient   h W^T:  dense [T, kF] x [kF, D];  grouped E x [T*k/E, F] x [F, D]
  weight_gradient  x^T h:  dense [D, T] x [T, kF];   grouped E x [D, T*k/E] x [T*k/E, F]
on two libraries in one process, each library's cases round-robin so that load hits them
alike, the libraries one after the other (see `bench`):
  xla      jitted `jnp.einsum` (XLA:CPU's own GEMM on CPU);
  openblas `np.matmul` on the stacked groups, which calls NumPy's BLAS (OpenBLAS in the
           NumPy wheels) once per group.
The grouped-to-dense ratio within a library is the cost of the small GEMMs themselves:
the floor under any dispatch that runs the experts as E separate matmuls, however it
sorts and gathers. JSON rows: {"library", "matmul", "num_experts", "rows_per_group",
"seconds", "min_seconds", "repeats", "ratio_to_dense"}, the dense rows with num_experts 1.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench.timing import round_robin, summarize, timed

D_MODEL = 512
D_FF = 1024
TOP_K = 2
LIBRARIES = ("xla", "openblas")
# Einsum equations over a leading group axis g; the dense case is one group.
MATMULS = {
  "forward": "grd,gdf->grf",
  "input_gradient": "grf,gdf->grd",
  "weight_gradient": "grd,grf->gdf",
}


def operand_shapes(
  matmul: str, groups: int, rows: int, width: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Shapes of the two operands of `MATMULS[matmul]` for `groups` groups of `rows` rows, hidden `width`."""
  if matmul == "forward":
    return (groups, rows, D_MODEL), (groups, D_MODEL, width)
  if matmul == "input_gradient":
    return (groups, rows, width), (groups, D_MODEL, width)
  return (groups, rows, D_MODEL), (groups, rows, width)


def numpy_matmul(matmul: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
  """`MATMULS[matmul]` as np.matmul, which calls BLAS once per group; transposes are strided views, not copies."""
  if matmul == "forward":
    return np.matmul
  if matmul == "input_gradient":
    return lambda a, b: np.matmul(a, b.transpose(0, 2, 1))
  return lambda a, b: np.matmul(a.transpose(0, 2, 1), b)


def make_runner(
  library: str, matmul: str, groups: int, rows: int, width: int, seed: int
) -> Callable[[], float]:
  """A runner that times one product; it is run once here so the first timed run has no compile."""
  a_shape, b_shape = operand_shapes(matmul, groups, rows, width)
  rng = np.random.default_rng(seed)
  a = rng.standard_normal(a_shape, dtype=np.float32)
  b = rng.standard_normal(b_shape, dtype=np.float32)
  if library == "xla":
    equation = MATMULS[matmul]
    if groups == 1:
      # The dense FFN's own 2-D dot, not a batched dot with a batch of one.
      equation = equation.replace("g", "")
      a, b = a[0], b[0]
    product = jax.jit(lambda a, b: jnp.einsum(equation, a, b))
    a, b = jnp.asarray(a), jnp.asarray(b)
  else:
    product = numpy_matmul(matmul)
  run = lambda: timed(lambda: product(a, b))
  run()
  return run


def bench(num_experts: list[int], tokens: int, repeats: int) -> list[dict]:
  assignments = tokens * TOP_K
  rows = []
  # One library after the other: interleaved, each one's idle worker threads (which spin
  # for a while after a call) took cores from the other's and doubled some times.
  for library in LIBRARIES:
    cases = {}
    for matmul in MATMULS:
      cases[(matmul, 1)] = make_runner(library, matmul, 1, tokens, TOP_K * D_FF, seed=0)
      for groups in num_experts:
        cases[(matmul, groups)] = make_runner(library, matmul, groups, assignments // groups, D_FF, seed=1)
    times = round_robin(cases, repeats)
    for (matmul, groups), case_times in times.items():
      row = {"library": library, "matmul": matmul, "num_experts": groups}
      row["rows_per_group"] = tokens if groups == 1 else assignments // groups
      row.update(summarize(case_times))
      del row["times"]
      row["ratio_to_dense"] = row["seconds"] / float(np.median(times[(matmul, 1)]))
      rows.append(row)
  return rows


def markdown_table(rows: list[dict]) -> str:
  lines = [
    "| library | matmul | groups x rows | median ms | fastest ms | ratio to dense (medians) |",
    "|---|---|---:|---:|---:|---:|",
  ]
  for row in rows:
    lines.append(
      f"| {row['library']} | {row['matmul']} | {row['num_experts']} x {row['rows_per_group']} | "
      f"{row['seconds'] * 1e3:.1f} | {row['min_seconds'] * 1e3:.1f} | {row['ratio_to_dense']:.2f} |"
    )
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", help="write the rows to this file as a JSON list")
  parser.add_argument("--num-experts", default="8,64", help="comma-separated expert (group) counts")
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args(argv)
  num_experts = [int(n) for n in args.num_experts.split(",") if n]
  if args.repeats < 1 or args.tokens < 1 or not num_experts:
    parser.error("--repeats and --tokens must be >= 1 and --num-experts non-empty")
  bad = [n for n in num_experts if n < 2 or (args.tokens * TOP_K) % n]
  if bad:
    parser.error(f"--num-experts {bad}: each must be >= 2 and divide tokens * top_k = {args.tokens * TOP_K}")
  print(
    f"backend {jax.default_backend()}; tokens {args.tokens}, d_model {D_MODEL}, d_ff {D_FF}, top-{TOP_K}, float32",
    flush=True,
  )
  rows = bench(num_experts, args.tokens, args.repeats)
  print(markdown_table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
