"""The decoder-only MoE LM (`models.causal_lm`), rotary attention and generation, against slow references."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tmoe_jax.attention import MultiHeadAttention
from tmoe_jax.errors import ConfigError
from tmoe_jax.generation import Sampling, choose_next, generate, left_pad, restrict_logits
from tmoe_jax.models.causal_lm import CausalLM, CausalLMConfig, positions_of
from tmoe_jax.rotary import apply_rotary

SMALL = dict(vocab_size=40, d_model=32, num_heads=4, num_kv_heads=2, num_layers=2, d_ff=16, max_length=64)


# Room for every token at every expert (nothing dropped) and a faster compile on CPU than dropless
# dispatch, which `MODEL_VARIANTS["moe_dropless"]` covers.
NO_DROPS = {"dispatch": "capacity", "capacity_factor": 4.0, "eval_capacity_factor": 4.0}


def small_model(**changes) -> CausalLM:
  config = CausalLMConfig.from_flat(**{**SMALL, "num_experts": 4, "top_k": 2, **NO_DROPS, **changes})
  return CausalLM(config, rngs=nnx.Rngs(0))


@nnx.jit
def forward(model, tokens_BxL, token_mask_BxL=None):
  return model(tokens_BxL, token_mask_BxL)[0]


@nnx.jit(static_argnums=3)
def prefill(model, tokens_BxP, mask_BxP, max_length):
  return model.prefill(tokens_BxP, mask_BxP, max_length)


@nnx.jit
def decode_step(model, tokens_Bx1, caches, slot, positions_Bx1, key_mask_BxS):
  return model.decode_step(tokens_Bx1, caches, slot, positions_Bx1, key_mask_BxS)


def tokens(batch: int, length: int, seed: int = 1) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (batch, length), 1, SMALL["vocab_size"])


def test_rotary_matches_complex_rotation_and_keeps_scores_relative():
  x = np.asarray(jax.random.normal(jax.random.key(0), (1, 5, 2, 8)))
  positions = np.array([[0, 1, 2, 7, 30]])
  rotated = np.asarray(apply_rotary(jnp.asarray(x), jnp.asarray(positions), 100.0))
  # Reference: pair (x_i, x_{i+4}) is the complex number x_i + i x_{i+4}, turned by p * 100^(-2i/8).
  angles = positions[0][:, None] * 100.0 ** (-np.arange(0, 8, 2) / 8)
  turned = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * angles)[None, :, None, :]
  np.testing.assert_allclose(rotated, np.concatenate([turned.real, turned.imag], -1), atol=1e-5)
  # A query/key score depends on the two positions only through their difference.
  q, k = jnp.asarray(x[:, :1]), jnp.asarray(x[:, 1:2])

  def score(p, r):
    return jnp.sum(apply_rotary(q, jnp.array([[p]]), 100.0) * apply_rotary(k, jnp.array([[r]]), 100.0))

  np.testing.assert_allclose(score(3, 1), score(13, 11), rtol=1e-5)


def reference_attention(attention: MultiHeadAttention, x_BxLxD: np.ndarray, positions_BxL) -> np.ndarray:
  """Grouped-query causal attention the slow way: each query head with its key/value head repeated."""
  q = attention._heads(attention.query(x_BxLxD), "query_norm", attention.num_heads, positions_BxL)
  kv = attention.project_key_value(x_BxLxD, positions_BxL)
  group = attention.num_heads // attention.num_kv_heads
  keys, values = (np.repeat(np.asarray(a), group, axis=2) for a in (kv.key_BxKxHxDh, kv.value_BxKxHxDh))
  q = np.asarray(q) / np.sqrt(attention.head_size)
  length = x_BxLxD.shape[1]
  out = np.zeros(q.shape, np.float32)
  for b in range(q.shape[0]):
    for h in range(q.shape[2]):
      for i in range(length):
        scores = keys[b, : i + 1, h] @ q[b, i, h]
        weights = np.exp(scores - scores.max())
        out[b, i, h] = (weights / weights.sum()) @ values[b, : i + 1, h]
  return np.asarray(attention.output(jnp.asarray(out.reshape(*x_BxLxD.shape[:2], -1))))


@pytest.mark.parametrize("qk_norm", ["none", "heads", "projection"])
def test_grouped_query_attention_matches_repeated_heads(qk_norm):
  attention = MultiHeadAttention(
    32,
    4,
    num_kv_heads=2,
    head_size=12,
    rotary_base=10000.0,
    qk_norm=qk_norm,
    qkv_bias=False,
    rngs=nnx.Rngs(0),
  )
  chex.assert_shape(attention.key.kernel[...], (32, 24))  # two key heads of 12
  x = jax.random.normal(jax.random.key(1), (2, 6, 32))
  positions = jnp.broadcast_to(jnp.arange(6)[None], (2, 6))
  mask = jnp.tril(jnp.ones((6, 6), bool))[None, None]
  np.testing.assert_allclose(
    attention(x, x, mask, positions_BxQ=positions), reference_attention(attention, x, positions), atol=1e-5
  )


MODEL_VARIANTS = {
  "moe_gqa_head_norm": dict(qk_norm="heads"),
  "moe_dropless": dict(dispatch="dropless"),
  "moe_shared_gated": dict(
    qk_norm="projection", num_shared_experts=1, shared_expert_type="gated", shared_expert_gate=True
  ),
  "moe_capacity_bias": dict(capacity_factor=1.0, expert_bias_rate=0.01, qkv_bias=True, tie_embeddings=True),
  "dense": dict(ffn="dense"),
  "smoe": dict(ffn="smoe"),
}


@pytest.mark.parametrize("variant", sorted(MODEL_VARIANTS))
def test_cached_decoding_equals_full_recomputation(variant):
  model = small_model(**MODEL_VARIANTS[variant])
  sequence = tokens(2, 9)
  full = forward(model, sequence)
  chex.assert_shape(full, (2, 9, SMALL["vocab_size"]))
  prompt_length = 4
  last, caches = prefill(model, sequence[:, :prompt_length], jnp.ones((2, prompt_length), bool), 9)
  steps = [last]
  for slot in range(prompt_length, 8):
    logits, caches = decode_step(
      model, sequence[:, slot : slot + 1], caches, slot, jnp.full((2, 1), slot), jnp.ones((2, 9), bool)
    )
    steps.append(logits)
  np.testing.assert_allclose(jnp.stack(steps, 1), full[:, prompt_length - 1 : 8], atol=2e-5)


def test_a_left_padded_row_computes_as_it_would_alone():
  model = small_model(num_shared_experts=1, shared_expert_type="gated", shared_expert_gate=True)
  batch = tokens(2, 8)
  mask = jnp.ones((2, 8), bool).at[1, :3].set(False)
  np.testing.assert_array_equal(positions_of(mask)[1], [0, 0, 0, 0, 1, 2, 3, 4])
  padded = forward(model, batch, mask)
  alone = forward(model, batch[1:, 3:])
  np.testing.assert_allclose(padded[1, 3:], alone[0], atol=2e-5)


def naive_greedy(model, prompt: list[int], steps: int) -> list[int]:
  """Full recomputation per token. The sequence is right-padded to one length (one compile): a causal
  model's logits at a position do not see the positions after it."""
  sequence = np.ones(len(prompt) + steps, np.int32)
  sequence[: len(prompt)] = prompt
  for position in range(len(prompt), len(sequence)):
    logits = forward(model, jnp.asarray(sequence[None]))
    sequence[position] = int(jnp.argmax(logits[0, position - 1]))
  return sequence[len(prompt) :].tolist()


def test_greedy_generation_of_a_ragged_batch_equals_one_prompt_at_a_time():
  model = small_model(qk_norm="heads")
  prompts = [[5, 6, 7, 8, 9], [11, 12]]
  tokens_BxP, mask = left_pad(prompts, pad_id=0)
  np.testing.assert_array_equal(tokens_BxP[1], [0, 0, 0, 11, 12])
  new = generate(model, tokens_BxP, mask, max_new_tokens=6)
  chex.assert_shape(new, (2, 6))
  for prompt, row in zip(prompts, new, strict=True):
    assert row.tolist() == naive_greedy(model, prompt, 6)


def test_generation_pads_after_eos():
  model = small_model()
  tokens_BxP, mask = left_pad([[5, 6, 7]], pad_id=0)
  free = generate(model, tokens_BxP, mask, max_new_tokens=6)[0].tolist()
  eos = free[2]  # the third token generated: stop there
  stopped = generate(model, tokens_BxP, mask, max_new_tokens=6, eos_id=eos, pad_id=39)[0].tolist()
  first = free.index(eos)
  assert stopped == free[: first + 1] + [39] * (5 - first)


def test_restrict_logits_keeps_the_top_k_and_the_smallest_top_p_set():
  logits = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))
  kept = np.isfinite(np.asarray(restrict_logits(logits, top_k=2, top_p=1.0)))[0]
  np.testing.assert_array_equal(kept, [False, True, False, True, False])
  # Sorted: 0.4, 0.3, 0.15, ... -> 0.4 + 0.3 = 0.7 < 0.8, so 0.15 is needed to reach 0.8.
  kept = np.isfinite(np.asarray(restrict_logits(logits, top_k=0, top_p=0.8)))[0]
  np.testing.assert_array_equal(kept, [False, True, False, True, True])
  kept = np.isfinite(np.asarray(restrict_logits(logits, top_k=0, top_p=0.1)))[0]
  np.testing.assert_array_equal(kept, [False, True, False, False, False])  # the best always stays


def test_sampling_draws_from_the_tempered_restricted_softmax():
  logits = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))
  sampling = Sampling(temperature=2.0, top_k=3)
  keys = jax.random.split(jax.random.key(0), 20000)
  draws = np.asarray(jax.vmap(lambda key: choose_next(logits, key, sampling)[0])(keys))
  frequencies = np.bincount(draws, minlength=5) / len(draws)
  tempered = np.array([0.4, 0.3, 0.15]) ** 0.5
  expected = np.zeros(5)
  expected[[1, 3, 4]] = tempered / tempered.sum()
  np.testing.assert_allclose(frequencies, expected, atol=0.015)


@pytest.mark.parametrize(
  "changes,message",
  [
    ({"num_kv_heads": 3}, "model.num_kv_heads: must divide num_heads=4"),
    ({"qk_norm": "layer"}, "model.qk_norm"),
    ({"router": "expert_choice", "dispatch": "capacity"}, "model.router: expert_choice is not causal"),
    ({"head_size": 7}, "model.head_size: rotary positions need an even head size"),
    ({"router_dtype": "half"}, "model.router_dtype: must be one of"),
  ],
)
def test_bad_settings_are_named(changes, message):
  with pytest.raises(ConfigError, match=message):
    CausalLMConfig.from_flat(**{**SMALL, **changes})


def test_bad_sampling_and_lengths_are_refused():
  with pytest.raises(ValueError, match="top_p"):
    Sampling(temperature=1.0, top_p=0.0)
  model = small_model()
  tokens_BxP, mask = left_pad([[1, 2, 3]], pad_id=0)
  with pytest.raises(ValueError, match="exceeds the model's max_length 64"):
    generate(model, tokens_BxP, mask, max_new_tokens=62)


def test_a_bfloat16_model_may_route_in_its_own_dtype():
  """router_dtype "model" (Hugging Face checkpoints) runs the router matmul in bfloat16; the default
  keeps it float32. Both give finite float32 logits, and they differ only by that rounding."""
  sequence = tokens(2, 6)
  outputs = {
    router_dtype: forward(small_model(dtype=jnp.bfloat16, router_dtype=router_dtype), sequence)
    for router_dtype in ("float32", "model")
  }
  for logits in outputs.values():
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  np.testing.assert_allclose(outputs["model"], outputs["float32"], atol=0.1)
