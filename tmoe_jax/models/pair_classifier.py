"""Sentence-pair classifier (paraphrase detection): a mixture of sequence experts over the joint pair.

Shapes: B batch, L joint length, D embedding width, H expert hidden (= output) width,
E experts, F pair features, C classifier hidden width.

The two sentences are encoded together, "s1 <sep> s2" (right-padded to L), so that
every expert sees both and can compare them. Each token's vector is the sum of three
embeddings:

  * its word (`WordVocabulary` id, trained from scratch),
  * its segment (0: first sentence and <sep>, 1: second sentence),
  * its overlap kind: whether the token also occurs in the *other* sentence, told
    apart for numbers (`OVERLAP_KINDS`). This is the cheapest cross-sentence
    interaction (DrQA's exact-match feature); it is computed on the text, so it also
    works for words outside the vocabulary, which are frequent in MRPC (names, figures).

A `moe.sequence_moe.SequenceMoE` (gating network + E MLP / RNN / CNN experts, the
original PyTorch project's MoE head) turns the token vectors into one H-vector per
pair. The classifier reads it together with F lexical-overlap features of the pair
(`pair_features`: n-gram overlap, number agreement, length difference, known to be
strong on MRPC) through a ReLU layer of width C and returns 2 logits (1 = paraphrase).

The input side (`encode_pair`, `overlap_kinds`, `pair_features`) is plain Python and
numpy over token lists; the model is an nnx module with typed settings
(`PairClassifierConfig.from_config` validates `config.model`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmoe_jax.data.word_vocabulary import WordVocabulary
from tmoe_jax.moe.sequence_moe import SequenceMoE
from tmoe_jax.moe.statistics import MoEAux
from tmoe_jax.validation import require, settings_from_section

NUM_CLASSES = 2
NUM_SEGMENTS = 2

# Overlap kind of each position of the joint sequence.
OVERLAP_SPECIAL = 0  # padding and <sep>
OVERLAP_WORD_UNMATCHED = 1
OVERLAP_WORD_MATCHED = 2
OVERLAP_NUMBER_UNMATCHED = 3
OVERLAP_NUMBER_MATCHED = 4
NUM_OVERLAP_KINDS = 5

# model.expert_type -> the kind of sequence expert (`sequence_experts.SEQUENCE_EXPERT_TYPES`);
# "rnn" takes its cell from model.rnn_cell.
EXPERT_TYPES = ("mlp", "rnn", "cnn")
RNN_CELLS = ("gru", "lstm")
# "dense": every expert, softmax-weighted (the original's gating); "top_k": the K best only.
GATINGS = ("dense", "top_k")

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


# ---------------------------------------------------------------------------- inputs


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


@dataclasses.dataclass(frozen=True)
class PairClassifierConfig:
  """Settings of `PairClassifier`; `from_config` builds them from `config.model`."""

  vocab_size: int
  embedding_size: int = 128
  num_experts: int = 4
  hidden_size: int = 256
  expert_type: str = "cnn"
  rnn_cell: str = "gru"
  kernel_width: int = 3
  gating: str = "dense"
  top_k: int = 2
  router_hidden_size: int = 0  # 0 = a linear router
  dropout_rate: float = 0.1
  classifier_hidden_size: int = 64
  dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("vocab_size", "embedding_size", "num_experts", "hidden_size", "kernel_width"):
      require(getattr(self, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
    for name in ("router_hidden_size", "classifier_hidden_size"):
      require(getattr(self, name) >= 0, f"model.{name}", f"must be >= 0, got {getattr(self, name)}")
    require(
      self.expert_type in EXPERT_TYPES,
      "model.expert_type",
      f"must be one of {EXPERT_TYPES}, got {self.expert_type!r}",
    )
    require(
      self.rnn_cell in RNN_CELLS, "model.rnn_cell", f"must be one of {RNN_CELLS}, got {self.rnn_cell!r}"
    )
    require(self.gating in GATINGS, "model.gating", f"must be one of {GATINGS}, got {self.gating!r}")
    require(
      1 <= self.top_k <= self.num_experts,
      "model.top_k",
      f"must be in [1, num_experts={self.num_experts}], got {self.top_k}",
    )
    require(
      0.0 <= self.dropout_rate < 1.0, "model.dropout_rate", f"must be in [0, 1), got {self.dropout_rate}"
    )

  @property
  def sequence_expert_type(self) -> str:
    """The `SEQUENCE_EXPERT_TYPES` key of the experts."""
    return self.rnn_cell if self.expert_type == "rnn" else self.expert_type

  @classmethod
  def from_config(cls, model_config, *, vocab_size: int) -> PairClassifierConfig:
    """Builds from the `model` section of a ConfigDict, type-checking each field."""
    return settings_from_section(cls, model_config, vocab_size=vocab_size)


class PairClassifier(nnx.Module):
  """Embeddings of "s1 <sep> s2" -> SequenceMoE -> [pooled; pair features] -> ReLU layer -> 2 logits.

  Token id 0 is padding: it is masked out of the experts, the router's mean and
  the routing statistics. Dropout (`dropout_rate`) applies to the summed token
  embeddings, to the mixture's output and to the classifier's hidden layer.
  """

  def __init__(self, config: PairClassifierConfig, *, rngs: nnx.Rngs):
    self.config = config
    width = config.embedding_size
    self.token_embedding = nnx.Embed(config.vocab_size, width, rngs=rngs)
    self.segment_embedding = nnx.Embed(NUM_SEGMENTS, width, rngs=rngs)
    self.overlap_embedding = nnx.Embed(NUM_OVERLAP_KINDS, width, rngs=rngs)
    self.embedding_dropout = nnx.Dropout(config.dropout_rate)
    self.moe = SequenceMoE(
      config.sequence_expert_type,
      config.num_experts,
      width,
      config.hidden_size,
      top_k=config.top_k,
      gating=config.gating,
      router_hidden_size=config.router_hidden_size or None,
      dropout_rate=config.dropout_rate,
      kernel_width=config.kernel_width,
      dtype=config.dtype,
      rngs=rngs,
    )
    classifier_in = config.hidden_size + NUM_PAIR_FEATURES
    # Assigned once, Linear or None, so nnx sees one kind of attribute.
    self.hidden = (
      nnx.Linear(classifier_in, config.classifier_hidden_size, rngs=rngs)
      if config.classifier_hidden_size
      else None
    )
    self.hidden_dropout = nnx.Dropout(config.dropout_rate)
    self.output = nnx.Linear(config.classifier_hidden_size or classifier_in, NUM_CLASSES, rngs=rngs)

  def embed(
    self, token_ids_BxL: jax.Array, segment_ids_BxL: jax.Array, overlap_ids_BxL: jax.Array
  ) -> jax.Array:
    """[B, L, D]: word + segment + overlap-kind embeddings (no dropout)."""
    x_BxLxD = (
      self.token_embedding(token_ids_BxL)
      + self.segment_embedding(segment_ids_BxL)
      + self.overlap_embedding(overlap_ids_BxL)
    )
    return x_BxLxD.astype(self.config.dtype)

  def encode(
    self,
    token_ids_BxL: jax.Array,
    segment_ids_BxL: jax.Array,
    overlap_ids_BxL: jax.Array,
    *,
    deterministic: bool = True,
    rngs: nnx.Rngs | None = None,
  ) -> tuple[jax.Array, MoEAux]:
    """The mixture's pooled vector of each pair, [B, H], and its routing statistics."""
    token_mask_BxL = token_ids_BxL != WordVocabulary.PAD_ID
    x_BxLxD = self.embed(token_ids_BxL, segment_ids_BxL, overlap_ids_BxL)
    x_BxLxD = self.embedding_dropout(x_BxLxD, deterministic=deterministic, rngs=rngs)
    return self.moe(x_BxLxD, token_mask_BxL, deterministic=deterministic, rngs=rngs)

  def __call__(
    self,
    token_ids_BxL: jax.Array,
    segment_ids_BxL: jax.Array,
    overlap_ids_BxL: jax.Array,
    features_BxF: jax.Array,
    *,
    deterministic: bool = True,
    rngs: nnx.Rngs | None = None,
  ) -> tuple[jax.Array, MoEAux]:
    """float32 [B, 2] logits (class 1 = paraphrase) and the MoE layer's statistics."""
    pooled_BxH, aux = self.encode(
      token_ids_BxL, segment_ids_BxL, overlap_ids_BxL, deterministic=deterministic, rngs=rngs
    )
    h_BxC = jnp.concatenate([pooled_BxH.astype(jnp.float32), features_BxF.astype(jnp.float32)], axis=-1)
    if self.hidden is not None:
      h_BxC = jax.nn.relu(self.hidden(h_BxC))
      h_BxC = self.hidden_dropout(h_BxC, deterministic=deterministic, rngs=rngs)
    return self.output(h_BxC), aux

  def batch_logits(self, batch: dict[str, jax.Array], **kwargs) -> tuple[jax.Array, MoEAux]:
    """`__call__` on a batch dict with the keys `encode_pairs` returns."""
    return self(batch["token_ids"], batch["segment_ids"], batch["overlap_ids"], batch["features"], **kwargs)
