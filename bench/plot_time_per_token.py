"""Plot of train-step time per token against the number of experts, one line per MoE dispatch.

Run from the repository root, on the JSON rows `python -m bench.moe_layer --json` writes:
  python -m bench.moe_layer --num-experts 8,16,32,64 --json bench/moe_layer.json
  python -m bench.plot_time_per_token --json bench/moe_layer.json --out bench/time_per_token.png

x: experts on a log2 axis; y: microseconds per token on a log axis (every_expert grows
with E while the others stay near flat). `--metric fwd_bwd_seconds` plots forward +
backward instead of the train step. The Adam-only rows (`adam_update_*`) are left out.
Tokens per step come from each row's `tokens` when present, else from --tokens
(bench.moe_layer's default, 8192).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt

from bench.moe_layer import D_FF, D_MODEL, TOP_K
from tmoe_jax.errors import DataError

METRICS = ("seconds", "fwd_bwd_seconds")
DEFAULT_TOKENS = 8192


def time_per_token_series(
  rows: list[dict], *, metric: str = "seconds", tokens: int = DEFAULT_TOKENS
) -> dict[str, list[tuple[int, float]]]:
  """dispatch -> [(num_experts, microseconds per token)], sorted by experts; Adam-only rows dropped."""
  series: dict[str, list[tuple[int, float]]] = {}
  for row in rows:
    if row["dispatch"].startswith("adam_update") or row.get(metric) is None:
      continue
    per_token = row[metric] / row.get("tokens", tokens)
    series.setdefault(row["dispatch"], []).append((row["num_experts"], 1e6 * per_token))
  return {dispatch: sorted(points) for dispatch, points in series.items()}


def load_rows(path: pathlib.Path) -> list[dict]:
  try:
    rows = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as error:
    raise DataError(f"{path}: cannot read bench.moe_layer JSON rows: {error}") from error
  required = {"dispatch", "num_experts", "seconds"}
  if not isinstance(rows, list) or not all(isinstance(r, dict) and required <= r.keys() for r in rows):
    raise DataError(f"{path}: expected a JSON list of bench.moe_layer rows with keys {sorted(required)}")
  return rows


def plot(series: dict[str, list[tuple[int, float]]], out: pathlib.Path, *, title: str) -> None:
  fig, ax = plt.subplots(figsize=(8.5, 4.8))
  for dispatch, points in series.items():
    experts, micros = zip(*points)
    style = "--" if dispatch == "dense_ffn" else "-"
    ax.plot(experts, micros, style, marker="o", label=dispatch)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  all_experts = sorted({e for points in series.values() for e, _ in points})
  ax.set_xticks(all_experts, [str(e) for e in all_experts])
  ax.set_xlabel("number of experts")
  ax.set_ylabel("microseconds per token")
  ax.set_title(title, fontsize=10)
  ax.grid(True, which="both", alpha=0.3)
  # Outside the axes: the lines span the whole height on a log scale.
  ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", required=True, help="bench.moe_layer's JSON rows")
  parser.add_argument("--out", required=True, help="the PNG to write")
  parser.add_argument("--metric", default="seconds", choices=METRICS, help="train step, or fwd+bwd only")
  parser.add_argument(
    "--tokens", type=int, default=DEFAULT_TOKENS, help="tokens per step, for rows without it"
  )
  args = parser.parse_args(argv)
  try:
    rows = load_rows(pathlib.Path(args.json))
  except DataError as error:
    print(error, file=sys.stderr)
    return 2
  series = time_per_token_series(rows, metric=args.metric, tokens=args.tokens)
  if not series:
    print(f"{args.json}: no dispatch rows with {args.metric!r} to plot", file=sys.stderr)
    return 2
  what = "train step (fwd + bwd + Adam)" if args.metric == "seconds" else "forward + backward"
  plot(
    series,
    pathlib.Path(args.out),
    title=f"MoE layer {what} per token: top-{TOP_K}, d_model {D_MODEL}, d_ff {D_FF}",
  )
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
