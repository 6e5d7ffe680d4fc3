"""Corpus BLEU with sacreBLEU's standard settings, for reporting translation quality.

Detokenised hypotheses are scored against one detokenised reference each, with sacreBLEU's
defaults: the 13a (mteval) tokeniser, mixed case, exponential smoothing, up to 4-grams. That is
the setting behind published sacreBLEU numbers, so the score is comparable to them when the
references are the raw test set; `bleu_signature()` is the string to report beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

from sacrebleu.metrics import BLEU

TOKENIZE = "13a"


def _metric(references: Sequence[str] | None = None) -> BLEU:
  # One reference stream; `references` precomputes its statistics (and sets nrefs).
  return BLEU(tokenize=TOKENIZE, references=None if references is None else [list(references)])


def _check_texts(name: str, texts: Sequence[str]) -> list[str]:
  if isinstance(texts, str):
    raise ValueError(f"{name} must be a sequence of strings, not a str")
  texts = list(texts)
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise ValueError(f"{name}[{i}] must be a str, got {type(text).__name__}")
  return texts


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
  """sacreBLEU corpus BLEU in [0, 100] of `hypotheses[i]` translating to `references[i]`."""
  hypotheses = _check_texts("hypotheses", hypotheses)
  references = _check_texts("references", references)
  if len(hypotheses) != len(references):
    raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
  if not hypotheses:
    raise ValueError("corpus_bleu needs at least one hypothesis")
  return float(_metric().corpus_score(hypotheses, [references]).score)


def bleu_signature() -> str:
  """sacreBLEU's reproducibility signature of `corpus_bleu`, e.g. ``nrefs:1|case:mixed|eff:no|tok:13a|...``."""
  return str(_metric(references=[""]).get_signature())
