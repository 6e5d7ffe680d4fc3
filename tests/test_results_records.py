"""The README's experiment figures against the records in `results/` they cite, so the two cannot drift.

Each README table row that names a record (`results/<name>/`) must state that record's figures,
formatted as the README writes them, and every record must hold the run's command and machine
(README.md), its resolved config.json, its results.txt and its final metrics rows.
"""

from __future__ import annotations

import json
import pathlib
import re
import statistics

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
RECORD_FILES = ("README.md", "config.json", "results.txt", "final_metrics.jsonl")


def read_results(path: pathlib.Path) -> dict[str, str]:
  """results.txt as {key: value text}."""
  pairs = (line.partition(": ") for line in path.read_text().splitlines() if ": " in line)
  return {key: value for key, _, value in pairs}


def number(record: pathlib.Path, key: str) -> float:
  return float(read_results(record / "results.txt")[key])


def readme_row(name: str) -> str:
  """The README table row that cites `results/<name>/`."""
  rows = [line for line in (ROOT / "README.md").read_text().splitlines() if f"results/{name}/" in line]
  assert len(rows) == 1, f"expected one README row citing results/{name}/, found {len(rows)}"
  return rows[0]


def percent(fraction: float) -> str:
  return f"{100 * fraction:.2f} %"


def per_seed_perplexities(variant: str) -> list[float]:
  runs = sorted((RESULTS / "causal_lm_multi30k").glob(f"{variant}_seed*"))
  assert len(runs) >= 3, "at least three seeds"
  return [number(run, "val_perplexity") for run in runs]


def causal_lm_figures() -> list[str]:
  figures = []
  for variant in ("moe", "dense"):
    values = per_seed_perplexities(variant)
    figures.append(f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}")
    figures.append(" / ".join(f"{value:.2f}" for value in values))
  return figures


# record -> the figures its README row must state, computed from the record's files.
EXPECTED_FIGURES = {
  "tmoe_default": lambda r: [
    f"{percent(number(r, 'exact_match'))} exact match",
    f"{percent(number(r, 'token_accuracy'))} token accuracy",
    f"test loss {number(r, 'test_loss'):.5f}",
  ],
  "mnist_cnn_moe": lambda r: [f"{percent(number(r, 'test_accuracy'))} again"],
  "tmoe_multi30k_seed0": lambda r: [
    f"{number(r, 'bleu'):.1f} greedy",
    f"{json.loads((r / 'eval-1500-test-beam4.json').read_text())['bleu']:.1f} beam",
    f"loss {number(r, 'test_loss'):.3f}",
  ],
  "causal_lm_multi30k": lambda r: causal_lm_figures(),
}


def test_every_record_is_checked_and_every_cited_record_exists():
  records = {path.name for path in RESULTS.iterdir() if path.is_dir()}
  assert records == set(EXPECTED_FIGURES)
  cited = set(re.findall(r"results/([a-z0-9_]+)/", (ROOT / "README.md").read_text()))
  assert cited <= records, f"the README cites records that do not exist: {sorted(cited - records)}"


@pytest.mark.parametrize("name", sorted(EXPECTED_FIGURES))
def test_readme_states_the_figures_of_its_record(name):
  record = RESULTS / name
  runs = [record] if (record / "results.txt").exists() else sorted(p for p in record.iterdir() if p.is_dir())
  assert (record / "README.md").is_file()
  for run in runs:
    for file_name in RECORD_FILES[1:]:
      assert (run / file_name).is_file(), f"{run / file_name} is missing"
    json.loads((run / "config.json").read_text())
    rows = [json.loads(line) for line in (run / "final_metrics.jsonl").read_text().splitlines()]
    assert rows and any(row["split"] == "train" for row in rows)
  row = readme_row(name)
  for figure in EXPECTED_FIGURES[name](record):
    assert figure in row, f"README row citing results/{name}/ does not state {figure!r}"
