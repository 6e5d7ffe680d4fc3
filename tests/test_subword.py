"""Tests for the SentencePiece subword vocabulary (`tmoe_jax.data.subword`)."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from tmoe_jax.data.seq2seq import decoder_inputs, encode_split
from tmoe_jax.data.subword import SubwordVocabulary
from tmoe_jax.data.vocabulary import UNK_CHAR, CharVocabulary

MULTI30K_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"

# fmt: off
_WORDS = [
  "ein", "eine", "zwei", "Mann", "Frau", "Hund", "Kinder", "spielt", "spielen", "läuft", "laufen", "im",
  "Park", "auf", "der", "Straße", "mit", "einem", "roten", "blauen", "Ball", "Über", "Fußgänger",
  "a", "an", "two", "man", "woman", "dog", "children", "plays", "play", "runs", "run", "in", "the",
  "park", "on", "street", "with", "red", "blue", "ball", ",", ".", "!",
]
_SYLLABLES = ["ka", "ri", "mo", "län", "te", "su", "bo", "ne", "ga", "hü", "der", "ein", "ung", "sch", "st",
              "pa", "lo", "mi", "ß", "ve"]
# fmt: on


def _synthetic_corpus(n: int = 1500) -> list[str]:
  rng = random.Random(0)
  # Made-up words from shared syllables give the model frequent subwords to find.
  words = _WORDS + ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 3))) for _ in range(300)]
  texts = [" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(n)]
  # Whitespace the tokenizer must reproduce exactly: doubled, leading, trailing, tabs.
  return [*texts, "zwei  Hunde", " ein Mann", "a dog ", "Ball\tball", "ÄÖÜ äöü ß"]


CORPUS = _synthetic_corpus()
VOCAB_SIZE = 200


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def vocabulary(request) -> SubwordVocabulary:
  return SubwordVocabulary.train(CORPUS, VOCAB_SIZE, model_type=request.param)


def test_size_specials_and_model_type(vocabulary):
  assert vocabulary.size == len(vocabulary) == VOCAB_SIZE
  assert [vocabulary.piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
  assert (vocabulary.PAD_ID, vocabulary.BOS_ID, vocabulary.EOS_ID, vocabulary.UNK_ID) == (0, 1, 2, 3)
  assert vocabulary.model_type in ("unigram", "bpe")
  # Subwords, not characters: a sentence needs fewer ids than it has characters.
  lengths = vocabulary.encoded_lengths(CORPUS[:200], add_eos=False)
  assert lengths.sum() < 0.5 * sum(len(t) for t in CORPUS[:200])


def test_round_trip_is_exact_on_training_sentences(vocabulary):
  for text in CORPUS:
    ids = vocabulary.encode(text)
    assert ids[-1] == vocabulary.EOS_ID
    assert vocabulary.UNK_ID not in ids
    assert min(ids[:-1], default=4) >= 4, "only EOS among the specials"
    assert vocabulary.decode(ids) == text


def test_unseen_characters_become_unk(vocabulary):
  ids = vocabulary.encode("ein ☃ Hund", add_eos=False)
  assert vocabulary.UNK_ID in ids
  assert vocabulary.decode(ids) == f"ein {UNK_CHAR} Hund"


def test_byte_fallback_round_trips_unseen_characters():
  vocabulary = SubwordVocabulary.train(CORPUS, VOCAB_SIZE + 256, byte_fallback=True)
  ids = vocabulary.encode("ein ☃ Hund")
  assert vocabulary.UNK_ID not in ids
  assert vocabulary.decode(ids) == "ein ☃ Hund"


def test_training_is_deterministic(vocabulary):
  again = SubwordVocabulary.train(CORPUS, VOCAB_SIZE, model_type=vocabulary.model_type)
  assert again.model_proto == vocabulary.model_proto
  assert again == vocabulary and hash(again) == hash(vocabulary)
  np.testing.assert_array_equal(again.encode_batch(CORPUS, 40), vocabulary.encode_batch(CORPUS, 40))
  # Other data gives another model: the comparison above is not vacuous.
  other = SubwordVocabulary.train(CORPUS[::-1][:1000], VOCAB_SIZE, model_type=vocabulary.model_type)
  assert other != vocabulary


def test_training_is_deterministic_across_processes():
  # A fresh interpreter has other memory addresses and an unseeded global random state.
  script = (
    "import sys; from tests.test_subword import CORPUS, VOCAB_SIZE; "
    "from tmoe_jax.data.subword import SubwordVocabulary; "
    "sys.stdout.write(SubwordVocabulary.train(CORPUS, VOCAB_SIZE).to_json())"
  )
  repo = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run(
    [sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, check=True, timeout=120
  )
  assert SubwordVocabulary.from_json(result.stdout) == SubwordVocabulary.train(CORPUS, VOCAB_SIZE)


def test_decode_stops_at_eos_and_skips_pad_and_bos(vocabulary):
  hund = vocabulary.encode("Hund", add_eos=False)
  mann = vocabulary.encode("Mann", add_eos=False)
  ids = [vocabulary.BOS_ID, *hund, vocabulary.PAD_ID, vocabulary.EOS_ID, *mann]
  assert vocabulary.decode(ids) == "Hund"
  assert vocabulary.decode(np.array(ids, dtype=np.int32)) == "Hund"
  assert vocabulary.decode([]) == ""
  with pytest.raises(ValueError, match="out of range"):
    vocabulary.decode([VOCAB_SIZE])
  with pytest.raises(ValueError, match="out of range"):
    vocabulary.decode([-1])
  with pytest.raises(ValueError, match="1-D"):
    vocabulary.decode([[4, 5]])
  with pytest.raises(ValueError, match="integers"):
    vocabulary.decode([4.0])


def test_encode_batch_shapes_eos_padding_and_truncation(vocabulary):
  texts = ["ein Hund", "zwei Kinder spielen im Park mit einem roten Ball", ""]
  rows = [vocabulary.encode(t) for t in texts]
  assert rows[2] == [vocabulary.EOS_ID]
  long_length = len(rows[1])
  max_length = long_length - 2  # the second text does not fit
  assert len(rows[0]) < max_length

  batch = vocabulary.encode_batch(texts, max_length)
  assert batch.shape == (3, max_length) and batch.dtype == np.int32
  # Fitting rows: ids, EOS, then PAD.
  assert batch[0].tolist() == rows[0] + [0] * (max_length - len(rows[0]))
  assert batch[2].tolist() == [vocabulary.EOS_ID] + [0] * (max_length - 1)
  # A row too long keeps its first max_length ids and so loses its EOS.
  assert batch[1].tolist() == rows[1][:max_length]
  assert vocabulary.EOS_ID not in batch[1]
  np.testing.assert_array_equal(vocabulary.encoded_lengths(texts), [len(r) for r in rows])

  with_bos = vocabulary.encode_batch(texts, long_length + 1, add_bos=True)
  assert with_bos[:, 0].tolist() == [vocabulary.BOS_ID] * 3
  assert with_bos[1].tolist() == [vocabulary.BOS_ID, *rows[1]]
  no_eos = vocabulary.encode_batch(texts, long_length, add_eos=False)
  assert vocabulary.EOS_ID not in no_eos
  assert vocabulary.encode_batch([], 5).shape == (0, 5)

  for bad in (0, 2.0, True):
    with pytest.raises(ValueError, match="max_length"):
      vocabulary.encode_batch(texts, bad)
  with pytest.raises(ValueError, match="not a str"):
    vocabulary.encode_batch("ein Hund", 8)
  with pytest.raises(ValueError, match=r"texts\[1\] must be a str"):
    vocabulary.encode_batch(["a", 3], 8)


def test_json_and_file_round_trip(vocabulary, tmp_path):
  document = json.loads(vocabulary.to_json())
  assert document["kind"] == "tmoe_jax.SubwordVocabulary"
  assert document["size"] == VOCAB_SIZE and document["model_type"] == vocabulary.model_type
  restored = SubwordVocabulary.from_json(vocabulary.to_json())
  assert restored == vocabulary
  assert restored.encode(CORPUS[0]) == vocabulary.encode(CORPUS[0])

  path = tmp_path / "vocabulary.json"
  vocabulary.save(path)
  assert [p.name for p in tmp_path.iterdir()] == ["vocabulary.json"]
  loaded = SubwordVocabulary.load(path)
  assert loaded == vocabulary
  np.testing.assert_array_equal(
    loaded.encode_batch(CORPUS[:50], 30), vocabulary.encode_batch(CORPUS[:50], 30)
  )


def test_bad_json_documents(vocabulary, tmp_path):
  good = json.loads(vocabulary.to_json())
  with pytest.raises(ValueError, match="not a SubwordVocabulary JSON document"):
    SubwordVocabulary.from_json("{")
  with pytest.raises(ValueError, match="kind 'tmoe_jax.CharVocabulary'"):
    SubwordVocabulary.from_json(CharVocabulary("ab").to_json())
  with pytest.raises(ValueError, match="version"):
    SubwordVocabulary.from_json(json.dumps({**good, "version": 99}))
  with pytest.raises(ValueError, match="not base64"):
    SubwordVocabulary.from_json(json.dumps({**good, "model_proto_base64": "@@@"}))
  with pytest.raises(ValueError, match="not a SentencePiece model proto"):
    SubwordVocabulary.from_json(json.dumps({**good, "model_proto_base64": "AAAA"}))
  with pytest.raises(ValueError, match="size"):
    SubwordVocabulary.from_json(json.dumps({**good, "size": 7}))
  path = tmp_path / "broken.json"
  path.write_text("[]")
  with pytest.raises(ValueError, match="broken.json: not a SubwordVocabulary"):
    SubwordVocabulary.load(path)


def test_model_with_other_special_ids_is_rejected():
  model = io.BytesIO()
  # SentencePiece's own defaults: unk 0, bos 1, eos 2, no pad.
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=100, num_threads=1, minloglevel=2
  )
  with pytest.raises(ValueError, match="special ids"):
    SubwordVocabulary(model.getvalue())
  with pytest.raises(ValueError, match="bytes"):
    SubwordVocabulary("not bytes")


@pytest.mark.parametrize(
  "texts, kwargs, match",
  [
    ("ein Hund", {}, "not a str"),
    (["ein Hund", None], {}, r"texts\[1\] must be a str"),
    (["", ""], {}, "at least one non-empty"),
    (CORPUS, {"vocab_size": 4}, "vocab_size must be > 4"),
    (CORPUS, {"vocab_size": 100.0}, "vocab_size must be an int"),
    (CORPUS, {"model_type": "word"}, "model_type must be one of"),
    (CORPUS, {"character_coverage": 0.0}, "character_coverage"),
    (CORPUS, {"character_coverage": "1"}, "character_coverage"),
    (CORPUS, {"seed": -1}, "seed"),
    (CORPUS, {"byte_fallback": 1}, "byte_fallback"),
    (["ein Hund"], {"vocab_size": 5000}, r"training \(vocab_size=5000\) failed.*[Vv]ocabulary size"),
  ],
)
def test_train_validates_arguments(texts, kwargs, match):
  with pytest.raises(ValueError, match=match):
    SubwordVocabulary.train(texts, **{"vocab_size": 100, **kwargs})


def test_drop_in_for_the_seq2seq_data_path(vocabulary):
  split = encode_split(vocabulary, ["ein Hund läuft"], ["a dog runs"], 16, 12)
  assert split.source_ids_NxS.shape == (1, 16) and split.target_ids_NxL.shape == (1, 12)
  assert vocabulary.decode(split.target_ids_NxL[0]) == "a dog runs"
  inputs = decoder_inputs(split.target_ids_NxL, vocabulary.BOS_ID)
  assert inputs[0, 0] == vocabulary.BOS_ID
  np.testing.assert_array_equal(inputs[0, 1:], split.target_ids_NxL[0, :-1])


def _read_gz_lines(path: pathlib.Path, n: int) -> list[str]:
  with gzip.open(path, "rt", encoding="utf-8", newline="\n") as f:
    return [line.removesuffix("\n") for line in itertools.islice(f, n)]


def test_real_multi30k_sentences():
  if not MULTI30K_DIR.is_dir():
    pytest.skip(f"real Multi30k files not found at {MULTI30K_DIR} (only on the project's data machine)")
  german = _read_gz_lines(MULTI30K_DIR / "train.de.gz", 2000)
  english = _read_gz_lines(MULTI30K_DIR / "train.en.gz", 2000)
  texts = german + english
  vocabulary = SubwordVocabulary.train(texts, 1000)
  assert vocabulary.size == 1000
  assert all(vocabulary.decode(vocabulary.encode(t)) == t for t in texts)
  lengths = vocabulary.encoded_lengths(texts)
  # Subwords of a 1000-piece model: roughly 2-3 times fewer ids than characters.
  assert lengths.mean() < 0.5 * np.mean([len(t) for t in texts])
  # Held-out sentences encode too (unknown characters aside), e.g. the first validation pair.
  val = _read_gz_lines(MULTI30K_DIR / "val.en.gz", 1)[0]
  assert vocabulary.decode(vocabulary.encode(val)) == val
