"""Tests for greedy decoding and beam search against slow, independent references.

The references below run the step function eagerly, one step at a time, on
Python lists of hypotheses: a plain argmax loop for greedy decoding, an
exhaustive enumeration of every sequence for beam search with a beam wide
enough to be exact, and a list-based beam search for beams that prune.

The toy model's logits depend on the whole history through a hidden state in
its cache and on the batch row through a row id in its cache, so a beam search
that tiles or reorders the cache wrongly decodes something else.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from tmoe_jax.decoding import beam_search, greedy_decode

PAD, BOS, EOS = 0, 1, 2


class HistoryModel:
  """A random decoder whose next-token logits depend on the whole prefix.

  logits = sharpness * (table[row, prev] + h @ proj + step_bias[step]) + mask[row]
  with h <- 0.5 * h + emb[prev]: `h` carries the history, `row` (the batch row
  the beam belongs to) selects a different bigram table per example, and the
  step argument is used too. `mask` is 0 or -inf (tokens the model never emits).
  """

  def __init__(
    self,
    seed,
    *,
    batch,
    vocab,
    max_length,
    hidden=3,
    sharpness=1.0,
    eos_bias=0.0,
    masked_ids=(),
    masked_rows=None,
  ):
    rng = np.random.default_rng(seed)
    self.batch, self.vocab, self.hidden = batch, vocab, hidden
    self.table_BxVxV = jnp.asarray(rng.normal(size=(batch, vocab, vocab)), jnp.float32)
    self.table_BxVxV = self.table_BxVxV.at[:, :, EOS].add(eos_bias)
    self.emb_VxH = jnp.asarray(rng.normal(size=(vocab, hidden)), jnp.float32)
    self.proj_HxV = jnp.asarray(rng.normal(size=(hidden, vocab)), jnp.float32)
    self.step_bias_LxV = jnp.asarray(rng.normal(size=(max_length, vocab)), jnp.float32)
    self.sharpness = sharpness
    mask_BxV = np.zeros((batch, vocab), np.float32)
    mask_BxV[:, list(masked_ids)] = -np.inf
    for row, ids in (masked_rows or {}).items():
      mask_BxV[row, list(ids)] = -np.inf
    self.mask_BxV = jnp.asarray(mask_BxV)

  def initial_cache(self):
    return {
      "row": jnp.arange(self.batch, dtype=jnp.int32),
      "state": (jnp.zeros((self.batch, self.hidden), jnp.float32),),
    }

  def step_fn(self, tokens_N, cache, step):
    row_N = cache["row"]
    (h_NxH,) = cache["state"]
    h_NxH = 0.5 * h_NxH + self.emb_VxH[tokens_N]
    logits_NxV = (
      self.sharpness * (self.table_BxVxV[row_N, tokens_N] + h_NxH @ self.proj_HxV + self.step_bias_LxV[step])
      + self.mask_BxV[row_N]
    )
    return logits_NxV, {"row": row_N, "state": (h_NxH,)}


# --------------------------------------------------------------------------
# Slow references.


def _log_softmax64(logits):
  logits = np.asarray(logits, np.float64)
  top = logits.max(axis=-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def _norm(length, alpha):
  return ((5.0 + length) / 6.0) ** alpha


def _one_row_cache(model, row):
  return jax.tree.map(lambda x: x[row : row + 1], model.initial_cache())


def _extend(model, prefixes, cache, step):
  """Runs one eager step on every prefix; returns float64 log-probs [P, V] and the cache."""
  tokens = jnp.asarray([p[-1] if p else BOS for p in prefixes], jnp.int32)
  logits, cache = model.step_fn(tokens, cache, jnp.int32(step))
  return _log_softmax64(logits), cache


def brute_force_hypotheses(model, row, *, max_length, length_penalty):
  """Every possible output of `row` as (tokens, score, finished), by full enumeration."""
  prefixes, logps = [()], [0.0]
  cache = _one_row_cache(model, row)
  results = []
  for step in range(max_length):
    logp_PxV, cache = _extend(model, prefixes, cache, step)
    next_prefixes, next_logps, parents = [], [], []
    for i, prefix in enumerate(prefixes):
      for token in range(model.vocab):
        logp = logps[i] + logp_PxV[i, token]
        if logp == -math.inf:
          continue
        seq = prefix + (token,)
        if token == EOS:
          results.append((seq, logp / _norm(len(seq), length_penalty), True))
        elif step == max_length - 1:
          results.append((seq, logp / _norm(max_length, length_penalty), False))
        else:
          next_prefixes.append(seq)
          next_logps.append(logp)
          parents.append(i)
    if not next_prefixes:
      break
    prefixes, logps = next_prefixes, next_logps
    cache = jax.tree.map(lambda x: x[np.asarray(parents)], cache)
  return results


def rank(hypotheses):
  """The contract's order: finished before unfinished, then by score."""
  return sorted(hypotheses, key=lambda h: (not h[2], -h[1]))


def reference_beam_search(model, row, *, beam_size, max_length, length_penalty, reorder_cache=True):
  """List-based beam search: keep the W best finished and the W most probable alive.

  With reorder_cache=False each new hypothesis gets the cache row at its own
  position instead of its parent's: the bug the real tests must catch.
  """
  alive = [((), 0.0)]
  cache = _one_row_cache(model, row)
  finished = []
  for step in range(max_length):
    logp_PxV, cache = _extend(model, [seq for seq, _ in alive], cache, step)
    continuing = []
    for i, (seq, logp) in enumerate(alive):
      for token in range(model.vocab):
        new_logp = logp + logp_PxV[i, token]
        if new_logp == -math.inf:
          continue
        if token == EOS:
          finished.append((seq + (token,), new_logp / _norm(step + 1, length_penalty), True))
        else:
          continuing.append((seq + (token,), new_logp, i))
    finished = sorted(finished, key=lambda h: -h[1])[:beam_size]
    continuing = sorted(continuing, key=lambda h: -h[1])[:beam_size]
    if not continuing:
      alive = []
      break
    alive = [(seq, logp) for seq, logp, _ in continuing]
    if reorder_cache:
      rows = [parent for _, _, parent in continuing]
    else:
      rows = [min(i, len(logp_PxV) - 1) for i in range(len(continuing))]
    cache = jax.tree.map(lambda x: x[np.asarray(rows)], cache)
  unfinished = [
    (seq, logp / _norm(max_length, length_penalty), False) for seq, logp in alive if len(seq) == max_length
  ]
  return rank(finished + unfinished)[:beam_size]


def to_arrays(hypotheses, *, beam_size, max_length, pad_id=PAD):
  """Pads the hypotheses to [W, L] tokens and [W] scores (missing slots: pad, -inf)."""
  seqs = np.full((beam_size, max_length), pad_id, np.int32)
  scores = np.full((beam_size,), -np.inf, np.float64)
  for k, (seq, score, _) in enumerate(hypotheses):
    seqs[k, : len(seq)] = seq
    scores[k] = score
  return seqs, scores


def reference_greedy(model, *, max_length, pad_id=PAD):
  cache = model.initial_cache()
  tokens = np.full((model.batch,), BOS, np.int32)
  done = np.zeros((model.batch,), bool)
  out = []
  for step in range(max_length):
    logits, cache = model.step_fn(jnp.asarray(tokens), cache, jnp.int32(step))
    tokens = np.argmax(np.asarray(logits), axis=-1).astype(np.int32)
    tokens[done] = pad_id
    done |= tokens == EOS
    out.append(tokens)
  return np.stack(out, axis=1)


def assert_padded_after_eos(seqs, pad_id):
  seqs = np.asarray(seqs).reshape(-1, seqs.shape[-1])
  for seq in seqs:
    hits = np.flatnonzero(seq == EOS)
    if hits.size:
      np.testing.assert_array_equal(seq[hits[0] + 1 :], pad_id)


# --------------------------------------------------------------------------
# Greedy decoding.


class GreedyDecodeTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0, 1, 2)
  def test_matches_python_loop(self, seed):
    batch, max_length = 4, 8
    model = HistoryModel(seed, batch=batch, vocab=7, max_length=max_length, eos_bias=1.0)
    decode = self.variant(
      lambda cache: greedy_decode(
        model.step_fn, cache, batch_size=batch, max_length=max_length, bos_id=BOS, eos_id=EOS
      )
    )
    tokens = decode(model.initial_cache())
    chex.assert_shape(tokens, (batch, max_length))
    chex.assert_type(tokens, jnp.int32)
    chex.assert_trees_all_equal(np.asarray(tokens), reference_greedy(model, max_length=max_length))

  @chex.variants(with_jit=True, without_jit=True)
  def test_pads_after_eos(self):
    # Row r emits token 3 except EOS at step r; the model would go on after
    # EOS, so anything but pad_id there is the decoder's fault. Row max_length
    # never emits EOS. pad_id 5 is never produced by the model itself.
    max_length, pad_id = 5, 5
    batch = max_length + 1

    def step_fn(tokens_B, row_B, step):
      del tokens_B
      next_B = jnp.where(row_B == step, EOS, 3)
      return 10.0 * jax.nn.one_hot(next_B, 6), row_B

    decode = self.variant(
      lambda cache: greedy_decode(
        step_fn, cache, batch_size=batch, max_length=max_length, bos_id=BOS, eos_id=EOS, pad_id=pad_id
      )
    )
    tokens = np.asarray(decode(jnp.arange(batch, dtype=jnp.int32)))
    expected = np.full((batch, max_length), 3, np.int32)
    for row in range(max_length):
      expected[row, row] = EOS
      expected[row, row + 1 :] = pad_id
    np.testing.assert_array_equal(tokens, expected)


# --------------------------------------------------------------------------
# Beam search.


class BeamSearchTest(chex.TestCase):
  def _decode(self, model, *, beam_size, max_length, length_penalty=0.6, pad_id=PAD):
    decode = self.variant(
      lambda cache: beam_search(
        model.step_fn,
        cache,
        batch_size=model.batch,
        beam_size=beam_size,
        max_length=max_length,
        bos_id=BOS,
        eos_id=EOS,
        pad_id=pad_id,
        length_penalty=length_penalty,
      )
    )
    seqs, scores = decode(model.initial_cache())
    chex.assert_shape(seqs, (model.batch, beam_size, max_length))
    chex.assert_shape(scores, (model.batch, beam_size))
    chex.assert_type(seqs, jnp.int32)
    chex.assert_type(scores, jnp.float32)
    return np.asarray(seqs), np.asarray(scores)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    # 27 = 3 ** 3 beams keep every prefix of length < 4 alive, so the 27 best
    # of the 40 EOS-terminated sequences are found exactly.
    ("full_vocab_seed0", 0, 4, (), 27, 4, 0.6),
    ("full_vocab_seed1", 1, 4, (), 27, 4, 0.6),
    ("full_vocab_seed2", 2, 4, (), 27, 4, 1.0),
    ("no_length_penalty", 3, 4, (), 27, 4, 0.0),
    # PAD and BOS are never emitted, three words and EOS are.
    ("masked_specials", 4, 6, (PAD, BOS), 27, 4, 0.6),
    # 7 finished sequences exist: 3 slots are filled with unfinished ones,
    ("fill_with_unfinished", 5, 3, (), 10, 3, 0.6),
    # and with 16 slots all 15 sequences are returned plus one empty slot.
    ("more_beams_than_sequences", 6, 3, (), 16, 3, 0.6),
    # Nothing can finish: the best 9 of 27 unfinished sequences.
    ("eos_impossible", 7, 4, (EOS,), 9, 3, 0.6),
  )
  def test_wide_beam_matches_exhaustive_enumeration(
    self, seed, vocab, masked_ids, beam_size, max_length, length_penalty
  ):
    model = HistoryModel(seed, batch=2, vocab=vocab, max_length=max_length, masked_ids=masked_ids)
    seqs, scores = self._decode(
      model, beam_size=beam_size, max_length=max_length, length_penalty=length_penalty
    )
    for row in range(model.batch):
      everything = brute_force_hypotheses(model, row, max_length=max_length, length_penalty=length_penalty)
      best = rank(everything)
      want_seqs, want_scores = to_arrays(best[:beam_size], beam_size=beam_size, max_length=max_length)
      np.testing.assert_array_equal(seqs[row, 0], want_seqs[0])
      np.testing.assert_array_equal(seqs[row], want_seqs)
      np.testing.assert_allclose(scores[row], want_scores, rtol=1e-5, atol=1e-5)
      # The returned scores are those of the returned sequences.
      score_of = {seq: score for seq, score, _ in everything}
      for seq, score in zip(seqs[row], scores[row]):
        hits = np.flatnonzero(seq == EOS)
        length = hits[0] + 1 if hits.size else max_length
        if score > -np.inf:
          np.testing.assert_allclose(score, score_of[tuple(seq[:length])], rtol=1e-5, atol=1e-5)
    assert_padded_after_eos(seqs, PAD)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("seed0", 0, 0.6),
    ("seed1", 1, 1.0),
    ("seed2", 2, 0.0),
  )
  def test_pruning_beam_matches_reference_beam_search(self, seed, length_penalty):
    beam_size, max_length = 3, 6
    model = HistoryModel(seed, batch=3, vocab=7, max_length=max_length)
    seqs, scores = self._decode(
      model, beam_size=beam_size, max_length=max_length, length_penalty=length_penalty
    )
    sensitive = False
    for row in range(model.batch):
      kwargs = dict(beam_size=beam_size, max_length=max_length, length_penalty=length_penalty)
      want = reference_beam_search(model, row, **kwargs)
      want_seqs, want_scores = to_arrays(want, beam_size=beam_size, max_length=max_length)
      np.testing.assert_array_equal(seqs[row], want_seqs)
      np.testing.assert_allclose(scores[row], want_scores, rtol=1e-5, atol=1e-5)
      unordered = reference_beam_search(model, row, reorder_cache=False, **kwargs)
      sensitive |= (
        to_arrays(unordered, beam_size=beam_size, max_length=max_length)[0].tolist() != want_seqs.tolist()
      )
    # Otherwise this case could not tell a missing cache reorder from a correct one.
    self.assertTrue(sensitive)
    assert_padded_after_eos(seqs, PAD)

  def test_logits_depend_on_cache_history(self):
    # Same fed token and step, different histories: different logits. This is
    # what makes the comparisons above sensitive to the cache reordering.
    model = HistoryModel(0, batch=1, vocab=5, max_length=3)
    cache = jax.tree.map(lambda x: jnp.repeat(x, 2, axis=0), model.initial_cache())
    _, cache = model.step_fn(jnp.asarray([BOS, BOS]), cache, jnp.int32(0))
    _, cache = model.step_fn(jnp.asarray([3, 4]), cache, jnp.int32(1))
    logits, _ = model.step_fn(jnp.asarray([3, 3]), cache, jnp.int32(2))
    self.assertGreater(float(jnp.abs(logits[0] - logits[1]).max()), 1e-3)

  @chex.variants(with_jit=True, without_jit=True)
  def test_beam_size_one_matches_greedy_on_a_confident_model(self):
    # With one beam the alive hypothesis follows the greedy path, but the
    # finished set can still prefer an earlier EOS, so the two agree only when
    # the model is confident. Row 3 can never emit EOS: both return the
    # unfinished greedy path.
    batch, max_length = 4, 8
    model = HistoryModel(
      3, batch=batch, vocab=7, max_length=max_length, sharpness=20.0, eos_bias=1.5, masked_rows={3: (EOS,)}
    )
    greedy = reference_greedy(model, max_length=max_length)
    self.assertTrue((greedy[:3] == EOS).any(axis=1).all())  # the test's premise
    self.assertFalse((greedy[3] == EOS).any())
    seqs, scores = self._decode(model, beam_size=1, max_length=max_length)
    np.testing.assert_array_equal(seqs[:, 0], greedy)
    np.testing.assert_array_equal(
      np.asarray(
        greedy_decode(
          model.step_fn,
          model.initial_cache(),
          batch_size=batch,
          max_length=max_length,
          bos_id=BOS,
          eos_id=EOS,
        )
      ),
      greedy,
    )
    self.assertTrue(np.isfinite(scores).all())

  @chex.variants(with_jit=True, without_jit=True)
  def test_pads_after_eos_with_nonzero_pad_id(self):
    pad_id, max_length = PAD + 6, 5  # the model never emits 6
    model = HistoryModel(8, batch=2, vocab=7, max_length=max_length, eos_bias=1.0, masked_ids=(6,))
    seqs, _ = self._decode(model, beam_size=4, max_length=max_length, pad_id=pad_id)
    self.assertTrue((seqs == EOS).any())
    assert_padded_after_eos(seqs, pad_id)
    # Before the EOS (or everywhere, unfinished) no position is padding.
    for seq in seqs.reshape(-1, max_length):
      hits = np.flatnonzero(seq == EOS)
      end = hits[0] if hits.size else max_length
      self.assertFalse((seq[:end] == pad_id).any())


# --------------------------------------------------------------------------
# Argument checks.


def _bigram_step(tokens_B, cache, step):
  del step
  return jax.nn.one_hot(tokens_B, 5), cache


@pytest.mark.parametrize(
  "name, kwargs",
  [
    ("beam_size", dict(beam_size=0)),
    ("max_length", dict(max_length=0)),
    ("batch_size", dict(batch_size=0)),
    ("eos_id", dict(eos_id=-1)),
    ("eos_id", dict(eos_id=5)),  # outside the vocabulary of the step function
    ("initial_cache", dict(batch_size=3)),  # cache is for 2 rows
  ],
)
def test_beam_search_rejects_bad_arguments(name, kwargs):
  args = dict(batch_size=2, beam_size=2, max_length=3, bos_id=BOS, eos_id=EOS) | kwargs
  with pytest.raises(ValueError, match=name):
    beam_search(_bigram_step, {"x": jnp.zeros((2, 1))}, **args)


@pytest.mark.parametrize(
  "name, kwargs",
  [
    ("max_length", dict(max_length=0)),
    ("batch_size", dict(batch_size=0)),
    ("pad_id", dict(pad_id=-1)),
    ("initial_cache", dict(batch_size=3)),
  ],
)
def test_greedy_decode_rejects_bad_arguments(name, kwargs):
  args = dict(batch_size=2, max_length=3, bos_id=BOS, eos_id=EOS) | kwargs
  with pytest.raises(ValueError, match=name):
    greedy_decode(_bigram_step, {"x": jnp.zeros((2, 1))}, **args)


def test_step_fn_contract_is_checked():
  def wrong_logits(tokens_B, cache, step):
    return jnp.zeros((tokens_B.shape[0] + 1, 5)), cache

  def wrong_cache(tokens_B, cache, step):
    return jnp.zeros((tokens_B.shape[0], 5)), {"x": cache["x"].astype(jnp.int32)}

  args = dict(batch_size=2, max_length=3, bos_id=BOS, eos_id=EOS)
  cache = {"x": jnp.zeros((2, 1))}
  with pytest.raises(ValueError, match="logits"):
    greedy_decode(wrong_logits, cache, **args)
  with pytest.raises(ValueError, match="cache leaf"):
    beam_search(wrong_cache, cache, beam_size=2, **args)
