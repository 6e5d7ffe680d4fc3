"""`python -m train.reproduce`: re-running a record's command and comparing with the record.

The comparisons are checked on hand-made files; one end-to-end test records a short regression
run, re-runs it through the script (bit for bit) and then detects a figure changed in the record.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from train import reproduce

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_results_compare_exactly_skip_wall_clock_and_name_each_difference():
  recorded = {"test_mse": "0.125", "steps": "30", "train_time_seconds": "12.5", "usage": "[0.5, 0.5]"}
  same = {**recorded, "train_time_seconds": "99.0"}
  assert reproduce.compare_results(recorded, same, 0.0) == []
  changed = {**recorded, "test_mse": "0.12500000000000003", "usage": "[0.5, 0.6]", "extra": "1"}
  lines = reproduce.compare_results(recorded, changed, 0.0)
  assert lines == [
    "results.txt extra: recorded None, re-run 1",
    "results.txt test_mse: recorded 0.125, re-run 0.12500000000000003",
    "results.txt usage: recorded [0.5, 0.5], re-run [0.5, 0.6]",
  ]
  # A tolerance accepts what is inside it, element by element, and nothing else.
  assert reproduce.compare_results(recorded, {**recorded, "test_mse": "0.12500000000000003"}, 1e-9) == []
  assert len(reproduce.compare_results(recorded, {**recorded, "usage": "[0.5, 0.6]"}, 1e-3)) == 1


def test_rows_compare_by_step_and_split():
  recorded = [
    {"step": 10, "split": "validation", "loss": 1.0},
    {"step": 20, "split": "test", "loss": 0.5, "accuracy": 0.9},
    {"step": 20, "split": "train", "loss": 0.4, "examples_per_second": 100.0},
  ]
  rerun = [dict(row) for row in recorded]
  rerun[2]["examples_per_second"] = 5.0
  assert reproduce.compare_rows(recorded, rerun, 0.0) == []
  rerun[1]["accuracy"] = 0.91
  del rerun[0]
  assert reproduce.compare_rows(recorded, rerun, 0.0) == [
    "metrics row step 10 validation: missing",
    "metrics row step 20 test accuracy: recorded 0.9, re-run 0.91",
  ]


def test_final_rows_keep_every_evaluation_and_the_last_training_row():
  rows = [{"step": s, "split": "train"} for s in (1, 2)] + [{"step": 2, "split": "validation"}]
  rows += [{"step": 3, "split": "train"}, {"step": 3, "split": "test"}]
  assert reproduce.final_rows(rows) == [
    {"step": 2, "split": "validation"},
    {"step": 3, "split": "test"},
    {"step": 3, "split": "train"},
  ]


def test_bad_records_are_named(tmp_path):
  with pytest.raises(reproduce.RecordError, match="record.json: cannot read"):
    reproduce.read_record(tmp_path)
  (tmp_path / "record.json").write_text("[]")
  with pytest.raises(reproduce.RecordError, match="must hold a JSON object"):
    reproduce.read_record(tmp_path)
  (tmp_path / "record.json").write_text(json.dumps({"command": "--config x"}))
  with pytest.raises(reproduce.RecordError, match="'command' must be a list"):
    reproduce.read_record(tmp_path)
  (tmp_path / "record.json").write_text(json.dumps({"command": [], "rtol": -1}))
  with pytest.raises(reproduce.RecordError, match="'rtol' must be a number >= 0"):
    reproduce.read_record(tmp_path)
  (tmp_path / "record.json").write_text(json.dumps({"command": [], "versions": {"jax": 0.1}}))
  with pytest.raises(reproduce.RecordError, match="'versions' must map package names to version strings"):
    reproduce.read_record(tmp_path)
  record = {"command": ["--config.data.dir=DATA/mnist"], "runs": {"": []}, "rtol": 0.0}
  with pytest.raises(reproduce.RecordError, match="give --data-root"):
    reproduce.run_arguments(record, "", None)
  assert reproduce.run_arguments(record, "", "/data") == ["--config.data.dir=/data/mnist"]


def test_versions_other_than_the_records_are_named():
  installed = reproduce.installed_versions()
  assert sorted(installed) == sorted(reproduce.NUMERIC_PACKAGES)
  assert installed["jax"] == jax.__version__
  assert reproduce.version_differences(installed, installed) == []
  recorded = {**installed, "jax": "0.0.1", "numpy": "1.0"}
  assert reproduce.version_differences(recorded, installed) == [
    f"jax: recorded 0.0.1, installed {jax.__version__}",
    f"numpy: recorded 1.0, installed {np.__version__}",
  ]
  assert reproduce.version_differences({"nopackage": "1"}, installed) == [
    "nopackage: recorded 1, installed not installed"
  ]


def test_a_changed_config_is_reported_before_anything_runs(tmp_path, capsys):
  record_dir = tmp_path / "record"
  record_dir.mkdir()
  arguments = ["--config", str(ROOT / "configs" / "regression.py"), "--config.train.num_steps=30"]
  (record_dir / "record.json").write_text(json.dumps({"command": arguments}))
  config = reproduce.resolved_config(arguments)
  config["model"]["num_experts"] += 1
  (record_dir / "config.json").write_text(json.dumps(config))
  assert reproduce.main([str(record_dir), "--workdir-root", str(tmp_path / "runs")]) == 1
  assert "config model.num_experts: recorded 6, the command gives 5 now" in capsys.readouterr().out
  assert not (tmp_path / "runs").exists()


def test_a_recorded_run_reproduces_bit_for_bit_and_an_edited_figure_is_caught(tmp_path, capsys):
  record_dir = tmp_path / "record"
  record_dir.mkdir()
  command = ["--config", str(ROOT / "configs" / "regression.py"), "--config.train.num_steps=40"]
  command += ["--config.train.eval_every=20", "--config.data.num_test=200", "--config.train.log_every=10"]
  (record_dir / "record.json").write_text(json.dumps({"command": command}))
  first = tmp_path / "first"
  assert reproduce.train(command, first) == 0
  assert reproduce.main([str(record_dir), "--save-from", str(first)]) == 0
  record = reproduce.read_record(record_dir)
  assert record["command"] == command and record["versions"] == reproduce.installed_versions()
  rows = [json.loads(line) for line in (record_dir / "final_metrics.jsonl").read_text().splitlines()]
  assert [(row["step"], row["split"]) for row in rows] == [(20, "validation"), (40, "test"), (40, "train")]

  assert reproduce.main([str(record_dir), "--workdir-root", str(tmp_path / "again")]) == 0
  out = capsys.readouterr().out
  assert "matches the record bit for bit" in out and "versions are not the record's" not in out

  results = (record_dir / "results.txt").read_text()
  mse = reproduce.read_results(record_dir / "results.txt")["test_mse"]
  (record_dir / "results.txt").write_text(
    results.replace(f"test_mse: {mse}", f"test_mse: {float(mse) * 1.01!r}")
  )
  # The finished re-run is compared as it is, without training again.
  assert reproduce.main([str(record_dir), "--workdir-root", str(tmp_path / "again")]) == 1
  out = capsys.readouterr().out
  assert "already finished" in out and "DIFFERS" in out and "results.txt test_mse: recorded" in out
  reproduce.write_versions(record_dir, {**record["versions"], "jax": "0.0.1"})
  reproduce.main([str(record_dir), "--workdir-root", str(tmp_path / "again")])
  assert (
    f"versions are not the record's, so the figures may differ in rounding:\n  jax: recorded 0.0.1, installed {jax.__version__}"
    in capsys.readouterr().out
  )
