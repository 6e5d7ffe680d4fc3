"""The README's experiment figures against the records in `results/` they cite, so the two cannot drift.

Each README table row that names a record (`results/<name>/`) must state that record's figures,
formatted as the README writes them, and every record must hold the run's command and package
versions (record.json, for `python -m train.reproduce`), its machine (README.md), and per run its
resolved config.json, results.txt and final metrics rows; the recorded command must still give
the recorded config.
"""

from __future__ import annotations

import json
import pathlib
import re
import statistics

import pytest

from train import reproduce

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"


def number(record: pathlib.Path, key: str) -> float:
  return float(reproduce.read_results(record / "results.txt")[key])


def readme_row(name: str) -> str:
  """The README table row that cites `results/<name>/`."""
  rows = [line for line in (ROOT / "README.md").read_text().splitlines() if f"results/{name}/" in line]
  assert len(rows) == 1, f"expected one README row citing results/{name}/, found {len(rows)}"
  return rows[0]


def percent(fraction: float, digits: int = 2) -> str:
  return f"{100 * fraction:.{digits}f} %"


def seed_runs(record: pathlib.Path, prefix: str) -> list[pathlib.Path]:
  """The runs `<prefix>_seed<S>` of a record, in seed order (at least three seeds)."""
  runs = sorted(record.glob(f"{prefix}_seed*"))
  assert len(runs) >= 3, f"{record.name}/{prefix}: at least three seeds"
  return runs


def seed_values(record: pathlib.Path, prefix: str, key: str) -> list[float]:
  """`key` of each run's results.txt, in seed order."""
  return [number(run, key) for run in seed_runs(record, prefix)]


def spread(values: list[float], digits: int, scale: float = 1.0) -> list[str]:
  """The README's 'mean +- sd' and 'v0 / v1 / v2' for per-seed values."""
  scaled = [scale * value for value in values]
  return [
    f"{statistics.mean(scaled):.{digits}f} +- {statistics.stdev(scaled):.{digits}f}",
    " / ".join(f"{value:.{digits}f}" for value in scaled),
  ]


def variants_figures(record: pathlib.Path, variants: tuple[str, ...], key: str, digits: int) -> list[str]:
  return [figure for variant in variants for figure in spread(seed_values(record, variant, key), digits)]


def seed_files(record: pathlib.Path, prefix: str, name: str) -> list[dict]:
  """The JSON file `name` (a `train.evaluate` output) of each run `<prefix>_seed<S>`, in seed order."""
  return [json.loads((run / name).read_text()) for run in seed_runs(record, prefix)]


MOE_AND_DENSE = ("moe", "dense")


def causal_lm_figures(record: pathlib.Path) -> list[str]:
  """Test perplexity per variant over its seeds, and the mean +- sd of each run's `val` evaluation file."""
  figures = variants_figures(record, MOE_AND_DENSE, "test_perplexity", 2)
  for variant in MOE_AND_DENSE:
    evaluations = seed_files(record, variant, "eval-600-validation.json")
    assert all((e["step"], e["split"]) == (600, "validation") for e in evaluations), variant
    figures.append(f"val {spread([e['val_perplexity'] for e in evaluations], 2)[0]}")
  return figures


# The MRPC sweep's README table: setting run prefix -> the label its line starts with.
MRPC_SWEEP_LABELS = {
  "mlp_4x256": "MLP 4 x 256, no dropout",
  "mlp_4x256_dropout": "MLP 4 x 256, dropout 0.1",
  "mlp_10x512": "MLP 10 x 512, no dropout",
  "mlp_10x512_dropout": "MLP 10 x 512, dropout 0.1",
  "rnn_4x256_dropout": "RNN (GRU) 4 x 256, dropout 0.1",
  "cnn_4x256_dropout": "CNN 4 x 256, dropout 0.1 (default)",
}


def mrpc_sweep_lines(record: pathlib.Path) -> list[str]:
  """Each setting's table line must begin with its label, then accuracy and F1 over the seeds."""
  lines = []
  for prefix, label in MRPC_SWEEP_LABELS.items():
    accuracy, f1 = (spread(seed_values(record, prefix, f"dev_{k}"), 1, 100.0) for k in ("accuracy", "f1"))
    lines.append(f"| {label} | {accuracy[0]} ({accuracy[1]}) | {f1[0]} ({f1[1]}) |")
  return lines


def multi30k_figures(record: pathlib.Path) -> list[str]:
  """Per variant (MoE, dense) over its seeds: greedy BLEU, beam-4 BLEU and test loss (test_2016_flickr),
  each as 'mean +- sd' and the per-seed values."""
  figures = []
  for variant in MOE_AND_DENSE:
    beams = seed_files(record, variant, "eval-1500-test-beam4.json")
    assert all(
      (beam["step"], beam["split"], beam["eval_config"]["beam_size"]) == (1500, "test", 4) for beam in beams
    )
    figures += spread(seed_values(record, variant, "bleu"), 1)
    figures += spread([beam["bleu"] for beam in beams], 1)
    figures += spread(seed_values(record, variant, "test_loss"), 3)
  return figures


# record -> the figures its README line must state, computed from the record's files.
EXPECTED_FIGURES = {
  "tmoe_default": lambda r: [
    f"{percent(number(r, 'exact_match'))} exact match",
    f"{percent(number(r, 'token_accuracy'))} token accuracy",
    f"test loss {number(r, 'test_loss'):.5f}",
  ],
  "mnist_moe": lambda r: [f"{percent(number(r, 'test_accuracy'))}** test accuracy"],
  "mnist_cnn_moe": lambda r: [f"{percent(number(r, 'test_accuracy'))}** test accuracy"],
  "mnist_guided": lambda r: [
    f"{percent(number(r / 'cross_entropy', 'test_accuracy'))}** test accuracy",
    f"gate agrees with the label map on {percent(number(r / 'cross_entropy', 'test_routing_agreement'))}",
    f"as in the original: {percent(number(r / 'binary_cross_entropy', 'test_accuracy'))}",
  ],
  "mrpc_moe": lambda r: [
    f"{percent(number(r, 'dev_accuracy'), 1)} dev accuracy, F1 {100 * number(r, 'dev_f1'):.1f}",
  ],
  "regression": lambda r: variants_figures(r, ("softmax", "top2", "dense_mlp"), "test_mse", 3),
  "smoe_lm": lambda r: variants_figures(r, ("smoe", "moe", "dense", "sampled"), "val_bits_per_char", 3),
  "tmoe_multi30k": multi30k_figures,
  "causal_lm_multi30k": causal_lm_figures,
}
# Records whose README figures are table lines of their own rather than one row.
README_LINES = {"mrpc_sweep": mrpc_sweep_lines}


RECORDS = sorted({*EXPECTED_FIGURES, *README_LINES})


@pytest.mark.parametrize("name", RECORDS)
def test_each_recorded_command_still_gives_the_recorded_config(name):
  """Otherwise `python -m train.reproduce` could not match: the record is stale."""
  record = RESULTS / name
  spec = reproduce.read_record(record)
  # A bit-for-bit re-run needs the versions that made the record; they must be stated.
  assert sorted(spec["versions"]) == sorted(reproduce.NUMERIC_PACKAGES)
  for run in spec["runs"]:
    arguments = reproduce.run_arguments(spec, run, data_root="DATA")
    assert reproduce.config_differences(reproduce.run_dir_of(record, run), arguments) == [], run


def test_every_record_is_checked_and_every_cited_record_exists():
  records = {path.name for path in RESULTS.iterdir() if path.is_dir()}
  assert records == set(RECORDS)
  cited = set(re.findall(r"results/([a-z0-9_]+)/", (ROOT / "README.md").read_text()))
  assert cited == records, f"records the README does not cite or cites without a folder: {cited ^ records}"


@pytest.mark.parametrize("name", RECORDS)
def test_readme_states_the_figures_of_its_record(name):
  record = RESULTS / name
  runs = reproduce.read_record(record)["runs"]
  assert (record / "README.md").is_file()
  for run in runs:
    run_dir = reproduce.run_dir_of(record, run)
    for file_name in reproduce.RUN_FILES:
      assert (run_dir / file_name).is_file(), f"{run_dir / file_name} is missing"
    rows = reproduce.read_rows(run_dir / "final_metrics.jsonl")
    assert rows and [row["split"] for row in rows].count("train") == 1
  if name in README_LINES:
    readme = (ROOT / "README.md").read_text()
    for line in README_LINES[name](record):
      assert line in readme, f"the README does not state {line!r} (record results/{name}/)"
    return
  row = readme_row(name)
  for figure in EXPECTED_FIGURES[name](record):
    assert figure in row, f"README row citing results/{name}/ does not state {figure!r}"
