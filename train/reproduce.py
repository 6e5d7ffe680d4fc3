"""Re-run the command behind a record in `results/` and compare what it writes with the record.

  python -m train.reproduce results/tmoe_default                       # re-run, compare; exit 1 on a difference
  python -m train.reproduce results/mnist_moe --data-root ../shared/data
  python -m train.reproduce results/smoe_lm --run moe_seed1             # one run of a record of several
  python -m train.reproduce results/NAME --save-from WORKDIR [--run R]  # (re)write a record's files from a run

A record is a folder holding README.md (what the run is, the machine and date), `record.json`:

  {"command": ["--config", "configs/mnist_moe.py", "--config.data.dir=DATA/mnist"],
   "runs": {"seed1": ["--config.train.seed=1"], ...},   # optional: runs that add arguments
   "rtol": 0.0,                                          # relative tolerance; 0: bit for bit
   "versions": {"jax": "0.10.2", ...}}                   # the packages that set the numerics

and, per run (in the folder itself, or in `<run>/` when there are several), the run's
config.json, results.txt and final metrics rows (`final_metrics.jsonl`: every evaluation row
and the last training row of metrics.jsonl). `DATA/` in the command stands for `--data-root`.
Wall-clock figures (train time, throughput) are never compared; every other key and row is.
A bit-for-bit match needs the recorded versions of jax, jaxlib, flax, optax and numpy (other
versions may round differently); the script names any that differ before it re-runs.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import math
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

RECORD_FILE = "record.json"
RUN_FILES = ("config.json", "results.txt", "final_metrics.jsonl")
DATA_PREFIX = "DATA/"
# Config keys that name this machine's paths or console, not the experiment.
MACHINE_CONFIG_KEYS = frozenset({"data.dir", "data.tfds_data_dir", "train.progress_bar"})
# Keys that measure the machine, not the run.
WALL_CLOCK_KEYS = frozenset({"train_time_seconds", "steps_per_second_this_run"})
WALL_CLOCK_SUFFIX = "_per_second"
# The packages whose versions can change a run's rounding (XLA's kernels, the model and
# optimizer code, the data pipeline's NumPy).
NUMERIC_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")
NOT_INSTALLED = "not installed"


class RecordError(ValueError):
  """A record folder that is missing a file or holds a malformed one."""


def read_record(record_dir: pathlib.Path) -> dict[str, Any]:
  """record.json, checked: {"command": [str], "runs": {name: [str]}, "rtol": float}."""
  path = record_dir / RECORD_FILE
  try:
    record = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as error:
    raise RecordError(f"{path}: cannot read the record ({error})") from None
  if not isinstance(record, dict):
    raise RecordError(f"{path}: must hold a JSON object with 'command', 'runs' and 'rtol'")
  command, runs, rtol = record.get("command"), record.get("runs", {"": []}), record.get("rtol", 0.0)
  if not (isinstance(command, list) and all(isinstance(arg, str) for arg in command)):
    raise RecordError(f"{path}: 'command' must be a list of strings (the arguments of python -m train)")
  if not (isinstance(runs, dict) and runs and all(isinstance(a, list) for a in runs.values())):
    raise RecordError(f"{path}: 'runs' must map each run's folder name to its extra arguments")
  if not (isinstance(rtol, (int, float)) and rtol >= 0):
    raise RecordError(f"{path}: 'rtol' must be a number >= 0, got {rtol!r}")
  versions = record.get("versions", {})
  if not (isinstance(versions, dict) and all(isinstance(v, str) for v in versions.values())):
    raise RecordError(f"{path}: 'versions' must map package names to version strings")
  return {"command": command, "runs": runs, "rtol": float(rtol), "versions": versions}


def installed_versions() -> dict[str, str]:
  """The versions of `NUMERIC_PACKAGES` in this environment (`NOT_INSTALLED` if absent)."""
  versions = {}
  for package in NUMERIC_PACKAGES:
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = NOT_INSTALLED
  return versions


def version_differences(recorded: dict[str, str], installed: dict[str, str]) -> list[str]:
  """One line per package whose recorded version is not the installed one."""
  return [
    f"{package}: recorded {recorded[package]}, installed {installed.get(package, NOT_INSTALLED)}"
    for package in sorted(recorded)
    if recorded[package] != installed.get(package, NOT_INSTALLED)
  ]


def write_versions(record_dir: pathlib.Path, versions: dict[str, str]) -> None:
  """Sets record.json's "versions" (the rest of the file as it was)."""
  path = record_dir / RECORD_FILE
  record = json.loads(path.read_text())
  record["versions"] = versions
  path.write_text(json.dumps(record, indent=2) + "\n")


def run_arguments(record: dict[str, Any], run: str, data_root: str | None) -> list[str]:
  """The `python -m train` arguments of one run, DATA/ replaced by `data_root`."""
  arguments = record["command"] + record["runs"][run]
  if any(DATA_PREFIX in arg for arg in arguments):
    if not data_root:
      raise RecordError(f"the command reads datasets ({DATA_PREFIX}...): give --data-root")
    arguments = [arg.replace(DATA_PREFIX, f"{pathlib.Path(data_root).resolve()}/") for arg in arguments]
  return arguments


def resolved_config(arguments: Sequence[str]) -> dict[str, Any]:
  """The config `python -m train ARGUMENTS` would run, as nested dicts (the workdir aside)."""
  from absl import flags
  from ml_collections import config_flags

  from train.__main__ import DEFAULT_CONFIG
  from train.overrides import parse_flags

  flag_values = flags.FlagValues()
  argv = ["reproduce", *arguments]
  config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), flag_values=flag_values, sys_argv=argv)
  parse_flags(flag_values, argv)
  return json.loads(flag_values.config.to_json())


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in config.items():
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def config_differences(run_dir: pathlib.Path, arguments: Sequence[str]) -> list[str]:
  """Fields where the config the command gives now differs from the recorded config.json."""
  from tmoe_jax.training.workdir import read_saved_config_json, with_current_value_names

  recorded = _flatten(read_saved_config_json(run_dir / "config.json"))
  now = _flatten(with_current_value_names(resolved_config(arguments)))
  return [
    f"config {key}: recorded {recorded.get(key)!r}, the command gives {now.get(key)!r} now"
    for key in sorted(set(recorded) | set(now))
    if key not in MACHINE_CONFIG_KEYS and recorded.get(key) != now.get(key)
  ]


def read_results(path: pathlib.Path) -> dict[str, str]:
  """results.txt as {key: value text}."""
  pairs = (line.partition(": ") for line in path.read_text().splitlines() if ": " in line)
  return {key: value for key, _, value in pairs}


def final_rows(metrics_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """The rows a record keeps: every evaluation row and the last training row."""
  train = [row for row in metrics_rows if row.get("split") == "train"]
  return [row for row in metrics_rows if row.get("split") != "train"] + train[-1:]


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _differs(recorded: Any, rerun: Any, rtol: float) -> bool:
  if isinstance(recorded, bool) or isinstance(rerun, bool):
    return recorded != rerun
  if isinstance(recorded, (int, float)) and isinstance(rerun, (int, float)):
    if math.isnan(recorded) or math.isnan(rerun):
      return not (math.isnan(recorded) and math.isnan(rerun))
    return abs(recorded - rerun) > rtol * abs(recorded) if rtol else recorded != rerun
  if isinstance(recorded, (list, tuple)) and isinstance(rerun, (list, tuple)):
    return len(recorded) != len(rerun) or any(_differs(a, b, rtol) for a, b in zip(recorded, rerun))
  if isinstance(recorded, dict) and isinstance(rerun, dict):
    return recorded.keys() != rerun.keys() or any(_differs(recorded[k], rerun[k], rtol) for k in recorded)
  return recorded != rerun


def _is_wall_clock(key: str) -> bool:
  return key in WALL_CLOCK_KEYS or key.endswith(WALL_CLOCK_SUFFIX)


def compare_results(recorded: dict[str, str], rerun: dict[str, str], rtol: float) -> list[str]:
  """One line per results.txt key that is missing, new or different (wall-clock keys skipped)."""
  lines = []
  for key in sorted(set(recorded) | set(rerun)):
    if _is_wall_clock(key):
      continue
    if key not in rerun or key not in recorded:
      lines.append(f"results.txt {key}: recorded {recorded.get(key)}, re-run {rerun.get(key)}")
    elif _differs(_literal(recorded[key]), _literal(rerun[key]), rtol):
      lines.append(f"results.txt {key}: recorded {recorded[key]}, re-run {rerun[key]}")
  return lines


def compare_rows(recorded: list[dict[str, Any]], rerun: list[dict[str, Any]], rtol: float) -> list[str]:
  """One line per final metrics row (by step and split) or value that differs."""

  def by_key(rows):
    return {(row.get("step"), row.get("split")): row for row in rows}

  old, new = by_key(recorded), by_key(rerun)
  lines = []
  for key in sorted(set(old) | set(new), key=str):
    if key not in old or key not in new:
      lines.append(f"metrics row step {key[0]} {key[1]}: {'missing' if key in old else 'not in the record'}")
      continue
    for name in sorted(set(old[key]) | set(new[key])):
      if not _is_wall_clock(name) and _differs(old[key].get(name), new[key].get(name), rtol):
        lines.append(
          f"metrics row step {key[0]} {key[1]} {name}: recorded {old[key].get(name)}, re-run {new[key].get(name)}"
        )
  return lines


def read_rows(path: pathlib.Path) -> list[dict[str, Any]]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare_run(run_dir: pathlib.Path, workdir: pathlib.Path, rtol: float) -> list[str]:
  """Differences between a record's run files and a finished run's workdir."""
  rows = final_rows(read_rows(workdir / "metrics.jsonl"))
  return compare_results(
    read_results(run_dir / "results.txt"), read_results(workdir / "results.txt"), rtol
  ) + (compare_rows(read_rows(run_dir / "final_metrics.jsonl"), rows, rtol))


def save_run(workdir: pathlib.Path, run_dir: pathlib.Path) -> None:
  """Writes a finished run's config.json, results.txt and final metrics rows into `run_dir`."""
  for name in ("config.json", "results.txt", "metrics.jsonl"):
    if not (workdir / name).is_file():
      raise RecordError(f"{workdir / name}: missing; is {workdir} a finished run?")
  run_dir.mkdir(parents=True, exist_ok=True)
  shutil.copyfile(workdir / "config.json", run_dir / "config.json")
  shutil.copyfile(workdir / "results.txt", run_dir / "results.txt")
  rows = final_rows(read_rows(workdir / "metrics.jsonl"))
  (run_dir / "final_metrics.jsonl").write_text(
    "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
  )


def run_dir_of(record_dir: pathlib.Path, run: str) -> pathlib.Path:
  return record_dir / run if run else record_dir


def train(arguments: list[str], workdir: pathlib.Path) -> int:
  command = [sys.executable, "-m", "train", *arguments, "--workdir", str(workdir)]
  command.append("--config.train.progress_bar=false")
  print("$", " ".join(command), flush=True)
  return subprocess.run(command, cwd=pathlib.Path(__file__).resolve().parent.parent).returncode


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m train.reproduce", description=__doc__.split("\n")[0])
  parser.add_argument("record", type=pathlib.Path, help="a record folder, e.g. results/tmoe_default")
  parser.add_argument("--run", default=None, help="only this run of a record of several")
  parser.add_argument("--data-root", default=None, help="the folder DATA/ in the command stands for")
  parser.add_argument("--workdir-root", type=pathlib.Path, default=None, help="where the re-runs go")
  parser.add_argument("--save-from", type=pathlib.Path, default=None, help="write the record from this run")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    record = read_record(args.record)
    runs = list(record["runs"]) if args.run is None else [args.run]
    unknown = [run for run in runs if run not in record["runs"]]
    if unknown:
      raise RecordError(f"--run {unknown[0]!r}: the record has runs {sorted(record['runs'])}")
    if args.save_from is not None:
      if len(runs) != 1:
        raise RecordError("--save-from writes one run: name it with --run")
      save_run(args.save_from, run_dir_of(args.record, runs[0]))
      write_versions(args.record, installed_versions())
      print(f"wrote {run_dir_of(args.record, runs[0])} from {args.save_from}")
      return 0
    arguments = {run: run_arguments(record, run, args.data_root) for run in runs}
  except RecordError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  try:
    changed = [
      line for run in runs for line in config_differences(run_dir_of(args.record, run), arguments[run])
    ]
  except Exception as error:  # a config file that fails to load, a bad override
    changed = [f"the command does not resolve to a config: {error}"]
  if changed:
    print("the command no longer gives the recorded config, so the re-run could not match:")
    for line in changed:
      print("  " + line)
    return 1
  other_versions = version_differences(record["versions"], installed_versions())
  if other_versions:
    print("this environment's versions are not the record's, so the figures may differ in rounding:")
    for line in other_versions:
      print("  " + line)
  root = args.workdir_root or pathlib.Path(tempfile.mkdtemp(prefix=f"reproduce-{args.record.name}-"))
  failures = 0
  for run in runs:
    workdir = root / (run or args.record.name)
    if (workdir / "results.txt").exists():
      print(f"{workdir}: already finished; comparing it as it is")
    elif (code := train(arguments[run], workdir)) != 0:
      print(f"{run or args.record.name}: python -m train exited with {code}")
      failures += 1
      continue
    differences = compare_run(run_dir_of(args.record, run), workdir, record["rtol"])
    how = "bit for bit" if not record["rtol"] else f"within relative {record['rtol']:g}"
    print(f"{run or args.record.name}: " + ("matches the record " + how if not differences else "DIFFERS"))
    for line in differences:
      print("  " + line)
    failures += bool(differences)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
