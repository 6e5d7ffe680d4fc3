"""Evaluate a trained run: python -m train.evaluate --workdir DIR [--step N] [--split S] [--config.eval.F=V ...]

Restores the newest readable checkpoint (or step N) with the config saved in
DIR/config.json and evaluates it with the run's task (any task of
`tasks.table.TASKS`) on split S, by default the one its training reported on
(seq2seq: test, sentence_pair: dev, language_model: validation, ...). Prints a
summary and writes DIR/eval-<step>-<split>.json: the evaluator's metrics and
the headline keys of the task's results.txt (e.g. exact_match, test_accuracy,
dev_f1, val_bits_per_char, test_mse). Only `eval.*` fields can be overridden
(e.g. --config.eval.beam_size=4): the others are fixed by the checkpoint.
Overrides are parsed as `python -m train` parses them (`train.overrides`).
Bad input (a missing workdir or checkpoint, an unknown split, a bad override)
stops with one message and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

# `fail`, `split_config_overrides` and `typed_overrides` are imported from here by train.translate too.
from train.overrides import fail, split_config_overrides, typed_overrides


def load_config(workdir: str, overrides: Sequence[str]):
  """The run's saved config with the `--config.eval.*` arguments `overrides` applied."""
  from tmoe_jax import loading

  config = loading.read_config(workdir)
  return loading.with_eval_overrides(config, typed_overrides(config, overrides))


def evaluate_split(config, workdir: pathlib.Path, *, step: int | None, split: str | None) -> dict[str, Any]:
  """Restores the checkpoint and evaluates it on one split (None: the task's own) with its task's evaluator."""
  from tmoe_jax import loading

  task = loading.load_task(workdir, config)
  split = task.eval_split if split is None else split
  graphdef, state = loading.restore_train_state(workdir, config, task, step)
  metrics = task.make_evaluator(graphdef)(state, split, None)
  return {"step": int(state.step), "split": split, **metrics, **task.headline_results(metrics)}


def evaluate(
  workdir: str | pathlib.Path, *, step: int | None, split: str | None, overrides: Sequence[str] = ()
):
  """Evaluates and writes `<workdir>/eval-<step>-<split>.json`; returns (results, path written).

  overrides: `--config.eval.F=V` arguments, e.g. ["--config.eval.beam_size=4"].
  """
  from tmoe_jax.training import reporting

  workdir = pathlib.Path(workdir)
  config = load_config(str(workdir), overrides)
  results = evaluate_split(config, workdir, step=step, split=split)
  results["eval_config"] = config.eval.to_dict()
  path = workdir / f"eval-{results['step']}-{results['split']}.json"
  reporting.write_text_atomic(path, json.dumps(reporting.to_python(results), indent=2) + "\n")
  return results, path


def parse_args(argv: list[str]):
  overrides, rest = split_config_overrides(argv)
  parser = argparse.ArgumentParser(
    prog="python -m train.evaluate", description=__doc__.split("\n\n")[1], allow_abbrev=False
  )
  parser.add_argument("--workdir", required=True, help="the run directory written by `python -m train`")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  parser.add_argument(
    "--split", default=None, help="data split to evaluate on (default: the one the task reports, e.g. test)"
  )
  args = parser.parse_args(rest)  # exits 2 with a usage line on bad arguments
  return args, overrides


def main(argv: list[str] | None = None) -> None:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  from absl import logging

  from tmoe_jax.errors import TmoeError

  # Orbax logs each restore at INFO; keep the output to the summary.
  logging.set_verbosity(logging.WARNING)
  try:
    results, path = evaluate(args.workdir, step=args.step, split=args.split, overrides=overrides)
  except TmoeError as error:
    fail(error)
  print(f"step {results['step']}, split {results['split']}:")
  for name, value in results.items():
    if isinstance(value, float):
      print(f"  {name}: {value:.6g}")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
