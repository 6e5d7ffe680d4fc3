"""A character-level language-modelling corpus that ships with CPython: the pydoc topic help texts.

`pydoc_data.topics.topics` maps ~80 help topics ("assert", "class", "for",
...) to the text `help()` prints: about 465,000 characters of English
technical prose with code examples (CPython 3.11). No download is needed; the
text can differ between Python versions, so `CharCorpus.fingerprint` records
its length and SHA-256 for a run to check on resume.

The text is the topics' values joined in sorted key order (a blank line
between topics); the final `validation_fraction` of its characters is the
validation split, the rest the training split, so the two never overlap.

Shapes: B windows, L window length (the model's context).
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys

import numpy as np

from tmoe_jax.data.vocabulary import CharVocabulary
from tmoe_jax.errors import DataError

SOURCE = "pydoc_data.topics"
SPLITS = ("train", "validation")


def load_text() -> str:
  """The topics' texts joined in sorted key order, separated by a newline (each already ends with one)."""
  from pydoc_data.topics import topics

  return "\n".join(topics[key] for key in sorted(topics))


def split_point(num_characters: int, validation_fraction: float) -> int:
  """Index of the first validation character: the last round(fraction * n) characters are held out."""
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
  return num_characters - round(validation_fraction * num_characters)


@dataclasses.dataclass(frozen=True)
class CharCorpus:
  """The corpus as character ids: `splits[name]` int32 [n] for name in `SPLITS`."""

  vocabulary: CharVocabulary
  splits: dict[str, np.ndarray]
  fingerprint: dict[str, object]


def load_corpus(validation_fraction: float, text: str | None = None) -> CharCorpus:
  """Encodes `text` (default: `load_text()`) with the vocabulary of its characters and splits it."""
  source = SOURCE if text is None else "text"
  text = load_text() if text is None else text
  vocabulary = CharVocabulary.from_texts([text])
  ids = np.asarray(vocabulary.encode(text, add_eos=False), np.int32)
  boundary = split_point(len(ids), validation_fraction)
  fingerprint = {
    "source": source,
    "python": ".".join(map(str, sys.version_info[:3])),
    "characters": len(text),
    "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    "validation_fraction": validation_fraction,
  }
  return CharCorpus(
    vocabulary=vocabulary,
    splits={"train": ids[:boundary], "validation": ids[boundary:]},
    fingerprint=fingerprint,
  )


def windows_at(ids: np.ndarray, starts_B: np.ndarray, length: int) -> dict[str, np.ndarray]:
  """int32 inputs [B, L] = ids[s : s + L] and targets [B, L] = ids[s + 1 : s + L + 1] per start s."""
  offsets_BxL = np.asarray(starts_B)[:, None] + np.arange(length + 1)[None, :]
  if offsets_BxL.size and (offsets_BxL.min() < 0 or offsets_BxL.max() >= len(ids)):
    raise DataError(f"a window of {length} + 1 characters leaves the split of {len(ids)} characters")
  window_BxL1 = ids[offsets_BxL]
  # Copies, so that a caller may overwrite targets (e.g. padding rows) without touching inputs.
  return {
    "inputs": np.ascontiguousarray(window_BxL1[:, :-1]),
    "targets": np.ascontiguousarray(window_BxL1[:, 1:]),
  }


def random_window_starts(num_ids: int, length: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """int64 [B] uniform window starts in [0, num_ids - length - 1]: a pure function of (seed, step)."""
  if num_ids < length + 1:
    raise DataError(f"a split of {num_ids} characters is shorter than one window of {length} + 1")
  return np.random.default_rng([seed, step]).integers(0, num_ids - length, size=batch_size)


def consecutive_window_starts(num_ids: int, length: int) -> np.ndarray:
  """int64 [n]: starts 0, L, 2L, ... so that every character after the first is predicted exactly once
  (except the last (num_ids - 1) % L, which do not fill a window)."""
  return np.arange((num_ids - 1) // length, dtype=np.int64) * length
