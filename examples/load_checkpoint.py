"""Use a trained run from Python: python examples/load_checkpoint.py WORKDIR [TEXT ...]

Loads the newest readable checkpoint of WORKDIR (written by `python -m train`) with
`tmoe_jax.load`, translates the given texts (default: a few dates in different
styles), then calls the restored model directly, teacher-forced, to show the raw
forward pass and how its first MoE layer spreads the tokens over the experts.

Needs `tmoe_jax` importable: `pip install -e .` first, or run with PYTHONPATH=.
from the repository root.
"""

import sys

import numpy as np

import tmoe_jax
from tmoe_jax.data.seq2seq import decoder_inputs
from tmoe_jax.errors import TmoeError

SAMPLE_DATES = ["Tuesday, 3 March 1998", "March 3rd, '98", "3/3/98", "3.3.1998", "tue 3 mar 1998"]


def main(argv: list[str]) -> int:
  if len(argv) < 2:
    print(__doc__, file=sys.stderr)
    return 2
  workdir, texts = argv[1], argv[2:] or SAMPLE_DATES
  try:
    run = tmoe_jax.load(workdir)
    outputs = run.translate(texts)
  except TmoeError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  model_config = run.config.model
  beam_size = run.config.eval.beam_size
  print(
    f"{workdir}: step {run.step}, d_model {model_config.d_model}, {model_config.num_experts} experts "
    f"(top-{model_config.top_k}), {'greedy' if beam_size == 1 else f'beam {beam_size}'} decoding"
  )
  for text, output in zip(texts, outputs):
    print(f"  {text!r:>28} -> {output}")

  # run.model is a plain nnx Module: call it on token ids, here the first text and its
  # translation fed back teacher-forced ([1, S] source, [1, L] decoder input).
  source_1xS = run.vocabulary.encode_batch(texts[:1], run.max_source_length)
  target_1xL = run.vocabulary.encode_batch([outputs[0][: run.max_target_length - 1]], run.max_target_length)
  logits_1xLxV, moe_aux = run.model(source_1xS, decoder_inputs(target_1xL, run.vocabulary.BOS_ID))
  print(f"teacher-forced logits: {logits_1xLxV.shape}; {len(moe_aux)} MoE layers")
  if moe_aux:
    print(
      f"  share of routing assignments per expert, first MoE layer: {np.array2string(np.asarray(moe_aux[0].expert_fraction_E), precision=3)}"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
