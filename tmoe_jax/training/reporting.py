"""What a run writes beside its checkpoints: metrics.jsonl (+ TensorBoard events), results.txt, loss_curve.png."""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Vector metrics (e.g. per-layer expert load) go to TensorBoard element by element up to this size.
_MAX_TENSORBOARD_ELEMENTS = 256
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


def write_text_atomic(path: pathlib.Path, text: str) -> None:
  """Writes via a temporary file and a rename, so a crash never leaves half a file behind."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def _parse_rows(path: pathlib.Path) -> list[dict[str, Any]]:
  """The rows of a metrics file; a line that is not JSON (a write cut short by a kill) is skipped with a warning."""
  rows = []
  for number, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      sys.stderr.write(
        f"warning: {path}:{number}: skipping a line that is not JSON (cut short by a crash?)\n"
      )
      continue
    if isinstance(row, dict):
      rows.append(row)
  return rows


def _row_key(row: Mapping[str, Any]) -> tuple[Any, Any]:
  return row.get("step"), row.get("split")


def tensorboard_scalars(row: Mapping[str, Any]) -> dict[str, float]:
  """`<split>/<name>[/<index>...]` -> value for every number in a metrics row (vectors element-wise)."""
  split = row.get("split", "train")
  scalars = {}
  for name, value in row.items():
    if name in ("step", "split") or isinstance(value, (str, bool)) or value is None:
      continue
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.number) or array.size > _MAX_TENSORBOARD_ELEMENTS:
      continue
    for index in np.ndindex(array.shape):
      suffix = "".join(f"/{i}" for i in index)
      scalars[f"{split}/{name}{suffix}"] = float(array[index])
  return scalars


class MetricsWriter:
  """Appends one JSON object per line to `<workdir>/metrics.jsonl`, at most one per (step, split),
  and the same numbers as TensorBoard scalars under `<workdir>/tensorboard/` (tensorboardX: no TensorFlow).

  On resume, rows for steps after the restored checkpoint are dropped first, so
  the file never holds two different histories of the same step (TensorBoard is
  told the same with `purge_step`); writing a row for a (step, split) already
  present (the final evaluation of a run restarted after it finished training)
  replaces the old row.
  """

  def __init__(self, workdir: pathlib.Path, *, resume_step: int):
    import tensorboardX

    self.path = pathlib.Path(workdir) / METRICS_FILE
    self._keys: set[tuple[Any, Any]] = set()
    if self.path.exists():
      kept = [row for row in _parse_rows(self.path) if row.get("step", 0) <= resume_step]
      self._rewrite(kept)
    self._tensorboard = tensorboardX.SummaryWriter(
      str(pathlib.Path(workdir) / TENSORBOARD_DIR),
      purge_step=resume_step + 1 if resume_step else None,
      flush_secs=10,
    )

  def _rewrite(self, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in rows))
    self._keys = {_row_key(row) for row in rows}

  def write(self, row: Mapping[str, Any]) -> None:
    row = to_python(row)
    key = _row_key(row)
    if key in self._keys:
      self._rewrite([old for old in _parse_rows(self.path) if _row_key(old) != key])
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    self._keys.add(key)
    for tag, value in tensorboard_scalars(row).items():
      self._tensorboard.add_scalar(tag, value, global_step=row.get("step", 0))

  def close(self) -> None:
    self._tensorboard.close()


def read_metrics(workdir: pathlib.Path) -> list[dict[str, Any]]:
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return _parse_rows(path)


def write_results(workdir: pathlib.Path, results: Mapping[str, Any]) -> pathlib.Path:
  """`name: value` per line; floats with full precision (repr) so runs can be compared exactly."""
  lines = []
  for name, value in results.items():
    value = to_python(value)
    lines.append(f"{name}: {value!r}" if isinstance(value, float) else f"{name}: {value}")
  path = pathlib.Path(workdir) / RESULTS_FILE
  write_text_atomic(path, "\n".join(lines) + "\n")
  return path


def plot_loss_curve(
  workdir: pathlib.Path, *, eval_splits: tuple[str, ...] = ("test",)
) -> pathlib.Path | None:
  """Training loss (and the loss of each of `eval_splits` logged) against step, as a PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_metrics(workdir)
  train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train"]
  if not train:
    return None
  figure, axes = plt.subplots(figsize=(6, 4))
  axes.plot(*zip(*train), label="train loss")
  for split in eval_splits:
    evals = [(r["step"], r["loss"]) for r in rows if r.get("split") == split and "loss" in r]
    if evals:
      axes.plot(*zip(*evals), "o-", label=f"{split} loss")
  axes.set_xlabel("step")
  axes.set_ylabel("loss")
  axes.set_yscale("log")
  axes.grid(True, alpha=0.3)
  axes.legend()
  path = pathlib.Path(workdir) / LOSS_CURVE_FILE
  tmp = path.with_name(path.name + ".tmp")
  figure.tight_layout()
  figure.savefig(tmp, dpi=100, format="png")
  plt.close(figure)
  tmp.replace(path)
  return path
