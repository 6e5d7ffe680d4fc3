"""Import a Hugging Face MoE checkpoint as a workdir: python -m train.import_hf CHECKPOINT_DIR --workdir W [--config.F=V ...]

Writes W as `python -m train --config configs/hf_finetune.py:CHECKPOINT_DIR` would, without
training: config.json (the checkpoint's config.json translated, `tmoe_jax.hf.families`), the
tokenizer, a step-0 checkpoint holding the imported parameters, and the imported model's
perplexity on the reported split (the test file; validation when `data.test_file` is empty) in
metrics.jsonl and results.txt. The same `python -m train` command then fine-tunes it (resuming
from step 0), `python -m train.evaluate` / `train.generate` use it, and `--config.mesh.expert=N`
shards its experts. The text comes from `--config.data.dir` (default files train.en.gz,
val.en.gz and test_2016_flickr.en.gz there).

Every check runs before anything is written: an unknown architecture, an unsupported setting
(e.g. a sliding window) or a missing or mis-shaped tensor stops with one message, exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from train.overrides import fail, split_config_overrides, typed_overrides


def parse_args(argv: list[str]):
  overrides, rest = split_config_overrides(argv)
  parser = argparse.ArgumentParser(
    prog="python -m train.import_hf", description=__doc__.split("\n\n")[1], allow_abbrev=False
  )
  parser.add_argument("checkpoint", help="a Hugging Face checkpoint directory (config.json, safetensors)")
  parser.add_argument("--workdir", required=True, help="the workdir to write")
  return parser.parse_args(rest), overrides


def main(argv: list[str] | None = None) -> None:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  from absl import logging

  from configs import hf_finetune
  from tmoe_jax.errors import TmoeError
  from tmoe_jax.tasks.runner import run

  logging.set_verbosity(logging.WARNING)
  try:
    config = hf_finetune.get_config(args.checkpoint)
    for field, value in typed_overrides(config, overrides).items():
      section, _, name = field.partition(".")
      config[section][name] = value
    config.train.num_steps = 0  # the import itself: step 0, evaluated
    run(config, args.workdir)
  except TmoeError as error:
    fail(error)


if __name__ == "__main__":
  main()
