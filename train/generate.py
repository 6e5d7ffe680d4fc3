"""Generate text: python -m train.generate (--workdir W | --hf CHECKPOINT_DIR) [options] PROMPT [PROMPT ...]

Prints one continuation per prompt (KV-cached decoding, prompts batched with left padding):
greedy by default, or drawn with --temperature > 0, restricted to the --top_k likeliest tokens
and the smallest set reaching probability --top_p. With --workdir, a causal_lm run's newest
readable checkpoint (or --step N) and its tokenizer; with --hf, a Hugging Face checkpoint
directory as it is. Bad input stops with one message and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from train.overrides import fail


def parse_args(argv: list[str]):
  parser = argparse.ArgumentParser(
    prog="python -m train.generate", description=__doc__.split("\n\n")[1], allow_abbrev=False
  )
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a causal_lm run directory written by `python -m train`")
  source.add_argument(
    "--hf", help="a Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json)"
  )
  parser.add_argument(
    "--step", type=int, default=None, help="checkpoint step of --workdir (default: the newest)"
  )
  parser.add_argument("--max_new_tokens", type=int, default=32)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top_k", type=int, default=0, help="0 = no limit")
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("prompts", nargs="+")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from absl import logging

  from tmoe_jax.errors import TmoeError
  from tmoe_jax.generation import Sampling

  logging.set_verbosity(logging.WARNING)
  try:
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.hf:
      from tmoe_jax.hf import from_hf

      outputs = from_hf(args.hf).generate(
        args.prompts, args.max_new_tokens, sampling=sampling, seed=args.seed
      )
    else:
      from tmoe_jax import loading

      run = loading.load(args.workdir, args.step)
      if not hasattr(run, "perplexity"):
        fail(f"{args.workdir}: a {run.config.task} run; train.generate reads causal_lm runs")
      outputs = run.generate(args.prompts, args.max_new_tokens, sampling=sampling, seed=args.seed)
  except (TmoeError, ValueError) as error:
    fail(error)
  for output in outputs:
    print(output)


if __name__ == "__main__":
  main()
