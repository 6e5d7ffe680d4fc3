"""Export a causal_lm run as a Hugging Face checkpoint: python -m train.export_hf --workdir W --out DIR [--family F]

Writes DIR/config.json, DIR/model.safetensors (one tensor per expert, the layout transformers
writes) and DIR/tokenizer.json, loadable with transformers' AutoModelForCausalLM as the family
F (default: the family the run was imported from, `init.hf_family`). Special token ids come
from the imported checkpoint's config.json when it is still there, else from the run's
tokenizer. A model the family cannot express (e.g. expert-choice routing, or another q/k
norm) stops with one message naming the setting, exit code 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from train.overrides import fail


def parse_args(argv: list[str]):
  parser = argparse.ArgumentParser(
    prog="python -m train.export_hf", description=__doc__.split("\n\n")[1], allow_abbrev=False
  )
  parser.add_argument("--workdir", required=True, help="a causal_lm run directory")
  parser.add_argument(
    "--out", required=True, help="the checkpoint directory to write (must not exist or be empty)"
  )
  parser.add_argument(
    "--family", default="", help="mixtral, qwen2_moe, qwen3_moe or olmoe (default: init.hf_family)"
  )
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  return parser.parse_args(argv)


def special_ids(run) -> dict[str, int | None]:
  from tmoe_jax.hf.checkpoint_directory import read_config, special_token_ids

  source = run.config.init.hf_checkpoint
  if source and (pathlib.Path(source) / "config.json").is_file():
    return special_token_ids(read_config(source))
  return {
    "bos": run.tokenizer.token_to_id("<s>"),
    "eos": run.end_of_text_id,
    "pad": run.tokenizer.token_to_id("<pad>"),
  }


def main(argv: list[str] | None = None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from absl import logging

  from tmoe_jax import loading
  from tmoe_jax.errors import TmoeError
  from tmoe_jax.hf import FAMILIES, save_hf
  from tmoe_jax.tasks.causal_lm import TOKENIZER_FILE

  logging.set_verbosity(logging.WARNING)
  try:
    run = loading.load(args.workdir, args.step)
    if run.config.task != "causal_lm":
      fail(f"{args.workdir}: a {run.config.task} run; only causal_lm runs have a Hugging Face form")
    family = args.family or run.config.init.hf_family
    if family not in FAMILIES:
      fail(f"--family: must be one of {sorted(FAMILIES)} (the run was not imported), got {family!r}")
    out = save_hf(
      run.model,
      args.out,
      family=FAMILIES[family],
      special_ids=special_ids(run),
      tokenizer_path=pathlib.Path(args.workdir) / TOKENIZER_FILE,
    )
  except TmoeError as error:
    fail(error)
  print(f"wrote {out} ({family}, step {run.step})")


if __name__ == "__main__":
  main()
