"""Tests for `tmoe_jax.bleu`: corpus BLEU against hand-computed values."""

from __future__ import annotations

import math

import pytest

from tmoe_jax.bleu import bleu_signature, corpus_bleu

REFERENCES = ["the cat sat on the red mat", "a dog runs in the park"]


def test_identical_corpus_scores_100():
  corpus = [
    "Two young, White males are outside near many bushes.",
    "A man in an orange hat starring at something.",
  ]
  assert corpus_bleu(corpus, corpus) == pytest.approx(100.0)


def test_hand_computed_corpus_bleu():
  hypotheses = ["the cat sat on the mat", "a dog runs in the park"]
  # Matched / total n-grams, summed over both sentences (counts clipped by the reference):
  #   1-grams: 6/6 ("the" twice, the reference has it twice) + 6/6            = 12/12
  #   2-grams: 4/5 ("the mat" is not in the reference)       + 5/5            =  9/10
  #   3-grams: 3/4 ("on the mat" is not)                     + 4/4            =  7/8
  #   4-grams: 2/3 ("sat on the mat" is not)                 + 3/3            =  5/6
  precisions = [12 / 12, 9 / 10, 7 / 8, 5 / 6]
  # Hypothesis length 6 + 6 = 12 words, reference length 7 + 6 = 13: brevity penalty exp(1 - 13/12).
  brevity_penalty = math.exp(1 - 13 / 12)
  expected = 100 * brevity_penalty * math.exp(sum(math.log(p) for p in precisions) / 4)
  assert expected == pytest.approx(82.8087, abs=1e-4)
  assert corpus_bleu(hypotheses, REFERENCES) == pytest.approx(expected, rel=1e-9)


def test_13a_tokenisation_splits_punctuation_but_keeps_case():
  # 13a separates the final period, so "mat." and "mat ." are the same tokens.
  assert corpus_bleu(["the cat sat on the mat."], ["the cat sat on the mat ."]) == pytest.approx(100.0)
  # Mixed case: "The" does not match "the", so the score drops below 100.
  assert corpus_bleu(["The cat sat on the mat"], ["the cat sat on the mat"]) < 100.0


def test_no_overlap_scores_zero():
  assert corpus_bleu(["x y z w", "p q r s"], REFERENCES) == 0.0


def test_signature_is_the_standard_sacrebleu_setting():
  signature = bleu_signature()
  for field in ("nrefs:1", "case:mixed", "eff:no", "tok:13a", "smooth:exp", "version:"):
    assert field in signature


@pytest.mark.parametrize(
  "hypotheses, references, match",
  [
    (["a b c d"], REFERENCES, "1 hypotheses but 2 references"),
    ([], [], "at least one"),
    ("a b c d", REFERENCES, "not a str"),
    (["a b c d", None], REFERENCES, r"hypotheses\[1\] must be a str"),
  ],
)
def test_bad_inputs(hypotheses, references, match):
  with pytest.raises(ValueError, match=match):
    corpus_bleu(hypotheses, references)
