"""Re-run the original MRPC project's table:
python -m train.sweep_mrpc [--data-dir DIR] [--workdir ROOT] [--out table.md] [--seeds 0,1,2]

Trains configs/mrpc_moe.py once per setting of the original PyTorch project's table
(MLP experts 4 x 256 and 10 x 512, each without and with dropout; RNN experts; CNN
experts) and training seed (`train.seed`: initialisation, batches, dropout; the pairs
held out for selection stay those of `data.seed`), one after the other through the shared
training loop, each in ROOT/<setting>/seed<S> (default ROOT: runs/sweep_mrpc), and writes a
markdown table of dev accuracy and F1 per setting (mean +- standard deviation over the
seeds, and each seed's value), with the majority-class baseline and the original's best
result (66.6 % dev accuracy) as rows, and the command that reproduces each run.
A setting whose workdir already holds a finished run resumes it (no training) and
reports it again. `--only NAME,NAME` runs a subset. Bad input stops with one message
and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

USAGE_ERROR = 2
DEFAULT_ROOT = pathlib.Path("runs") / "sweep_mrpc"
CONFIG_PATH = "configs/mrpc_moe.py"
# The original PyTorch project's best dev accuracy over its table (it reported no F1).
ORIGINAL_BEST_DEV_ACCURACY = 0.666


@dataclasses.dataclass(frozen=True)
class Setting:
  """One row of the table: `model.*` overrides of the base config (others keep the config's value)."""

  name: str
  description: str
  model_overrides: dict[str, Any]


# "with dropout" keeps the config's model.dropout_rate; "no dropout" sets it to 0.
SETTINGS = (
  Setting("mlp_4x256", "MLP experts, 4 x 256, no dropout", {"expert_type": "mlp", "dropout_rate": 0.0}),
  Setting("mlp_4x256_dropout", "MLP experts, 4 x 256, dropout", {"expert_type": "mlp"}),
  Setting(
    "mlp_10x512",
    "MLP experts, 10 x 512, no dropout",
    {"expert_type": "mlp", "num_experts": 10, "hidden_size": 512, "dropout_rate": 0.0},
  ),
  Setting(
    "mlp_10x512_dropout",
    "MLP experts, 10 x 512, dropout",
    {"expert_type": "mlp", "num_experts": 10, "hidden_size": 512},
  ),
  Setting("rnn_4x256_dropout", "RNN (GRU) experts, 4 x 256, dropout", {"expert_type": "rnn"}),
  Setting("cnn_4x256_dropout", "CNN experts, 4 x 256, dropout (the default config)", {"expert_type": "cnn"}),
)
SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}


def setting_config(base_config, setting: Setting):
  """A copy of `base_config` with the setting's model fields; ConfigError for an unknown field."""
  from tmoe_jax.errors import ConfigError

  config = base_config.copy_and_resolve_references()
  for field, value in setting.model_overrides.items():
    if field not in config.model:
      raise ConfigError(f"model.{field}: setting {setting.name!r} overrides a field the config does not have")
    config.model[field] = value
  return config


def command_line(config, setting: Setting, workdir: pathlib.Path) -> str:
  """The `python -m train` command that trains this run alone."""
  parts = ["python -m train", f"--config {CONFIG_PATH}"]
  for field in ("dir", "tfds_data_dir"):
    if config.data[field]:
      parts.append(f"--config.data.{field}={config.data[field]}")
  parts += [f"--config.model.{field}={value}" for field, value in setting.model_overrides.items()]
  parts.append(f"--config.train.seed={config.train.seed}")
  parts.append(f"--workdir {workdir}")
  return " ".join(parts)


def run_sweep(
  base_config,
  root: pathlib.Path,
  settings: Sequence[Setting] = SETTINGS,
  *,
  seeds: Sequence[int] = (0,),
  train_fn: Callable | None = None,
) -> list[dict[str, Any]]:
  """Trains every setting and seed in turn (ROOT/<name>/seed<S>); returns per run its setting,
  seed, config, results, wall time and command."""
  from tmoe_jax.tasks.sentence_pair import SentencePairTask
  from tmoe_jax.training import loop

  train_fn = train_fn or (
    lambda config, workdir: loop.train_and_evaluate(config, workdir, SentencePairTask(config))
  )
  rows = []
  for setting in settings:
    for seed in seeds:
      config = setting_config(base_config, setting)
      config.train.seed = seed
      workdir = root / setting.name / f"seed{seed}"
      print(f"== {setting.name}, seed {seed}: {setting.description} -> {workdir}", flush=True)
      start = time.perf_counter()
      results = train_fn(config, workdir)
      wall = time.perf_counter() - start
      print(
        f"== {setting.name}, seed {seed}: dev accuracy {results['dev_accuracy']:.4f}, "
        f"F1 {results['dev_f1']:.4f}, {wall:.0f} s",
        flush=True,
      )
      rows.append(
        {
          "setting": setting,
          "seed": seed,
          "config": config,
          "results": results,
          "wall_seconds": wall,
          "command": command_line(config, setting, workdir),
        }
      )
  return rows


def _percent(value: float) -> str:
  return f"{100 * value:.1f}"


def spread(values: Sequence[float]) -> str:
  """'mean +- sd (v1 / v2 / ...)' in %, the sample standard deviation; one value alone as it is."""
  if len(values) == 1:
    return _percent(values[0])
  each = " / ".join(_percent(value) for value in values)
  return f"{_percent(statistics.mean(values))} +- {_percent(statistics.stdev(values))} ({each})"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  """The sweep's table, one line per setting over its seeds (dev accuracy / F1 in %), baseline and
  original rows last, then the commands."""
  lines = [
    (
      "| setting | expert type | experts x hidden | dropout | seeds | dev accuracy % | dev F1 % "
      "| selected step (validation accuracy %) | train s | wall s |"
    ),
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  by_setting: dict[str, list[dict[str, Any]]] = {}
  for row in rows:
    by_setting.setdefault(row["setting"].name, []).append(row)
  for name, runs in by_setting.items():
    model = runs[0]["config"].model
    results = [run["results"] for run in runs]
    expert = f"{model.expert_type} ({model.rnn_cell})" if model.expert_type == "rnn" else model.expert_type
    selected = ", ".join(
      f"{r['selected_step']} ({_percent(r['selected_validation_accuracy'])})" for r in results
    )
    lines.append(
      f"| {name} | {expert} | {model.num_experts} x {model.hidden_size} | {model.dropout_rate} "
      f"| {', '.join(str(run['seed']) for run in runs)} "
      f"| {spread([r['dev_accuracy'] for r in results])} | {spread([r['dev_f1'] for r in results])} "
      f"| {selected} | {sum(r['train_time_seconds'] for r in results):.0f} "
      f"| {sum(run['wall_seconds'] for run in runs):.0f} |"
    )
  if rows:
    baseline = rows[0]["results"]
    lines.append(
      f"| majority class (always paraphrase) | | | | | {_percent(baseline['majority_baseline_accuracy'])} "
      f"| {_percent(baseline['majority_baseline_f1'])} | | | |"
    )
  lines.append(
    f"| original PyTorch project, best | | | | | {_percent(ORIGINAL_BEST_DEV_ACCURACY)} | n/a | | | |"
  )
  lines += ["", "Commands (each run alone):", ""]
  lines += [f"- {row['setting'].name}, seed {row['seed']}: `{row['command']}`" for row in rows]
  return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m train.sweep_mrpc", description=__doc__.split("\n\n")[1], allow_abbrev=False
  )
  parser.add_argument("--data-dir", default=None, help="folder with MRPC's train.tsv and dev.tsv")
  parser.add_argument(
    "--workdir", default=str(DEFAULT_ROOT), help=f"root of the runs (default {DEFAULT_ROOT})"
  )
  parser.add_argument("--out", default=None, help="markdown table to write (default ROOT/table.md)")
  parser.add_argument("--seeds", default="0", help="comma-separated train.seed values (default 0)")
  parser.add_argument(
    "--only", default="", help=f"comma-separated settings to run (default all: {', '.join(SETTINGS_BY_NAME)})"
  )
  return parser.parse_args(argv)


def selected_settings(only: str) -> tuple[Setting, ...]:
  from tmoe_jax.errors import ConfigError

  if not only:
    return SETTINGS
  names = [name.strip() for name in only.split(",") if name.strip()]
  unknown = [name for name in names if name not in SETTINGS_BY_NAME]
  if unknown:
    raise ConfigError(f"--only: unknown setting(s) {unknown}; choose from {list(SETTINGS_BY_NAME)}")
  return tuple(SETTINGS_BY_NAME[name] for name in names)


def parse_seeds(text: str) -> tuple[int, ...]:
  from tmoe_jax.errors import ConfigError

  try:
    seeds = tuple(int(part) for part in text.split(",") if part.strip())
  except ValueError:
    raise ConfigError(f"--seeds: comma-separated integers >= 0, got {text!r}") from None
  if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
    raise ConfigError(f"--seeds: distinct integers >= 0, got {text!r}")
  return seeds


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from absl import logging

  from configs import mrpc_moe
  from tmoe_jax.errors import TmoeError
  from tmoe_jax.training import reporting

  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  config = mrpc_moe.get_config()
  if args.data_dir is not None:
    config.data.dir = args.data_dir
  root = pathlib.Path(args.workdir)
  out = pathlib.Path(args.out) if args.out else root / "table.md"
  try:
    rows = run_sweep(config, root, selected_settings(args.only), seeds=parse_seeds(args.seeds))
  except TmoeError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(USAGE_ERROR)
  table = markdown_table(rows)
  out.parent.mkdir(parents=True, exist_ok=True)
  reporting.write_text_atomic(out, table)
  print(table)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
