"""Subword vocabulary: a SentencePiece model (unigram or BPE) trained offline on the training texts.

Same interface and special ids as `CharVocabulary` (PAD 0, BOS 1, EOS 2, UNK 3), so the
seq2seq model and decoders take either. One vocabulary serves both languages of a
translation task, since the model shares its embeddings.

The model is trained in memory (no files, no downloads) with identity normalisation and
whitespace kept as is, so ``decode(encode(text)) == text`` for every text made of characters
seen in training, except for U+2581 ("▁"), which SentencePiece uses to mark spaces and so
decodes as a space. Unseen characters become UNK (decoded as U+FFFD) unless the model was
trained with ``byte_fallback=True``. The serialised model proto travels base64-encoded inside
the JSON document, so one file beside a checkpoint holds the whole vocabulary.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from tmoe_jax.data.vocabulary import NUM_SPECIAL, UNK_CHAR, TextVocabulary

MODEL_TYPES = ("unigram", "bpe")

_JSON_KIND = "tmoe_jax.SubwordVocabulary"
_JSON_VERSION = 1
# SentencePiece's default skips training sentences longer than 4192 bytes without an error.
_MIN_MAX_SENTENCE_BYTES = 4192


def _text_list(texts: Iterable[str]) -> list[str]:
  """`texts` as a list, checked to hold only strings (a bare str is refused, not split into characters)."""
  if isinstance(texts, str):
    raise ValueError("texts must be an iterable of strings, not a str")
  texts = list(texts)
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise ValueError(f"texts[{i}] must be a str, got {type(text).__name__}")
  return texts


class SubwordVocabulary(TextVocabulary):
  def __init__(self, model_proto: bytes):
    """Vocabulary of a serialised SentencePiece model whose specials have our ids."""
    if not isinstance(model_proto, bytes):
      raise ValueError(f"model_proto must be bytes, got {type(model_proto).__name__}")
    processor = spm.SentencePieceProcessor()
    try:
      processor.LoadFromSerializedProto(model_proto)
    except (RuntimeError, OSError) as e:
      raise ValueError(f"not a SentencePiece model proto: {e}") from e
    special_ids = {
      "pad": processor.pad_id(),
      "bos": processor.bos_id(),
      "eos": processor.eos_id(),
      "unk": processor.unk_id(),
    }
    expected = {"pad": self.PAD_ID, "bos": self.BOS_ID, "eos": self.EOS_ID, "unk": self.UNK_ID}
    if special_ids != expected:
      raise ValueError(f"SentencePiece model has special ids {special_ids}, expected {expected}")
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_proto)
    self._model_type = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(
      model.trainer_spec.model_type
    ).lower()
    self._proto = model_proto
    self._processor = processor

  @classmethod
  def train(
    cls,
    texts: Iterable[str],
    vocab_size: int,
    *,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    seed: int = 0,
    byte_fallback: bool = False,
  ) -> SubwordVocabulary:
    """A SentencePiece model of `vocab_size` ids (specials included) trained on `texts`.

    Deterministic: the same texts and arguments give the same model (one training thread,
    every sentence used in the given order, no sampling). `seed` seeds SentencePiece's
    process-wide random generator, which training with these settings does not draw from
    but is set so that a future option that does stays reproducible.
    """
    texts = _text_list(texts)
    if not any(texts):
      raise ValueError("texts must contain at least one non-empty string")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
      raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    if vocab_size <= NUM_SPECIAL:
      raise ValueError(f"vocab_size must be > {NUM_SPECIAL} (the special ids), got {vocab_size}")
    if model_type not in MODEL_TYPES:
      raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if isinstance(character_coverage, bool) or not isinstance(character_coverage, (int, float)):
      raise ValueError(f"character_coverage must be a float, got {character_coverage!r}")
    if not 0.0 < character_coverage <= 1.0:
      raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(byte_fallback, bool):
      raise ValueError(f"byte_fallback must be a bool, got {byte_fallback!r}")

    max_bytes = max(len(text.encode("utf-8")) for text in texts)
    model = io.BytesIO()
    spm.set_random_generator_seed(int(seed))
    try:
      spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=int(vocab_size),
        model_type=model_type,
        character_coverage=float(character_coverage),
        byte_fallback=byte_fallback,
        pad_id=cls.PAD_ID,
        bos_id=cls.BOS_ID,
        eos_id=cls.EOS_ID,
        unk_id=cls.UNK_ID,
        unk_surface=UNK_CHAR,
        # Exact round trips: no Unicode normalisation, no collapsing of repeated spaces.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        # Determinism: one thread, all sentences in order.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=max(max_bytes + 1, _MIN_MAX_SENTENCE_BYTES),
        minloglevel=2,
      )
    except RuntimeError as e:
      # E.g. "Vocabulary size is too high (N). Please set it to a value <= M." for a small corpus.
      raise ValueError(f"SentencePiece {model_type} training (vocab_size={vocab_size}) failed: {e}") from e
    return cls(model.getvalue())

  @property
  def model_proto(self) -> bytes:
    """The serialised SentencePiece model."""
    return self._proto

  @property
  def model_type(self) -> str:
    """The SentencePiece algorithm: "unigram" or "bpe" (or "word"/"char" for a foreign model)."""
    return self._model_type

  @property
  def size(self) -> int:
    """Number of ids, specials included (the embedding table size)."""
    return self._processor.get_piece_size()

  def _identity(self):
    return self._proto

  def __repr__(self) -> str:
    return f"SubwordVocabulary(size={self.size})"

  def piece(self, token_id: int) -> str:
    """The subword string of `token_id` ("▁" marks a space)."""
    return self._processor.id_to_piece(self._check_id(token_id))

  def _text_ids(self, text: str) -> list[int]:
    return self._processor.encode(text, out_type=int)

  def _encode_all(self, texts: Sequence[str], add_bos: bool, add_eos: bool) -> list[list[int]]:
    texts = _text_list(texts)
    # One call for the whole list: SentencePiece encodes it without a Python loop per text.
    rows = self._processor.encode(texts, out_type=int) if texts else []
    prefix = [self.BOS_ID] if add_bos else []
    suffix = [self.EOS_ID] if add_eos else []
    return [prefix + row + suffix for row in rows]

  def encoded_lengths(
    self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = True
  ) -> np.ndarray:
    """int32 ``[len(texts)]`` untruncated id counts, to choose `max_length` for `encode_batch`."""
    return np.array([len(row) for row in self._encode_all(texts, add_bos, add_eos)], dtype=np.int32)

  def encode_batch(
    self, texts: Sequence[str], max_length: int, *, add_bos: bool = False, add_eos: bool = True
  ) -> np.ndarray:
    """int32 ``[len(texts), max_length]`` ids, right-padded with PAD_ID.

    A text with more ids is truncated to its first `max_length` ids, dropping its EOS
    (as the Flax WMT example does); `encoded_lengths` tells how many rows that affects.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)):
      raise ValueError(f"max_length must be an int, got {max_length!r}")
    if max_length < 1:
      raise ValueError(f"max_length must be >= 1, got {max_length}")
    rows = self._encode_all(texts, add_bos, add_eos)
    batch = np.full((len(rows), int(max_length)), self.PAD_ID, dtype=np.int32)
    for i, row in enumerate(rows):
      row = row[:max_length]
      batch[i, : len(row)] = row
    return batch

  def _check_id(self, token_id) -> int:
    if not 0 <= token_id < self.size:
      raise ValueError(f"id {token_id} out of range [0, {self.size})")
    return int(token_id)

  def decode(self, ids) -> str:
    """Text of ``ids`` up to the first EOS; PAD and BOS are skipped, UNK becomes U+FFFD."""
    return self._processor.decode([self._check_id(i) for i in self._decodable_ids(ids)])

  def to_json(self) -> str:
    return json.dumps(
      {
        "kind": _JSON_KIND,
        "version": _JSON_VERSION,
        "model_type": self.model_type,
        "size": self.size,
        "model_proto_base64": base64.b64encode(self._proto).decode("ascii"),
      }
    )

  @classmethod
  def from_json(cls, s: str) -> SubwordVocabulary:
    data = cls._read_json(s, _JSON_KIND, _JSON_VERSION)
    encoded = data.get("model_proto_base64")
    if not isinstance(encoded, str):
      raise ValueError("SubwordVocabulary JSON document has no model_proto_base64 string")
    try:
      proto = base64.b64decode(encoded, validate=True)
    except binascii.Error as e:
      raise ValueError(f"SubwordVocabulary JSON model_proto_base64 is not base64: {e}") from e
    vocabulary = cls(proto)
    if data.get("size") != vocabulary.size:
      raise ValueError(
        f"SubwordVocabulary JSON says size {data.get('size')!r} but its model has {vocabulary.size}"
      )
    return vocabulary

  def save(self, path: str | pathlib.Path) -> None:
    """Writes the JSON document to `path` (through a temporary file, so a crash leaves no half file)."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(self.to_json(), encoding="utf-8")
    tmp.replace(path)

  @classmethod
  def load(cls, path: str | pathlib.Path) -> SubwordVocabulary:
    path = pathlib.Path(path)
    try:
      return cls.from_json(path.read_text(encoding="utf-8"))
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from e
