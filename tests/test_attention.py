"""Tests for attention masks, multi-head attention, position tables and KV-cache decoding.

The references are deliberately slow and obvious: a per-batch, per-head NumPy
loop for attention (using the module's own projection weights), Python `math`
for the sinusoidal table, and teacher-forced `Transformer.decode` for the
one-token-at-a-time `decode_step` path.
"""

from __future__ import annotations

import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tmoe_jax.attention import MultiHeadAttention, causal_mask, padding_mask
from tmoe_jax.embeddings import PositionEmbedding, sinusoidal_positions
from tmoe_jax.models.transformer import PAD_ID, Transformer, TransformerConfig

# ---------------------------------------------------------------------------
# Masks.


def test_padding_mask_hand_example():
  """Query i may attend key j iff both are real tokens; shape [B, 1, Q, K]."""
  query_valid = jnp.array([[True, True, False]])
  key_valid = jnp.array([[True, False]])
  mask = padding_mask(query_valid, key_valid)
  chex.assert_shape(mask, (1, 1, 3, 2))
  assert mask.dtype == jnp.bool_
  expected = np.array([[[[True, False], [True, False], [False, False]]]])
  np.testing.assert_array_equal(np.asarray(mask), expected)


def test_padding_mask_is_per_example():
  """Each batch row uses its own validity, not another row's."""
  valid = jnp.array([[True, False], [False, True]])
  mask = np.asarray(padding_mask(valid, valid))[:, 0]
  np.testing.assert_array_equal(mask[0], [[True, False], [False, False]])
  np.testing.assert_array_equal(mask[1], [[False, False], [False, True]])


def test_causal_mask_hand_example():
  """Position i may attend exactly the positions j <= i (lower triangle incl. diagonal)."""
  mask = causal_mask(3)
  chex.assert_shape(mask, (1, 1, 3, 3))
  expected = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=bool)
  np.testing.assert_array_equal(np.asarray(mask)[0, 0], expected)


# ---------------------------------------------------------------------------
# MultiHeadAttention against a NumPy reference.


def _weights(linear):
  return np.asarray(linear.kernel[...], np.float64), np.asarray(linear.bias[...], np.float64)


def reference_attention(attn, query_BxQxD, memory_BxKxD, mask_BxQxK):
  """Slow per-example, per-head scaled dot-product attention in float64 NumPy.

  Rows whose keys are all masked are left as NaN: callers compare only
  queries that can attend something.
  """
  wq, bq = _weights(attn.query)
  wk, bk = _weights(attn.key)
  wv, bv = _weights(attn.value)
  wo, bo = _weights(attn.output)
  query = np.asarray(query_BxQxD, np.float64)
  memory = np.asarray(memory_BxKxD, np.float64)
  batch, num_queries, d_model = query.shape
  num_heads = attn.num_heads
  head = d_model // num_heads
  out = np.full((batch, num_queries, d_model), np.nan)
  for b in range(batch):
    q = query[b] @ wq + bq
    k = memory[b] @ wk + bk
    v = memory[b] @ wv + bv
    context = np.zeros((num_queries, d_model))
    for h in range(num_heads):
      cols = slice(h * head, (h + 1) * head)
      for i in range(num_queries):
        allowed = [j for j in range(memory.shape[1]) if mask_BxQxK[b, i, j]]
        if not allowed:
          context[i] = np.nan
          continue
        scores = np.array([q[i, cols] @ k[j, cols] / math.sqrt(head) for j in allowed])
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        context[i, cols] = sum(w * v[j, cols] for w, j in zip(weights, allowed))
    out[b] = context @ wo + bo
  return out


def _random_attention(seed=0, d_model=8, num_heads=2):
  attn = MultiHeadAttention(d_model, num_heads, rngs=nnx.Rngs(seed))
  # Nonzero biases so the reference also checks that the biases are applied.
  rng = np.random.default_rng(seed)
  for linear in (attn.query, attn.key, attn.value, attn.output):
    linear.bias[...] = jnp.asarray(rng.normal(size=(d_model,)) * 0.3, jnp.float32)
  return attn


def test_multi_head_attention_matches_reference_with_padding_mask():
  """Self-attention with padding equals the per-head NumPy reference on every real query."""
  attn = _random_attention()
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  valid = jnp.array([[True, True, True, False, False], [True, True, True, True, True]])
  mask = padding_mask(valid, valid)
  out = attn(x, x, mask)
  chex.assert_shape(out, (2, 5, 8))
  expected = reference_attention(attn, x, x, np.asarray(mask)[:, 0])
  valid_np = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(out)[valid_np], expected[valid_np], rtol=1e-5, atol=1e-5)


def test_multi_head_attention_matches_reference_with_causal_and_cross_masks():
  """Causal self-attention and cross-attention (Q != K) both equal the reference."""
  attn = _random_attention(seed=2, d_model=12, num_heads=3)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 4, 12)), jnp.float32)
  memory = jnp.asarray(rng.normal(size=(2, 6, 12)), jnp.float32)
  valid = jnp.array([[True, True, True, False], [True, True, True, True]])
  self_mask = padding_mask(valid, valid) & causal_mask(4)
  out = attn(x, x, self_mask)
  expected = reference_attention(attn, x, x, np.asarray(self_mask)[:, 0])
  valid_np = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(out)[valid_np], expected[valid_np], rtol=1e-5, atol=1e-5)

  memory_valid = jnp.array([[True] * 6, [True, True, False, False, False, False]])
  cross_mask = padding_mask(valid, memory_valid)
  out = attn(x, memory, cross_mask)
  expected = reference_attention(attn, x, memory, np.asarray(cross_mask)[:, 0])
  np.testing.assert_allclose(np.asarray(out)[valid_np], expected[valid_np], rtol=1e-5, atol=1e-5)


def test_multi_head_attention_without_mask_attends_everything():
  """mask=None is full attention: the same as an all-True mask in the reference."""
  attn = _random_attention(seed=4)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 3, 8)), jnp.float32)
  expected = reference_attention(attn, x, x, np.ones((1, 3, 3), bool))
  np.testing.assert_allclose(np.asarray(attn(x, x)), expected, rtol=1e-5, atol=1e-5)


def test_padded_keys_have_no_influence():
  """Changing the vectors at padded positions leaves every real query's output unchanged."""
  attn = _random_attention(seed=6)
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  valid = jnp.array([[True, True, False, True, False], [True, True, True, True, False]])
  mask = padding_mask(valid, valid)
  changed = x.at[:, 4].set(100.0 * jnp.asarray(rng.normal(size=(2, 8)), jnp.float32))
  changed = changed.at[0, 2].set(-50.0)
  out, out_changed = attn(x, x, mask), attn(changed, changed, mask)
  valid_np = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(out_changed)[valid_np], np.asarray(out)[valid_np], rtol=0, atol=1e-6)


def test_future_keys_have_no_influence_under_causal_mask():
  """With a causal mask, output i does not depend on inputs at positions > i."""
  attn = _random_attention(seed=8)
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.normal(size=(1, 5, 8)), jnp.float32)
  out = np.asarray(attn(x, x, causal_mask(5)))
  for i in range(4):
    changed = x.at[:, i + 1 :].set(jnp.asarray(rng.normal(size=(1, 4 - i, 8)), jnp.float32) * 10)
    out_changed = np.asarray(attn(changed, changed, causal_mask(5)))
    np.testing.assert_allclose(out_changed[:, : i + 1], out[:, : i + 1], rtol=0, atol=1e-6)
    assert not np.allclose(out_changed[:, i + 1 :], out[:, i + 1 :])


def test_attention_decode_step_matches_causal_attention():
  """MultiHeadAttention.decode_step over its cache equals full causal self-attention row by row."""
  attn = _random_attention(seed=10)
  x = jnp.asarray(np.random.default_rng(11).normal(size=(2, 4, 8)), jnp.float32)
  full = np.asarray(attn(x, x, causal_mask(4)))
  cache = attn.empty_cache(2, 6, jnp.float32)
  for step in range(4):
    out, cache = attn.decode_step(x[:, step : step + 1], cache, jnp.int32(step))
    chex.assert_shape(out, (2, 1, 8))
    np.testing.assert_allclose(np.asarray(out)[:, 0], full[:, step], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Sinusoidal positions.


@pytest.mark.parametrize("length,d_model", [(7, 6), (5, 7), (3, 2)])
def test_sinusoidal_positions_match_paper_formula(length, d_model):
  """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)), odd d too."""
  table = sinusoidal_positions(length, d_model)
  assert table.dtype == np.float32
  chex.assert_shape(table, (length, d_model))
  expected = np.zeros((length, d_model))
  for pos in range(length):
    for dim in range(d_model):
      i = dim // 2
      angle = pos / 10000 ** (2 * i / d_model)
      expected[pos, dim] = math.sin(angle) if dim % 2 == 0 else math.cos(angle)
  np.testing.assert_allclose(table, expected, rtol=1e-6, atol=1e-6)


def test_position_embedding_offset_adds_later_rows():
  """Adding positions with offset o adds rows o..o+L-1 of the table, for both kinds."""
  x = jnp.zeros((1, 2, 6), jnp.float32)
  sinusoidal = PositionEmbedding("sinusoidal", 8, 6, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(sinusoidal(x, 3))[0], sinusoidal_positions(8, 6)[3:5], atol=1e-7)
  learned = PositionEmbedding("learned", 8, 6, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(learned(x, 5))[0], np.asarray(learned.table[...])[5:7], atol=1e-7)


# ---------------------------------------------------------------------------
# Full Transformer: causality and KV-cache decoding.

VOCAB = 13


def _tiny_transformer(position_embedding="sinusoidal", share_embeddings=True, seed=0):
  """A 2+2 layer model whose decoder has a dense and an MoE block.

  eval_capacity_factor = num_experts / top_k makes the capacity equal to the
  number of tokens, so no assignment is ever dropped in teacher forcing or in
  one-token decoding steps, and the two paths compute the same function.
  """
  config = TransformerConfig.from_flat(
    vocab_size=VOCAB,
    d_model=16,
    num_heads=2,
    num_layers=2,
    num_decoder_layers=2,
    d_ff=24,
    dropout_rate=0.0,
    share_embeddings=share_embeddings,
    position_embedding=position_embedding,
    max_length=8,
    num_experts=4,
    top_k=2,
    moe_every=2,
    eval_capacity_factor=2.0,
  )
  assert config.is_moe_layer(1) and not config.is_moe_layer(0)
  return Transformer(config, rngs=nnx.Rngs(seed))


SOURCE = np.array([[3, 4, 5, 6, 7, 8], [9, 10, 11, 0, 0, 0]], np.int32)
TARGET_INPUT = np.array([[1, 5, 7, 2, 4, 9], [1, 6, 3, 11, 0, 0]], np.int32)


@nnx.jit
def _encode(model, source):
  return model.encode(source)[0]


@nnx.jit
def _teacher_forced(model, source, target_input):
  """Encoder output, teacher-forced logits and a fresh decode cache, in one compiled call."""
  encoded, _ = model.encode(source)
  logits, _ = model.decode(target_input, encoded, source)
  return logits, model.init_decode_cache(encoded, source, max_length=8)


@nnx.jit
def _decode_step(model, tokens, cache, step):
  return model.decode_step(tokens, cache, step)


def test_decoder_logits_do_not_depend_on_future_target_tokens():
  """Teacher-forced decode logits at position i are unchanged when target tokens > i change."""
  model = _tiny_transformer()
  source = jnp.asarray(SOURCE)
  logits, _ = _teacher_forced(model, source, jnp.asarray(TARGET_INPUT))
  logits = np.asarray(logits)
  chex.assert_shape(logits, (2, 6, VOCAB))
  rng = np.random.default_rng(0)
  for i in (0, 2, 4):
    changed = TARGET_INPUT.copy()
    # Real tokens stay real (ids >= 1) so the padding pattern is unchanged.
    changed[:, i + 1 :] = rng.integers(1, VOCAB, size=changed[:, i + 1 :].shape)
    changed[TARGET_INPUT == PAD_ID] = PAD_ID
    changed_logits, _ = _teacher_forced(model, source, jnp.asarray(changed))
    changed_logits = np.asarray(changed_logits)
    np.testing.assert_allclose(changed_logits[:, : i + 1], logits[:, : i + 1], rtol=1e-5, atol=1e-5)
    # Sanity check that the change was visible at all: some later real position moved.
    later_real = (TARGET_INPUT != PAD_ID)[:, i + 1 :]
    assert not np.allclose(changed_logits[:, i + 1 :][later_real], logits[:, i + 1 :][later_real])


def test_encoder_output_ignores_padded_source_positions():
  """Real source positions' encodings do not depend on the vectors under padding."""
  model = _tiny_transformer()
  source = jnp.asarray(SOURCE)
  encoded = _encode(model, source)
  # Ids cannot put a different vector under PAD, so perturb the embedding row of
  # id 0: only padded positions read it.
  model.source_embedding.embedding[...] = model.source_embedding.embedding[...].at[PAD_ID].add(3.0)
  encoded_changed = _encode(model, source)
  valid = SOURCE != PAD_ID
  np.testing.assert_allclose(
    np.asarray(encoded_changed)[valid], np.asarray(encoded)[valid], rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize("position_embedding", ["sinusoidal", "learned"])
@pytest.mark.parametrize("share_embeddings", [True, False])
def test_decode_step_with_cache_matches_teacher_forcing(position_embedding, share_embeddings):
  """init_decode_cache + decode_step reproduce teacher-forced decode logits at each real position.

  Row 0 is full length; row 1 has source and target padding, so the cached
  cross-attention must apply the source mask and the self-attention cache
  must only expose positions <= step.
  """
  model = _tiny_transformer(position_embedding, share_embeddings)
  source = jnp.asarray(SOURCE)
  target = jnp.asarray(TARGET_INPUT)
  teacher_forced, cache = _teacher_forced(model, source, target)
  teacher_forced = np.asarray(teacher_forced)
  for step in range(TARGET_INPUT.shape[1]):
    logits, cache = _decode_step(model, target[:, step], cache, jnp.int32(step))
    chex.assert_shape(logits, (2, VOCAB))
    assert logits.dtype == jnp.float32
    real = TARGET_INPUT[:, step] != PAD_ID
    np.testing.assert_allclose(np.asarray(logits)[real], teacher_forced[real, step], rtol=1e-4, atol=1e-4)


def test_init_decode_cache_rejects_length_beyond_max_length():
  """A cache longer than model.max_length would index past the position table."""
  model = _tiny_transformer()
  source = jnp.asarray(SOURCE)
  encoded = _encode(model, source)
  with pytest.raises(ValueError, match="max_length"):
    model.init_decode_cache(encoded, source, max_length=9)
