"""Gate-activation reports of the image MoE: gates.csv and the PNG plots drawn from it.

gates.csv has one row per (example, expert) with the columns `GATES_COLUMNS`:
  epoch       training rows: the epoch the batch belongs to (batch * batch_size // train examples);
              `TEST_EPOCH` ("test") for the rows of the final pass over the test split
  batch       training rows: the 0-based index of the training batch (the loop's step before its
              update); test rows: the evaluation batch (test index // eval.batch_size)
  sample      training rows: the row within that batch; test rows: the test example's index
  label       the true class
  prediction  the model's class for the example
  expert      the expert index e
  probability the learned gate's softmax probability of expert e (before any top-k selection,
              never teacher-forced), computed with the parameters after the batch's update

The training rows survive resume: `GatesCsv.keep_batches_before` drops every row of a
batch the resumed run will train again (and the test rows, which the end of the run
writes anew), as the loop drops metrics rows past the restored step. Every rewrite is
atomic; an append cut short by a crash leaves at most one broken last line, which the
next rewrite drops.
"""

from __future__ import annotations

import csv
import io
import pathlib
from collections.abc import Sequence

import numpy as np

from tmoe_jax.training.reporting import write_text_atomic

GATES_FILE = "gates.csv"
GATES_COLUMNS = ("epoch", "batch", "sample", "label", "prediction", "expert", "probability")
TEST_EPOCH = "test"
# The plots `write_plots` draws, by what they show.
EXPERT_USAGE_PLOT = "expert_usage.png"
GATE_HEATMAP_PLOT = "gate_heatmap.png"
LABEL_DISTRIBUTION_PLOT = "expert_label_distribution.png"
CONFUSION_MATRIX_PLOT = "confusion_matrix.png"
PLOT_FILES = (EXPERT_USAGE_PLOT, GATE_HEATMAP_PLOT, LABEL_DISTRIBUTION_PLOT, CONFUSION_MATRIX_PLOT)


def gate_rows(
  epoch: int | str,
  batch_B: Sequence[int] | int,
  sample_B: Sequence[int],
  labels_B: np.ndarray,
  predictions_B: np.ndarray,
  gate_probs_BxE: np.ndarray,
) -> list[tuple]:
  """The gates.csv rows of B examples, example-major then expert: B * E tuples in `GATES_COLUMNS` order."""
  gate_probs_BxE = np.asarray(gate_probs_BxE)
  num_examples = gate_probs_BxE.shape[0]
  batch_B = np.broadcast_to(np.asarray(batch_B), (num_examples,))
  return [
    (epoch, int(batch_B[i]), int(sample_B[i]), int(labels_B[i]), int(predictions_B[i]), e, float(p))
    for i in range(num_examples)
    for e, p in enumerate(gate_probs_BxE[i])
  ]


def _format(rows: Sequence[tuple]) -> str:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  for row in rows:
    writer.writerow([*row[:-1], f"{row[-1]:.6g}"])
  return out.getvalue()


def _is_complete(row: list[str]) -> bool:
  if len(row) != len(GATES_COLUMNS):
    return False
  try:
    [int(v) for v in row[1:6]]
    float(row[6])
  except ValueError:
    return False
  return row[0] == TEST_EPOCH or row[0].isdigit()


class GatesCsv:
  """`<workdir>/gates.csv`: appended during training, its test rows replaced at the end."""

  def __init__(self, path: pathlib.Path):
    self.path = pathlib.Path(path)

  def _header(self) -> str:
    return ",".join(GATES_COLUMNS) + "\n"

  def read_rows(self) -> list[list[str]]:
    """The complete data rows, as strings (a line cut short by a crash is left out)."""
    if not self.path.exists():
      return []
    with self.path.open(newline="") as f:
      rows = list(csv.reader(f))
    return [row for row in rows[1:] if _is_complete(row)]

  def _rewrite(self, rows: list[list[str]]) -> None:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    write_text_atomic(self.path, self._header() + out.getvalue())

  def keep_batches_before(self, first_dropped_batch: int) -> None:
    """Keeps only the training rows of batches < `first_dropped_batch` (no test rows)."""
    if not self.path.exists():
      return
    kept = [row for row in self.read_rows() if row[0] != TEST_EPOCH and int(row[1]) < first_dropped_batch]
    self._rewrite(kept)

  def append(self, rows: Sequence[tuple]) -> None:
    text = _format(rows)
    if not self.path.exists() or self.path.stat().st_size == 0:
      write_text_atomic(self.path, self._header() + text)
      return
    with self.path.open("a") as f:
      f.write(text)

  def replace_test_rows(self, rows: Sequence[tuple]) -> None:
    kept = [row for row in self.read_rows() if row[0] != TEST_EPOCH]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(kept)
    write_text_atomic(self.path, self._header() + out.getvalue() + _format(rows))

  def training_gates(self) -> dict[str, np.ndarray]:
    """The training rows as arrays: epoch, batch, sample, label, expert (int) and probability (float)."""
    rows = [row for row in self.read_rows() if row[0] != TEST_EPOCH]
    columns = list(zip(*rows)) if rows else [()] * len(GATES_COLUMNS)
    arrays = {name: np.asarray(values, dtype=np.int64) for name, values in zip(GATES_COLUMNS[:6], columns)}
    arrays["probability"] = np.asarray(columns[6], dtype=np.float64)
    return arrays


# ----------------------------------------------------------------------------- plots


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _save(figure, path: pathlib.Path) -> pathlib.Path:
  """Writes via a temporary file and a rename, as every other file of a run."""
  plt = _pyplot()
  tmp = path.with_name(path.name + ".tmp")
  figure.savefig(tmp, dpi=100, format="png")
  plt.close(figure)
  tmp.replace(path)
  return path


def mean_gate_by(keys_R: np.ndarray, experts_R: np.ndarray, probs_R: np.ndarray, num_experts: int):
  """(sorted unique keys [G], mean gate probability [G, E]) of rows grouped by `keys_R`."""
  keys, group_R = np.unique(keys_R, return_inverse=True)
  sums_GxE = np.zeros((len(keys), num_experts))
  counts_GxE = np.zeros((len(keys), num_experts))
  np.add.at(sums_GxE, (group_R, experts_R), probs_R)
  np.add.at(counts_GxE, (group_R, experts_R), 1.0)
  return keys, sums_GxE / np.maximum(counts_GxE, 1.0)


def plot_expert_usage(
  path: pathlib.Path, training: dict[str, np.ndarray], test_gates_NxE: np.ndarray
) -> pathlib.Path:
  """Mean gate probability of each expert per training epoch (logged batches), test usage dashed."""
  plt = _pyplot()
  num_experts = test_gates_NxE.shape[1]
  figure, axes = plt.subplots(figsize=(7, 4), layout="constrained")
  test_usage_E = test_gates_NxE.mean(axis=0) if len(test_gates_NxE) else np.zeros(num_experts)
  if len(training["epoch"]):
    epochs, usage_GxE = mean_gate_by(
      training["epoch"], training["expert"], training["probability"], num_experts
    )
  else:
    epochs, usage_GxE = np.zeros(0), np.zeros((0, num_experts))
  for e in range(num_experts):
    (line,) = axes.plot(epochs, usage_GxE[:, e], "o-", label=f"expert {e}")
    axes.axhline(test_usage_E[e], color=line.get_color(), linestyle="--", alpha=0.6)
  axes.xaxis.get_major_locator().set_params(integer=True)
  axes.set_xlabel("epoch (logged training batches)")
  axes.set_ylabel("mean gate probability")
  axes.set_title("expert usage per epoch (dashed: test set)")
  axes.set_ylim(0, 1)
  axes.grid(True, alpha=0.3)
  axes.legend(fontsize="small", ncol=2)
  return _save(figure, path)


def plot_gate_heatmap(path: pathlib.Path, training: dict[str, np.ndarray], num_experts: int) -> pathlib.Path:
  """Left: mean gate per expert for every logged training batch. Right: every example of the last
  logged batch (sorted by label) against the experts."""
  plt = _pyplot()
  figure, (left, right) = plt.subplots(1, 2, figsize=(11, 5), layout="constrained")
  if len(training["batch"]):
    batches, mean_GxE = mean_gate_by(
      training["batch"], training["expert"], training["probability"], num_experts
    )
    image = left.imshow(mean_GxE, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    ticks = np.linspace(0, len(batches) - 1, min(len(batches), 10)).astype(int)
    left.set_yticks(ticks, [str(batches[t]) for t in ticks])
    last = training["batch"] == batches[-1]
    samples, sample_R = np.unique(training["sample"][last], return_inverse=True)
    gates_SxE = np.zeros((len(samples), num_experts))
    gates_SxE[sample_R, training["expert"][last]] = training["probability"][last]
    labels_S = np.zeros(len(samples), dtype=np.int64)
    labels_S[sample_R] = training["label"][last]
    order = np.argsort(labels_S, kind="stable")
    right.imshow(gates_SxE[order], aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    # One tick where each label's block of rows starts.
    starts = np.flatnonzero(np.r_[True, np.diff(labels_S[order]) != 0])
    right.set_yticks(starts, [f"label {labels_S[order][s]}" for s in starts], fontsize="small")
    right.set_title(f"training batch {batches[-1]}: each example (sorted by label)")
    figure.colorbar(image, ax=[left, right], label="gate probability")
  left.set_title("mean gate per logged training batch")
  left.set_ylabel("training batch")
  for axes in (left, right):
    axes.set_xlabel("expert")
    axes.set_xticks(range(num_experts))
  return _save(figure, path)


def plot_label_distribution(
  path: pathlib.Path, labels_N: np.ndarray, gates_NxE: np.ndarray, num_classes: int
) -> pathlib.Path:
  """For each expert, the share of each label among the test examples whose top gate it is."""
  plt = _pyplot()
  num_experts = gates_NxE.shape[1]
  counts_ExC = np.zeros((num_experts, num_classes))
  np.add.at(counts_ExC, (np.argmax(gates_NxE, axis=1), labels_N), 1.0)
  share_ExC = counts_ExC / np.maximum(counts_ExC.sum(axis=1, keepdims=True), 1.0)
  figure, axes = plt.subplots(
    figsize=(1.2 + 0.6 * num_classes, 1.2 + 0.6 * num_experts), layout="constrained"
  )
  image = axes.imshow(share_ExC, vmin=0, vmax=1, cmap="Blues", aspect="auto")
  for e in range(num_experts):
    for c in range(num_classes):
      if counts_ExC[e, c]:
        axes.text(c, e, f"{int(counts_ExC[e, c])}", ha="center", va="center", fontsize="x-small")
  axes.set_xticks(range(num_classes))
  axes.set_yticks(
    range(num_experts), [f"expert {e} ({int(counts_ExC[e].sum())})" for e in range(num_experts)]
  )
  axes.set_xlabel("label")
  axes.set_title("test examples by top expert: label share (counts)")
  figure.colorbar(image, ax=axes, label="share of the expert's examples")
  return _save(figure, path)


def plot_confusion_matrix(
  path: pathlib.Path, labels_N: np.ndarray, predictions_N: np.ndarray, num_classes: int
) -> pathlib.Path:
  """Test-set counts of (true label, predicted class), log-coloured so the few errors show."""
  plt = _pyplot()
  import matplotlib.colors

  counts_CxC = np.zeros((num_classes, num_classes), dtype=np.int64)
  np.add.at(counts_CxC, (labels_N, predictions_N), 1)
  figure, axes = plt.subplots(
    figsize=(1.5 + 0.6 * num_classes, 1.2 + 0.6 * num_classes), layout="constrained"
  )
  image = axes.imshow(
    counts_CxC + 1,
    cmap="Blues",
    norm=matplotlib.colors.LogNorm(vmin=1, vmax=max(int(counts_CxC.max()) + 1, 2)),
  )
  for i in range(num_classes):
    for j in range(num_classes):
      if counts_CxC[i, j]:
        axes.text(j, i, str(counts_CxC[i, j]), ha="center", va="center", fontsize="x-small")
  accuracy = np.trace(counts_CxC) / max(counts_CxC.sum(), 1)
  axes.set_xticks(range(num_classes))
  axes.set_yticks(range(num_classes))
  axes.set_xlabel("predicted")
  axes.set_ylabel("true label")
  axes.set_title(f"test confusion matrix (accuracy {accuracy:.2%})")
  figure.colorbar(image, ax=axes, label="count + 1")
  return _save(figure, path)


def write_plots(
  workdir: pathlib.Path,
  gates: GatesCsv,
  *,
  test_labels_N: np.ndarray,
  test_predictions_N: np.ndarray,
  test_gates_NxE: np.ndarray,
  num_classes: int,
) -> list[pathlib.Path]:
  """Draws the four `PLOT_FILES` into `workdir` from gates.csv's training rows and the test pass."""
  workdir = pathlib.Path(workdir)
  training = gates.training_gates()
  num_experts = test_gates_NxE.shape[1]
  return [
    plot_expert_usage(workdir / EXPERT_USAGE_PLOT, training, test_gates_NxE),
    plot_gate_heatmap(workdir / GATE_HEATMAP_PLOT, training, num_experts),
    plot_label_distribution(workdir / LABEL_DISTRIBUTION_PLOT, test_labels_N, test_gates_NxE, num_classes),
    plot_confusion_matrix(workdir / CONFUSION_MATRIX_PLOT, test_labels_N, test_predictions_N, num_classes),
  ]
