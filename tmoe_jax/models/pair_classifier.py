"""Sentence-pair classifier (paraphrase detection): a mixture of sequence experts over the joint pair.

Shapes: B batch, L joint length, D embedding width, H expert hidden (= output) width,
E experts, F pair features, C classifier hidden width.

The two sentences are encoded together, "s1 <sep> s2" (right-padded to L), so that
every expert sees both and can compare them. Each token's vector is the sum of three
embeddings:

  * its word (`WordVocabulary` id, trained from scratch),
  * its segment (0: first sentence and <sep>, 1: second sentence),
  * its overlap kind: whether the token also occurs in the *other* sentence, told
    apart for numbers (`data.pair_features`). This is the cheapest cross-sentence
    interaction (DrQA's exact-match feature); it is computed on the text, so it also
    works for words outside the vocabulary, which are frequent in MRPC (names, figures).

A `moe.sequence_moe.SequenceMoE` (gating network + E MLP / RNN / CNN experts, the
original PyTorch project's MoE head) turns the token vectors into one H-vector per
pair. The classifier reads it together with F lexical-overlap features of the pair
(`pair_features`: n-gram overlap, number agreement, length difference, known to be
strong on MRPC) through a ReLU layer of width C and returns 2 logits (1 = paraphrase).

The input side (`encode_pair`, `overlap_kinds`, `pair_features`) is `data.pair_features`;
the model is an nnx module with typed settings (`PairClassifierConfig.from_config`
validates `config.model`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tmoe_jax.embeddings import PAD_ID
from tmoe_jax.moe.sequence_moe import SequenceMoE
from tmoe_jax.moe.statistics import MoEAux
from tmoe_jax.validation import require, settings_from_section

NUM_CLASSES = 2
NUM_SEGMENTS = 2

# model.expert_type -> the kind of sequence expert (`sequence_experts.SEQUENCE_EXPERT_TYPES`);
# "rnn" takes its cell from model.rnn_cell.
EXPERT_TYPES = ("mlp", "rnn", "cnn")
RNN_CELLS = ("gru", "lstm")
# "dense": every expert, softmax-weighted (the original's gating); "top_k": the K best only.
GATINGS = ("dense", "top_k")


@dataclasses.dataclass(frozen=True)
class PairClassifierConfig:
  """Settings of `PairClassifier`; `from_config` builds them from `config.model`.

  The input sizes (`vocab_size`, `num_overlap_kinds`, `num_pair_features`) are the
  data's (`data.pair_features`), given by the task.
  """

  vocab_size: int
  num_overlap_kinds: int
  num_pair_features: int
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
    for name in (
      "vocab_size",
      "num_overlap_kinds",
      "embedding_size",
      "num_experts",
      "hidden_size",
      "kernel_width",
    ):
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
  def from_config(
    cls, model_config, *, vocab_size: int, num_overlap_kinds: int, num_pair_features: int
  ) -> PairClassifierConfig:
    """Builds from the `model` section of a ConfigDict, type-checking each field."""
    return settings_from_section(
      cls,
      model_config,
      vocab_size=vocab_size,
      num_overlap_kinds=num_overlap_kinds,
      num_pair_features=num_pair_features,
    )


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
    self.overlap_embedding = nnx.Embed(config.num_overlap_kinds, width, rngs=rngs)
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
    classifier_in = config.hidden_size + config.num_pair_features
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
    token_mask_BxL = token_ids_BxL != PAD_ID
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
