"""The text side of the sentence-pair classifier: token overlap kinds, pair features, encoding.

Shapes: N pairs, L joint length, F pair features.

A pair is encoded jointly, "s1 <sep> s2" (right-padded to L): word ids, segment ids
(0: first sentence and <sep>, 1: second) and each token's overlap kind, whether it
also occurs in the *other* sentence, told apart for numbers (`OVERLAP_KINDS`; DrQA's
exact-match feature, computed on the text so it also works for words outside the
vocabulary, which are frequent in MRPC). `pair_features` adds F lexical-overlap
features of the pair (n-gram overlap, number agreement, length difference), known to
be strong on MRPC. Plain Python and numpy over token lists; `models.pair_classifier`
reads the arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tmoe_jax.data.word_vocabulary import WordVocabulary

# Overlap kind of each position of the joint sequence.
OVERLAP_SPECIAL = 0  # padding and <sep>
OVERLAP_WORD_UNMATCHED = 1
OVERLAP_WORD_MATCHED = 2
OVERLAP_NUMBER_UNMATCHED = 3
OVERLAP_NUMBER_MATCHED = 4
NUM_OVERLAP_KINDS = 5

# n-gram orders whose overlap `pair_features` measures.
OVERLAP_NGRAM_ORDERS = (1, 2, 3)
PAIR_FEATURE_NAMES = (
  *(f"{n}gram_overlap_{side}" for n in OVERLAP_NGRAM_ORDERS for side in ("min", "max")),
  "numbers_equal",
  "numbers_jaccard",
  "has_numbers",
  "relative_length_difference",
)
NUM_PAIR_FEATURES = len(PAIR_FEATURE_NAMES)


def is_number(token: str) -> bool:
  """A token holding a digit ("1998", "2.5", "$1.8", "10-year") counts as a number."""
  return any(c.isdigit() for c in token)


def overlap_kinds(tokens: Sequence[str], other_tokens: Sequence[str]) -> list[int]:
  """The overlap kind (`OVERLAP_*`) of each token of `tokens` with respect to `other_tokens`."""
  other = set(other_tokens)
  kinds = []
  for token in tokens:
    matched = token in other
    if is_number(token):
      kinds.append(OVERLAP_NUMBER_MATCHED if matched else OVERLAP_NUMBER_UNMATCHED)
    else:
      kinds.append(OVERLAP_WORD_MATCHED if matched else OVERLAP_WORD_UNMATCHED)
  return kinds


def _ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
  return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def pair_features(tokens1: Sequence[str], tokens2: Sequence[str]) -> np.ndarray:
  """float32 [F]: lexical-overlap features of a pair, each in [0, 1] (names: `PAIR_FEATURE_NAMES`).

  For n in `OVERLAP_NGRAM_ORDERS`, with G1, G2 the sets of n-grams of the two sentences:
  the smaller and the larger of |G1 & G2| / |G1| and |G1 & G2| / |G2| (0 for an empty set),
  so that the features do not depend on the order of the sentences. Then, with N1, N2 the
  sets of number tokens (`is_number`): 1 if N1 == N2; |N1 & N2| / |N1 | N2| (1 when both
  are empty); 1 if either has a number. Last, |len1 - len2| / max(len1, len2) in tokens.
  """
  features = []
  for n in OVERLAP_NGRAM_ORDERS:
    grams1, grams2 = _ngrams(tokens1, n), _ngrams(tokens2, n)
    shared = len(grams1 & grams2)
    precision = shared / len(grams1) if grams1 else 0.0
    recall = shared / len(grams2) if grams2 else 0.0
    features += [min(precision, recall), max(precision, recall)]
  numbers1 = {t for t in tokens1 if is_number(t)}
  numbers2 = {t for t in tokens2 if is_number(t)}
  union = numbers1 | numbers2
  features += [
    float(numbers1 == numbers2),
    len(numbers1 & numbers2) / len(union) if union else 1.0,
    float(bool(union)),
  ]
  longest = max(len(tokens1), len(tokens2))
  features.append(abs(len(tokens1) - len(tokens2)) / longest if longest else 0.0)
  return np.asarray(features, np.float32)


def truncate_pair(length1: int, length2: int, max_tokens: int) -> tuple[int, int]:
  """How many tokens of each sentence to keep so that both fit in `max_tokens`.

  Drops one token at a time from the end of the currently longer sentence (the
  first on ties), as BERT does, so that a long sentence cannot crowd out the other.
  """
  while length1 + length2 > max_tokens:
    if length1 >= length2:
      length1 -= 1
    else:
      length2 -= 1
  return length1, length2


def encode_pair(
  tokens1: Sequence[str], tokens2: Sequence[str], vocabulary: WordVocabulary, max_length: int
) -> dict[str, np.ndarray]:
  """The model inputs of one pair: "s1 <sep> s2" right-padded to `max_length`.

  Returns int32 [L] `token_ids`, `segment_ids`, `overlap_ids` and float32 [F] `features`.
  Overlap kinds and features are computed on the whole sentences, before a pair too
  long for `max_length` is truncated (`truncate_pair`).
  """
  if max_length < 3:
    raise ValueError(f"max_length must be >= 3 (a token of each sentence and <sep>), got {max_length}")
  keep1, keep2 = truncate_pair(len(tokens1), len(tokens2), max_length - 1)
  kinds1 = overlap_kinds(tokens1, tokens2)[:keep1]
  kinds2 = overlap_kinds(tokens2, tokens1)[:keep2]
  ids = vocabulary.encode(tokens1[:keep1]) + [vocabulary.SEP_ID] + vocabulary.encode(tokens2[:keep2])
  segments = [0] * (keep1 + 1) + [1] * keep2
  kinds = kinds1 + [OVERLAP_SPECIAL] + kinds2
  padding = [0] * (max_length - len(ids))
  return {
    "token_ids": np.asarray(ids + padding, np.int32),
    "segment_ids": np.asarray(segments + padding, np.int32),
    "overlap_ids": np.asarray(kinds + padding, np.int32),
    "features": pair_features(tokens1, tokens2),
  }


def encode_pairs(
  token_lists1: Sequence[Sequence[str]],
  token_lists2: Sequence[Sequence[str]],
  vocabulary: WordVocabulary,
  max_length: int,
) -> dict[str, np.ndarray]:
  """`encode_pair` of every pair, stacked: int32 [N, L] ids / segments / overlaps, float32 [N, F] features."""
  if len(token_lists1) != len(token_lists2):
    raise ValueError(f"{len(token_lists1)} first sentences but {len(token_lists2)} second sentences")
  encoded = [encode_pair(a, b, vocabulary, max_length) for a, b in zip(token_lists1, token_lists2)]
  if not encoded:
    return {
      "token_ids": np.zeros((0, max_length), np.int32),
      "segment_ids": np.zeros((0, max_length), np.int32),
      "overlap_ids": np.zeros((0, max_length), np.int32),
      "features": np.zeros((0, NUM_PAIR_FEATURES), np.float32),
    }
  return {name: np.stack([pair[name] for pair in encoded]) for name in encoded[0]}


# ---------------------------------------------------------------------------- model
