"""Tests for the sentence-pair classifier's inputs, vocabulary and model (tmoe_jax.models.pair_classifier).

References: features and overlap kinds worked out by hand; the mixture output
recomputed pair by pair on the unpadded sequence, running each expert alone
(its weight slice through the library's single-expert math) and weighting by
the softmax (or top-k) gates of a NumPy router; the classifier head by NumPy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tmoe_jax.data import pair_features as pf
from tmoe_jax.data.word_vocabulary import SPECIAL_TOKENS, WordVocabulary, split_words
from tmoe_jax.errors import ConfigError
from tmoe_jax.models import pair_classifier as pc
from tmoe_jax.moe import sequence_experts

VOCAB = WordVocabulary.from_token_lists(
  [["the", "cat", "sat", "on", "a", "mat", "."], ["the", "dog", "sat", "in", "1998", ","]]
)
PAIRS = [
  ("the cat sat on the mat .", "the dog sat on a mat in 1998 ."),
  ("a cat , 2", "the dog"),
  ("zebra", "zebra zebra 7 ."),
]


# ---------------------------------------------------------------------------- vocabulary


def test_vocabulary_orders_by_count_then_alphabet_and_round_trips():
  vocab = WordVocabulary.from_token_lists([["b", "a", "c", "a"], ["c", "d"]], min_count=1)
  assert vocab.words == ("a", "c", "b", "d")  # a:2, c:2, then b, d alphabetically
  assert vocab.size == 4 + 3
  assert vocab.encode(["a", "d", "zzz"]) == [3, 6, WordVocabulary.UNK_ID]
  assert vocab.decode([3, 2, 1, 0, 6]) == ["a", "<sep>", "<unk>", "d"]
  restored = WordVocabulary.from_json(vocab.to_json())
  assert restored == vocab and restored.encode(["c"]) == vocab.encode(["c"])


def test_vocabulary_min_count_max_size_and_errors():
  lists = [["x", "y", "x", "z", "y", "x"]]
  assert WordVocabulary.from_token_lists(lists, min_count=2).words == ("x", "y")
  assert WordVocabulary.from_token_lists(lists, max_size=1).words == ("x",)
  with pytest.raises(ValueError, match="duplicate"):
    WordVocabulary(["a", "a"])
  with pytest.raises(ValueError, match="reserved"):
    WordVocabulary([SPECIAL_TOKENS[1]])
  with pytest.raises(ValueError, match="whitespace"):
    WordVocabulary(["a b"])
  with pytest.raises(TypeError, match="split it first"):
    VOCAB.encode("the cat")
  with pytest.raises(ValueError, match="not a WordVocabulary"):
    WordVocabulary.from_json('{"kind": "other"}')
  with pytest.raises(ValueError, match="out of range"):
    VOCAB.decode([VOCAB.size])
  assert split_words("The  Cat\t.", lowercase=True) == ["the", "cat", "."]
  assert split_words("The Cat", lowercase=False) == ["The", "Cat"]


# ---------------------------------------------------------------------------- inputs


def test_overlap_kinds_by_hand():
  kinds = pf.overlap_kinds(["the", "cat", "1998", "$2"], ["cat", "in", "1998"])
  assert kinds == [
    pf.OVERLAP_WORD_UNMATCHED,
    pf.OVERLAP_WORD_MATCHED,
    pf.OVERLAP_NUMBER_MATCHED,
    pf.OVERLAP_NUMBER_UNMATCHED,
  ]


def test_pair_features_by_hand():
  a = ["the", "cat", "sat", "on", "the", "mat"]  # unigrams {the, cat, sat, on, mat}: 5
  b = ["the", "cat", "sat", "in", "1998"]  # {the, cat, sat, in, 1998}: 5
  features = dict(zip(pf.PAIR_FEATURE_NAMES, pf.pair_features(a, b)))
  assert len(features) == pf.NUM_PAIR_FEATURES == 10
  expected = {
    # shared unigrams {the, cat, sat}: 3/5 both ways
    "1gram_overlap_min": 3 / 5,
    "1gram_overlap_max": 3 / 5,
    # bigrams of a: 5 distinct, of b: 4; shared (the cat), (cat sat)
    "2gram_overlap_min": 2 / 5,
    "2gram_overlap_max": 2 / 4,
    # trigrams of a: 4, of b: 3; shared (the cat sat)
    "3gram_overlap_min": 1 / 4,
    "3gram_overlap_max": 1 / 3,
    "numbers_equal": 0.0,  # {} vs {1998}
    "numbers_jaccard": 0.0,
    "has_numbers": 1.0,
    "relative_length_difference": 1 / 6,
  }
  for name, value in expected.items():
    assert features[name] == pytest.approx(value), name
  # No numbers on either side agree; order of the sentences does not matter.
  same = dict(zip(pf.PAIR_FEATURE_NAMES, pf.pair_features(["x"], ["x", "y"])))
  assert (same["numbers_equal"], same["numbers_jaccard"], same["has_numbers"]) == (1.0, 1.0, 0.0)
  np.testing.assert_array_equal(pf.pair_features(a, b), pf.pair_features(b, a))
  assert pf.pair_features([], []).tolist() == [0.0] * 6 + [1.0, 1.0, 0.0, 0.0]


def test_truncate_pair_drops_from_the_longer_sentence():
  assert pf.truncate_pair(3, 4, 10) == (3, 4)
  assert pf.truncate_pair(8, 3, 6) == (3, 3)
  assert pf.truncate_pair(5, 5, 7) == (3, 4)  # ties drop from the first


def test_encode_pair_layout():
  tokens1, tokens2 = ["the", "cat", "7"], ["a", "cat"]
  encoded = pf.encode_pair(tokens1, tokens2, VOCAB, max_length=8)
  the, cat, a = VOCAB.encode(["the", "cat", "a"])
  unk, sep = WordVocabulary.UNK_ID, WordVocabulary.SEP_ID
  assert encoded["token_ids"].tolist() == [the, cat, unk, sep, a, cat, 0, 0]
  assert encoded["segment_ids"].tolist() == [0, 0, 0, 0, 1, 1, 0, 0]
  m, u, nu = pf.OVERLAP_WORD_MATCHED, pf.OVERLAP_WORD_UNMATCHED, pf.OVERLAP_NUMBER_UNMATCHED
  assert encoded["overlap_ids"].tolist() == [u, m, nu, pf.OVERLAP_SPECIAL, u, m, 0, 0]
  np.testing.assert_array_equal(encoded["features"], pf.pair_features(tokens1, tokens2))
  # Too long: the longer first sentence loses its tail; kinds still see the whole other sentence.
  short = pf.encode_pair(["x", "y", "z", "cat"], ["cat"], VOCAB, max_length=4)
  assert short["token_ids"].tolist() == [unk, unk, sep, cat]
  assert short["overlap_ids"].tolist() == [u, u, pf.OVERLAP_SPECIAL, m]
  batch = pf.encode_pairs([tokens1, ["x"]], [tokens2, ["y"]], VOCAB, 8)
  assert batch["token_ids"].shape == (2, 8) and batch["features"].shape == (2, pf.NUM_PAIR_FEATURES)
  assert batch["token_ids"].dtype == np.int32 and batch["features"].dtype == np.float32
  with pytest.raises(ValueError, match="max_length"):
    pf.encode_pair(["a"], ["b"], VOCAB, 2)


# ---------------------------------------------------------------------------- model


INPUT_SIZES = {"num_overlap_kinds": pf.NUM_OVERLAP_KINDS, "num_pair_features": pf.NUM_PAIR_FEATURES}


def _config(**overrides):
  values = {
    "vocab_size": VOCAB.size,
    "num_overlap_kinds": pf.NUM_OVERLAP_KINDS,
    "num_pair_features": pf.NUM_PAIR_FEATURES,
    "embedding_size": 6,
    "num_experts": 3,
    "hidden_size": 5,
    "expert_type": "cnn",
    "kernel_width": 3,
    "dropout_rate": 0.0,
    "classifier_hidden_size": 4,
  }
  values.update(overrides)
  return pc.PairClassifierConfig(**values)


def _batch(max_length: int) -> dict[str, np.ndarray]:
  tokens = [(split_words(a, lowercase=True), split_words(b, lowercase=True)) for a, b in PAIRS]
  return pf.encode_pairs([t[0] for t in tokens], [t[1] for t in tokens], VOCAB, max_length)


def _param(variable) -> np.ndarray:
  return np.asarray(variable[...], np.float64)


def reference_mixture(model: pc.PairClassifier, encoded: dict[str, np.ndarray]) -> np.ndarray:
  """[B, H]: for each pair alone, unpadded, each expert run alone, weighted by the gates."""
  config = model.config
  kind = config.sequence_expert_type
  names = sequence_experts.SEQUENCE_EXPERT_PARAMS_BY_TYPE[kind]
  single_expert_fn = {
    "mlp": sequence_experts.mean_pool_mlp,
    "gru": sequence_experts.gru_last_state,
    "lstm": sequence_experts.lstm_last_state,
    "cnn": sequence_experts.conv_max_pool,
  }[kind]
  weights = [getattr(model.moe.experts, name)[...] for name in names]
  router_DxE = _param(model.moe.router.kernel)
  rows = []
  for b in range(len(encoded["token_ids"])):
    length = int(np.sum(encoded["token_ids"][b] != 0))
    x_LxD = np.asarray(
      model.embed(
        jnp.asarray(encoded["token_ids"][b : b + 1, :length]),
        jnp.asarray(encoded["segment_ids"][b : b + 1, :length]),
        jnp.asarray(encoded["overlap_ids"][b : b + 1, :length]),
      )[0],
      np.float64,
    )
    logits_E = x_LxD.mean(axis=0) @ router_DxE
    gates_E = np.exp(logits_E - logits_E.max())
    gates_E /= gates_E.sum()
    if config.gating == "top_k":
      keep = np.argsort(-gates_E)[: config.top_k]
      kept = np.zeros_like(gates_E)
      kept[keep] = gates_E[keep]
      gates_E = kept / kept.sum() if config.top_k > 1 else kept
    mixed_H = np.zeros(config.hidden_size)
    for e in range(config.num_experts):
      one_expert = [w[e : e + 1] for w in weights]
      y_1x1xH = single_expert_fn(jnp.asarray(x_LxD, jnp.float32)[None, None], None, *one_expert)
      mixed_H += gates_E[e] * np.asarray(y_1x1xH[0, 0], np.float64)
    rows.append(mixed_H)
  return np.stack(rows)


@pytest.mark.parametrize(
  "overrides",
  [
    {"expert_type": "mlp"},
    {"expert_type": "rnn", "rnn_cell": "gru"},
    {"expert_type": "rnn", "rnn_cell": "lstm"},
    {"expert_type": "cnn"},
    {"expert_type": "cnn", "gating": "top_k", "top_k": 2},
    {"expert_type": "mlp", "gating": "top_k", "top_k": 1},
  ],
  ids=lambda o: "-".join(str(v) for v in o.values()),
)
def test_mixture_is_the_gate_weighted_sum_of_experts_run_alone(overrides):
  model = pc.PairClassifier(_config(**overrides), rngs=nnx.Rngs(params=1))
  encoded = _batch(max_length=16)
  pooled_BxH, aux = model.encode(
    jnp.asarray(encoded["token_ids"]),
    jnp.asarray(encoded["segment_ids"]),
    jnp.asarray(encoded["overlap_ids"]),
  )
  np.testing.assert_allclose(np.asarray(pooled_BxH), reference_mixture(model, encoded), rtol=2e-5, atol=2e-6)
  assert np.asarray(aux.expert_fraction_E).shape == (3,)


def test_classifier_head_reads_mixture_and_features():
  model = pc.PairClassifier(_config(), rngs=nnx.Rngs(params=2))
  encoded = _batch(max_length=16)
  batch = {name: jnp.asarray(values) for name, values in encoded.items()}
  logits_Bx2, _ = model.batch_logits(batch)
  pooled_BxH, _ = model.encode(batch["token_ids"], batch["segment_ids"], batch["overlap_ids"])
  inputs = np.concatenate([np.asarray(pooled_BxH, np.float64), encoded["features"]], axis=1)
  hidden = np.maximum(inputs @ _param(model.hidden.kernel) + _param(model.hidden.bias), 0.0)
  expected = hidden @ _param(model.output.kernel) + _param(model.output.bias)
  np.testing.assert_allclose(np.asarray(logits_Bx2), expected, rtol=1e-5, atol=1e-6)
  # A linear head when classifier_hidden_size is 0.
  linear = pc.PairClassifier(_config(classifier_hidden_size=0), rngs=nnx.Rngs(params=2))
  assert linear.hidden is None and linear.batch_logits(batch)[0].shape == (3, 2)


@pytest.mark.parametrize("expert_type", ["mlp", "rnn", "cnn"])
def test_padding_does_not_change_logits(expert_type):
  model = pc.PairClassifier(_config(expert_type=expert_type), rngs=nnx.Rngs(params=3))
  # The longest pair has 17 tokens: neither length truncates.
  short = {k: jnp.asarray(v) for k, v in _batch(max_length=17).items()}
  long = {k: jnp.asarray(v) for k, v in _batch(max_length=30).items()}
  np.testing.assert_allclose(
    np.asarray(model.batch_logits(short)[0]), np.asarray(model.batch_logits(long)[0]), rtol=1e-5, atol=1e-6
  )


def test_dropout_only_in_training():
  model = pc.PairClassifier(_config(dropout_rate=0.5), rngs=nnx.Rngs(params=4))
  batch = {k: jnp.asarray(v) for k, v in _batch(max_length=12).items()}
  eval_a, eval_b = model.batch_logits(batch)[0], model.batch_logits(batch)[0]
  np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
  train, _ = model.batch_logits(batch, deterministic=False, rngs=nnx.Rngs(dropout=0))
  assert not np.allclose(np.asarray(train), np.asarray(eval_a))


@pytest.mark.parametrize(
  "overrides, field",
  [
    ({"expert_type": "transformer"}, "model.expert_type"),
    ({"rnn_cell": "elman"}, "model.rnn_cell"),
    ({"gating": "noisy"}, "model.gating"),
    ({"top_k": 4}, "model.top_k"),
    ({"num_experts": 0}, "model.num_experts"),
    ({"dropout_rate": 1.0}, "model.dropout_rate"),
    ({"classifier_hidden_size": -1}, "model.classifier_hidden_size"),
  ],
)
def test_bad_settings_name_the_field(overrides, field):
  with pytest.raises(ConfigError, match=field):
    _config(**overrides)


def test_from_config_type_checks():
  from configs import mrpc_moe

  model_config = mrpc_moe.get_config().model.to_dict()
  built = pc.PairClassifierConfig.from_config(model_config, vocab_size=50, **INPUT_SIZES)
  assert (built.num_experts, built.hidden_size, built.dtype) == (4, 256, jnp.float32)
  model_config["num_experts"] = "4"
  with pytest.raises(ConfigError, match="model.num_experts: expected int"):
    pc.PairClassifierConfig.from_config(model_config, vocab_size=50, **INPUT_SIZES)
  model_config["num_experts"] = 4
  model_config["dtype"] = "float16"
  with pytest.raises(ConfigError, match="model.dtype"):
    pc.PairClassifierConfig.from_config(model_config, vocab_size=50, **INPUT_SIZES)


def test_jit_matches_eager():
  model = pc.PairClassifier(_config(expert_type="rnn"), rngs=nnx.Rngs(params=5))
  batch = {k: jnp.asarray(v) for k, v in _batch(max_length=12).items()}
  graphdef, state = nnx.split(model)

  @jax.jit
  def logits(state, batch):
    return nnx.merge(graphdef, state).batch_logits(batch)[0]

  np.testing.assert_allclose(
    np.asarray(logits(state, batch)), np.asarray(model.batch_logits(batch)[0]), rtol=1e-5, atol=1e-6
  )
