"""Word-level vocabulary for pre-tokenised text (e.g. GLUE MRPC): PAD/UNK/SEP specials, then words.

Ids 0..2 are the specials (PAD 0, UNK 1, SEP 2, which joins the two sentences of a
pair); the i-th word gets id i + NUM_SPECIAL. Words are ordered by descending count
in the texts the vocabulary was built from, ties alphabetically, so the same texts
always give the same ids. The vocabulary serialises to JSON to be stored beside a
checkpoint: a model is only meaningful together with the id assignment it was
trained with.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable, Sequence

from tmoe_jax.data.vocabulary import TableVocabulary

NUM_SPECIAL = 3
# What `decode` writes for the specials; none of them can be a word (words hold no '<').
SPECIAL_TOKENS = ("<pad>", "<unk>", "<sep>")

_JSON_KIND = "tmoe_jax.WordVocabulary"
_JSON_VERSION = 1


def split_words(text: str, *, lowercase: bool) -> list[str]:
  """The whitespace-separated tokens of already tokenised text, lowercased if asked."""
  if not isinstance(text, str):
    raise TypeError(f"text must be a str, got {text!r}")
  return (text.lower() if lowercase else text).split()


class WordVocabulary(TableVocabulary):
  PAD_ID = 0
  UNK_ID = 1
  SEP_ID = 2

  def __init__(self, words: Sequence[str]):
    if isinstance(words, str):
      raise TypeError("words must be a sequence of strings, not a str")
    words = list(words)
    for word in words:
      if not isinstance(word, str) or not word or word != word.strip() or len(word.split()) != 1:
        raise ValueError(f"words must be non-empty strings without whitespace, got {word!r}")
      if word in SPECIAL_TOKENS:
        raise ValueError(f"word {word!r} is reserved for a special token")
    counts = collections.Counter(words)
    duplicates = sorted(word for word, count in counts.items() if count > 1)
    if duplicates:
      raise ValueError(f"duplicate words in vocabulary: {duplicates[:10]}")
    super().__init__(tuple(words), NUM_SPECIAL)

  @classmethod
  def from_token_lists(
    cls, token_lists: Iterable[Sequence[str]], *, min_count: int = 1, max_size: int = 0
  ) -> WordVocabulary:
    """The words occurring at least `min_count` times, most frequent first, at most `max_size` (0 = all)."""
    if min_count < 1:
      raise ValueError(f"min_count must be >= 1, got {min_count}")
    if max_size < 0:
      raise ValueError(f"max_size must be >= 0 (0 = no limit), got {max_size}")
    counts: collections.Counter[str] = collections.Counter()
    for tokens in token_lists:
      if isinstance(tokens, str):
        raise TypeError("token_lists must hold lists of tokens, not strings")
      counts.update(tokens)
    ranked = sorted(
      (word for word, count in counts.items() if count >= min_count), key=lambda w: (-counts[w], w)
    )
    return cls(ranked[:max_size] if max_size else ranked)

  @property
  def words(self) -> tuple[str, ...]:
    return self._table

  def __repr__(self) -> str:
    return f"WordVocabulary({len(self._table)} words)"

  def encode(self, tokens: Sequence[str]) -> list[int]:
    """Ids of `tokens`; words outside the vocabulary become UNK_ID."""
    if isinstance(tokens, str):
      raise TypeError("tokens must be a sequence of strings, not a str (split it first)")
    return self._ids(tokens)

  def decode(self, ids: Iterable[int]) -> list[str]:
    """Tokens of `ids`, specials as `SPECIAL_TOKENS`; PAD is skipped."""
    tokens = []
    for i in ids:
      i = int(i)
      if not 0 <= i < self.size:
        raise ValueError(f"id {i} out of range [0, {self.size})")
      if i == self.PAD_ID:
        continue
      tokens.append(SPECIAL_TOKENS[i] if i < NUM_SPECIAL else self._table[i - NUM_SPECIAL])
    return tokens

  def to_json(self) -> str:
    return json.dumps({"kind": _JSON_KIND, "version": _JSON_VERSION, "words": list(self._table)})

  @classmethod
  def from_json(cls, text: str) -> WordVocabulary:
    words = cls._read_json(text, _JSON_KIND, _JSON_VERSION).get("words")
    if not isinstance(words, list) or not all(isinstance(word, str) for word in words):
      raise ValueError("WordVocabulary JSON document has no 'words' list of strings")
    return cls(words)
