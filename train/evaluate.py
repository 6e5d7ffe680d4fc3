"""Evaluate a trained run: python -m train.evaluate --workdir DIR [--step N] [--split test] [--config.eval.F=V ...]

Restores the newest readable checkpoint (or step N) with the config saved in
DIR/config.json, evaluates it on the split with the run's task (seq2seq: loss,
exact match and token accuracy of decoded outputs; classification: accuracy;
...; always the headline keys its results.txt uses, e.g. test_accuracy,
dev_f1, bleu), prints a summary and writes DIR/eval-<step>-<split>.json. Only `eval.*` fields can be overridden (e.g.
--config.eval.beam_size=4): the others are fixed by the checkpoint. Bad input
(a missing workdir or checkpoint, an unknown split, a bad override) stops with
one message and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

USAGE_ERROR = 2
CONFIG_PREFIX = "--config."
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def fail(message) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(USAGE_ERROR)


def split_config_overrides(argv: list[str]) -> tuple[dict[str, str], list[str]]:
  """Takes `--config.a.b=v` and `--config.a.b v` out of argv: ({"a.b": "v"}, the other arguments).

  Done before argparse so that an override's value is never mistaken for a positional
  argument; everything after `--` is left alone.
  """
  overrides, rest = {}, []
  index = 0
  while index < len(argv):
    arg = argv[index]
    if arg == "--":
      rest.extend(argv[index:])
      break
    if arg.startswith(CONFIG_PREFIX):
      field, has_value, value = arg[len(CONFIG_PREFIX) :].partition("=")
      if not has_value:
        if index + 1 >= len(argv):
          fail(f"{arg}: missing value")
        index += 1
        value = argv[index]
      overrides[field] = value
    else:
      rest.append(arg)
    index += 1
  return overrides, rest


def typed_overrides(config, raw: dict[str, str]) -> dict[str, Any]:
  """Converts each raw string to the type of the field it replaces; ConfigError names a bad value.

  Fields that do not exist are passed on unchanged for `loading.with_eval_overrides`
  to reject with the reason.
  """
  import ml_collections

  from tmoe_jax.errors import ConfigError

  typed = {}
  for field, text in raw.items():
    section, _, name = field.partition(".")
    node = config.get(section)
    current = node[name] if isinstance(node, ml_collections.ConfigDict) and name in node else None
    try:
      if isinstance(current, bool):
        if text.lower() not in _TRUE + _FALSE:
          raise ValueError
        typed[field] = text.lower() in _TRUE
      elif isinstance(current, int):
        typed[field] = int(text)
      elif isinstance(current, float):
        typed[field] = float(text)
      else:
        typed[field] = text
    except ValueError:
      raise ConfigError(f"{field}: expected {type(current).__name__}, got {text!r}") from None
  return typed


def load_config(workdir: str, raw_overrides: dict[str, str]):
  from tmoe_jax import loading

  config = loading.read_config(workdir)
  return loading.with_eval_overrides(config, typed_overrides(config, raw_overrides))


def evaluate_split(config, workdir: pathlib.Path, *, step: int | None, split: str) -> dict[str, Any]:
  """Restores the checkpoint and evaluates it on one split with its task's evaluator."""
  from tmoe_jax import loading

  task = loading.load_task(workdir, config)
  graphdef, state = loading.restore_train_state(workdir, config, task, step)
  metrics = task.make_evaluator(graphdef)(state, split, None)
  return {"step": int(state.step), "split": split, **metrics, **task.headline_results(metrics)}


def evaluate(workdir: str | pathlib.Path, *, step: int | None, split: str, raw_overrides: dict[str, str]):
  """Evaluates and writes `<workdir>/eval-<step>-<split>.json`; returns (results, path written)."""
  from tmoe_jax.training import reporting

  workdir = pathlib.Path(workdir)
  config = load_config(str(workdir), raw_overrides)
  results = evaluate_split(config, workdir, step=step, split=split)
  results["eval_config"] = config.eval.to_dict()
  path = workdir / f"eval-{results['step']}-{split}.json"
  reporting.write_text_atomic(path, json.dumps(reporting.to_python(results), indent=2) + "\n")
  return results, path


def parse_args(argv: list[str]):
  overrides, rest = split_config_overrides(argv)
  parser = argparse.ArgumentParser(
    prog="python -m train.evaluate", description=__doc__.split("\n\n")[1], allow_abbrev=False
  )
  parser.add_argument("--workdir", required=True, help="the run directory written by `python -m train`")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  parser.add_argument("--split", default="test", help="data split to evaluate on (default: test)")
  args = parser.parse_args(rest)  # exits 2 with a usage line on bad arguments
  return args, overrides


def main(argv: list[str] | None = None) -> None:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  from absl import logging

  from tmoe_jax.errors import TmoeError

  # Orbax logs each restore at INFO; keep the output to the summary.
  logging.set_verbosity(logging.WARNING)
  try:
    results, path = evaluate(args.workdir, step=args.step, split=args.split, raw_overrides=overrides)
  except TmoeError as error:
    fail(error)
  print(f"step {results['step']}, split {results['split']}:")
  for name, value in results.items():
    if isinstance(value, float):
      print(f"  {name}: {value:.6g}")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
