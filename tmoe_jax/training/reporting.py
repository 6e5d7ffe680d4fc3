"""What a run writes beside its checkpoints: metrics.jsonl, results.txt, loss_curve.png."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

import numpy as np

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.txt"
LOSS_CURVE_FILE = "loss_curve.png"


def to_python(value: Any) -> Any:
  """Arrays and numpy scalars -> JSON-ready floats, ints and (nested) lists."""
  if isinstance(value, Mapping):
    return {key: to_python(item) for key, item in value.items()}
  array = np.asarray(value)
  if array.ndim:
    return array.tolist()
  item = array.item()
  return item


class MetricsWriter:
  """Appends one JSON object per line to `<workdir>/metrics.jsonl`.

  On resume, rows for steps after the restored checkpoint are dropped first, so
  the file never holds two different histories of the same step.
  """

  def __init__(self, workdir: pathlib.Path, *, resume_step: int):
    self.path = pathlib.Path(workdir) / METRICS_FILE
    if self.path.exists():
      kept = [
        line
        for line in self.path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= resume_step
      ]
      self.path.write_text("".join(line + "\n" for line in kept))

  def write(self, row: Mapping[str, Any]) -> None:
    with self.path.open("a") as f:
      f.write(json.dumps(to_python(row)) + "\n")


def read_metrics(workdir: pathlib.Path) -> list[dict[str, Any]]:
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_results(workdir: pathlib.Path, results: Mapping[str, Any]) -> pathlib.Path:
  """`name: value` per line; floats with full precision (repr) so runs can be compared exactly."""
  lines = []
  for name, value in results.items():
    value = to_python(value)
    lines.append(f"{name}: {value!r}" if isinstance(value, float) else f"{name}: {value}")
  path = pathlib.Path(workdir) / RESULTS_FILE
  tmp = path.with_suffix(".tmp")
  tmp.write_text("\n".join(lines) + "\n")
  tmp.replace(path)  # atomic: a crash never leaves half a results file
  return path


def plot_loss_curve(workdir: pathlib.Path) -> pathlib.Path | None:
  """Training loss (and eval loss when logged) against step, as a PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_metrics(workdir)
  train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train"]
  evals = [(r["step"], r["loss"]) for r in rows if r.get("split") == "test" and "loss" in r]
  if not train:
    return None
  figure, axes = plt.subplots(figsize=(6, 4))
  axes.plot(*zip(*train), label="train loss")
  if evals:
    axes.plot(*zip(*evals), "o-", label="test loss (teacher forced)")
  axes.set_xlabel("step")
  axes.set_ylabel("cross-entropy (nats/token)")
  axes.set_yscale("log")
  axes.grid(True, alpha=0.3)
  axes.legend()
  path = pathlib.Path(workdir) / LOSS_CURVE_FILE
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return path
