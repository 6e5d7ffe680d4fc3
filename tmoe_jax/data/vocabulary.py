"""Character-level vocabulary with PAD/BOS/EOS/UNK specials.

Ids 0..3 are reserved for the special tokens; the ``i``-th vocabulary
character gets id ``i + NUM_SPECIAL``.  The vocabulary serialises to JSON so
that it can be stored beside a checkpoint: a model is only meaningful
together with the exact id assignment it was trained with.

The bases here serve the word and subword vocabularies too: `VocabularyIdentity` (equality,
JSON header check), `TableVocabulary` (specials, then a table of tokens) and `TextVocabulary`
(text to ids and back, with PAD/BOS/EOS/UNK).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import numpy as np

NUM_SPECIAL = 4
# What decode() writes for UNK_ID; it may not be a vocabulary character,
# otherwise decoding could not tell an unknown from a real character.
UNK_CHAR = "\ufffd"

_JSON_KIND = "tmoe_jax.CharVocabulary"
_JSON_VERSION = 1


class VocabularyIdentity:
  """len() is the id count; two vocabularies are equal (and hash alike) when their `_identity()` is."""

  size: int

  def _identity(self):
    raise NotImplementedError

  def __len__(self) -> int:
    return self.size

  def __eq__(self, other: object) -> bool:
    if type(other) is not type(self):
      return NotImplemented
    return self._identity() == other._identity()

  def __hash__(self) -> int:
    return hash(self._identity())

  @staticmethod
  def _read_json(text: str, kind: str, version: int) -> dict:
    """The JSON object `text`, checked to be of `kind` (e.g. "tmoe_jax.CharVocabulary") and `version`."""
    name = kind.rsplit(".", 1)[-1]
    try:
      data = json.loads(text)
    except (TypeError, json.JSONDecodeError) as e:
      raise ValueError(f"not a {name} JSON document: {e}") from e
    found = data.get("kind") if isinstance(data, dict) else None
    if found != kind:
      raise ValueError(f"not a {name} JSON document (kind {found!r}): {text!r:.200}")
    if data.get("version") != version:
      raise ValueError(f"unsupported {name} JSON version {data.get('version')!r}, expected {version}")
    return data


class TableVocabulary(VocabularyIdentity):
  """Specials at ids 0 .. num_special - 1, then one id per table entry: the i-th gets i + num_special."""

  UNK_ID: int

  def __init__(self, table: Sequence[str], num_special: int):
    self._table = table
    self._num_special = num_special
    self._entry_to_id = {entry: i + num_special for i, entry in enumerate(table)}

  @property
  def size(self) -> int:
    """Number of ids, specials included (the embedding table size)."""
    return self._num_special + len(self._table)

  def _identity(self):
    return self._table

  def _ids(self, entries: Iterable[str]) -> list[int]:
    """The id of each entry, UNK_ID for those outside the table."""
    return [self._entry_to_id.get(entry, self.UNK_ID) for entry in entries]


class TextVocabulary(VocabularyIdentity):
  """Encodes text to ids and back, with PAD/BOS/EOS/UNK at ids 0..3; `_text_ids` is the tokeniser."""

  PAD_ID = 0
  BOS_ID = 1
  EOS_ID = 2
  UNK_ID = 3

  def _text_ids(self, text: str) -> list[int]:
    raise NotImplementedError

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = True) -> list[int]:
    if not isinstance(text, str):
      raise ValueError(f"text must be a str, got {text!r}")
    ids = self._text_ids(text)
    if add_bos:
      ids.insert(0, self.BOS_ID)
    if add_eos:
      ids.append(self.EOS_ID)
    return ids

  def _decodable_ids(self, ids) -> list[int]:
    """The ids `decode` renders: those of 1-D integer ``ids`` before the first EOS, PAD and BOS dropped."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
      raise ValueError(f"decode expects a 1-D id sequence, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"ids must be integers, got dtype {arr.dtype}")
    kept: list[int] = []
    for i in arr.tolist():
      if i == self.EOS_ID:
        break
      if i not in (self.PAD_ID, self.BOS_ID):
        kept.append(i)
    return kept


class CharVocabulary(TextVocabulary, TableVocabulary):
  def __init__(self, characters: str):
    if not isinstance(characters, str):
      raise ValueError(f"characters must be a str, got {type(characters).__name__}")
    if not characters:
      raise ValueError("characters must not be empty")
    seen: set[str] = set()
    duplicates: set[str] = set()
    for c in characters:
      (duplicates if c in seen else seen).add(c)
    if duplicates:
      raise ValueError(f"duplicate characters in vocabulary: {''.join(sorted(duplicates))!r}")
    if UNK_CHAR in seen:
      raise ValueError(f"character {UNK_CHAR!r} is reserved for decoding UNK_ID")
    super().__init__(characters, NUM_SPECIAL)

  @classmethod
  def from_texts(cls, texts: Iterable[str]) -> CharVocabulary:
    """Vocabulary of the sorted set of characters occurring in ``texts``."""
    if isinstance(texts, str):
      # A bare string is almost always a mistake for [string]; be
      # explicit instead of silently iterating its characters.
      raise ValueError("texts must be an iterable of strings, not a str")
    chars: set[str] = set()
    for text in texts:
      if not isinstance(text, str):
        raise ValueError(f"texts must contain str, got {text!r}")
      chars.update(text)
    return cls("".join(sorted(chars)))

  @property
  def characters(self) -> str:
    return self._table

  def __repr__(self) -> str:
    return f"CharVocabulary({self._table!r})"

  def _text_ids(self, text: str) -> list[int]:
    return self._ids(text)

  def decode(self, ids) -> str:
    """Text of ``ids`` up to the first EOS; PAD and BOS are skipped."""
    out: list[str] = []
    for i in self._decodable_ids(ids):
      if i == self.UNK_ID:
        out.append(UNK_CHAR)
        continue
      if not NUM_SPECIAL <= i < self.size:
        raise ValueError(f"id {i} out of range [0, {self.size})")
      out.append(self._table[i - NUM_SPECIAL])
    return "".join(out)

  def encode_batch(
    self, texts: Sequence[str], max_length: int, *, add_bos: bool = False, add_eos: bool = True
  ) -> np.ndarray:
    """int32 ``[len(texts), max_length]`` ids, right-padded with PAD_ID."""
    if isinstance(texts, str):
      raise ValueError("texts must be a sequence of strings, not a str")
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)):
      raise ValueError(f"max_length must be an int, got {max_length!r}")
    if max_length < 1:
      raise ValueError(f"max_length must be >= 1, got {max_length}")
    batch = np.full((len(texts), int(max_length)), self.PAD_ID, dtype=np.int32)
    for row, text in enumerate(texts):
      ids = self.encode(text, add_bos=add_bos, add_eos=add_eos)
      if len(ids) > max_length:
        raise ValueError(
          f"text {text!r} (index {row}) encodes to {len(ids)} ids "
          f"(len {len(text)} + bos={add_bos} + eos={add_eos}), "
          f"more than max_length={max_length}"
        )
      batch[row, : len(ids)] = ids
    return batch

  def to_json(self) -> str:
    return json.dumps({"kind": _JSON_KIND, "version": _JSON_VERSION, "characters": self._table})

  @classmethod
  def from_json(cls, s: str) -> CharVocabulary:
    return cls(cls._read_json(s, _JSON_KIND, _JSON_VERSION)["characters"])
