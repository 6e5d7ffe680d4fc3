"""Translate with a trained run: python -m train.translate --workdir DIR [--step N] [TEXT ...]

Decodes each TEXT, or each line of stdin when none is given, and prints one
output line per input, using DIR's vocabulary.json and newest readable
checkpoint (or step N). Greedy, or beam search when eval.beam_size > 1;
--config.eval.F=V overrides eval fields. A line longer than the model's
source length, or any other bad input, stops with one message and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from train.overrides import fail, split_config_overrides, typed_overrides


def check_lines(lines: list[str], run) -> None:
  """DataError naming the first line the model cannot read; a warning for characters it never saw."""
  from tmoe_jax.errors import DataError

  for number, line in enumerate(lines, start=1):
    length = run.source_length(line)
    if length > run.max_source_length:
      raise DataError(
        f"line {number} {line[:60]!r}: {length} tokens with EOS, longer than the model's maximum source "
        f"length of {run.max_source_length}"
      )
    if run.vocabulary.UNK_ID in run.vocabulary.encode(line):
      sys.stderr.write(f"warning: line {number}: has characters the vocabulary does not know\n")


def parse_args(argv: list[str]):
  overrides, rest = split_config_overrides(argv)
  parser = argparse.ArgumentParser(
    prog="python -m train.translate", description=__doc__.split("\n\n")[1], allow_abbrev=False
  )
  parser.add_argument("--workdir", required=True, help="the run directory written by `python -m train`")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  parser.add_argument("texts", nargs="*", help="texts to translate (default: the lines of stdin)")
  return parser.parse_args(rest), overrides


def main(argv: list[str] | None = None) -> None:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  from absl import logging

  from tmoe_jax import loading
  from tmoe_jax.errors import TmoeError

  logging.set_verbosity(logging.WARNING)
  try:
    config = loading.read_config(args.workdir)
    lines = args.texts or [line.rstrip("\r\n") for line in sys.stdin]
    run = loading.load(args.workdir, args.step, eval_overrides=typed_overrides(config, overrides))
    check_lines(lines, run)
    outputs = run.translate(lines)
  except TmoeError as error:
    fail(error)
  for output in outputs:
    print(output)


if __name__ == "__main__":
  main()
