"""Local text files as token streams for a causal LM, with a `tokenizers` tokenizer (a checkpoint's or trained here).

One line is one document. A split is the concatenation of its documents' ids, each
followed by the end-of-text id, so training windows (`pydoc_corpus.windows_at`) cross
document boundaries the way LM pre-training packs text. Files may be gzipped.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import pathlib

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tmoe_jax.errors import DataError

# The special tokens of a tokenizer trained here, in id order (padding is id 0, as elsewhere).
TRAINED_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
END_OF_TEXT = "</s>"


def read_lines(path: str | pathlib.Path) -> list[str]:
  """The non-empty lines of a text file (gzipped if it ends in .gz), stripped."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"{path}: no such text file")
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rt", encoding="utf-8") as file:
      lines = [line.strip() for line in file]
  except (OSError, UnicodeDecodeError) as error:
    raise DataError(f"{path}: cannot read it as UTF-8 text ({error})") from None
  lines = [line for line in lines if line]
  if not lines:
    raise DataError(f"{path}: no text (every line is empty)")
  return lines


def train_tokenizer(lines: list[str], vocab_size: int) -> Tokenizer:
  """A byte-level BPE tokenizer of `vocab_size` ids learnt from `lines` (deterministic for the same lines)."""
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(TRAINED_SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tokenizer.train_from_iterator(lines, trainer=trainer)
  return tokenizer


def token_stream(tokenizer: Tokenizer, lines: list[str], end_of_text_id: int | None) -> np.ndarray:
  """int32 [N]: every line's ids (as the tokenizer encodes it), each followed by `end_of_text_id`."""
  tail = [] if end_of_text_id is None else [end_of_text_id]
  ids = [token for encoding in tokenizer.encode_batch(lines) for token in (*encoding.ids, *tail)]
  return np.asarray(ids, np.int32)


@dataclasses.dataclass(frozen=True)
class TokenCorpus:
  """Token streams by split name, and a fingerprint of their ids (to check a resumed run's data)."""

  splits: dict[str, np.ndarray]

  @property
  def fingerprint(self) -> dict[str, dict[str, int | str]]:
    return {
      name: {"tokens": int(len(ids)), "sha256": hashlib.sha256(ids.tobytes()).hexdigest()}
      for name, ids in self.splits.items()
    }


def load_token_corpus(
  files: dict[str, pathlib.Path], tokenizer: Tokenizer, end_of_text_id: int | None
) -> TokenCorpus:
  """Each split's file as one token stream."""
  return TokenCorpus(
    {name: token_stream(tokenizer, read_lines(path), end_of_text_id) for name, path in files.items()}
  )
