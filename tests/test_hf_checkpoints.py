"""Hugging Face MoE checkpoints against what `transformers` computed for them.

The fixtures (`tests/fixtures/hf_moe/`, made by its `make_fixtures.py` with transformers 5.25
and CPU torch; the suite needs neither) are tiny random Mixtral, Qwen2-MoE, Qwen3-MoE and
OLMoE checkpoints, Mixtral also in the fused expert layout, with transformers' logits, router
probabilities and greedy continuations. This library must reproduce them: float32 logits within
1e-4, every layer's top-k experts, 32 greedy tokens, left-padded batched prompts, on one device
and with the experts split over 8.

Most checks route with full expert capacity (nothing can be dropped, the same sums as dropless
dispatch and a faster compile on CPU); `test_dropless_default_matches` covers the default.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tmoe_jax.attention import causal_mask
from tmoe_jax.errors import CheckpointFormatError
from tmoe_jax.hf import from_hf, save_hf
from tmoe_jax.hf.checkpoint_directory import model_parameters, read_tensors
from tmoe_jax.parallel.mesh import make_mesh

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf_moe"
FAMILY_DIRECTORIES = ("mixtral", "mixtral_fused", "qwen2_moe", "qwen3_moe", "olmoe")
# Capacity for every token at every expert: no token can be dropped.
NO_DROPS = {"dispatch": "capacity", "capacity_factor": 8.0, "eval_capacity_factor": 8.0}

_imported = {}


def imported(name: str):
  if name not in _imported:
    _imported[name] = from_hf(FIXTURES / name, **NO_DROPS)
  return _imported[name]


def expected(name: str):
  return np.load(FIXTURES / name / "expected.npz")


@nnx.jit
def forward_logits(model, tokens_BxL):
  return model(tokens_BxL)[0]


@pytest.mark.parametrize("name", FAMILY_DIRECTORIES)
def test_logits_match_transformers(name):
  reference = expected(name)
  logits = forward_logits(imported(name).model, jnp.asarray(reference["input_ids"]))
  chex.assert_shape(logits, reference["logits"].shape)
  np.testing.assert_allclose(np.asarray(logits), reference["logits"], atol=1e-4, rtol=0)


def router_probabilities_by_layer(model, tokens_BxL) -> list[np.ndarray]:
  """Each layer's router softmax [B*L, E], from an explicit pass through the blocks' parts (a reference
  for the block's wiring: its final logits must equal the model's)."""
  x = model.embedding(tokens_BxL)
  positions = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1])[None], tokens_BxL.shape)
  mask = causal_mask(tokens_BxL.shape[1])
  probabilities = []
  for layer in model.layers:
    normed = layer.attention_norm(x)
    x = x + layer.attention(normed, normed, mask, positions_BxQ=positions)
    ffn_input = layer.ffn_norm(x)
    logits = ffn_input.reshape(-1, ffn_input.shape[-1]) @ layer.ffn.router.kernel[...]
    probabilities.append(np.asarray(jax.nn.softmax(logits, axis=-1)))
    x = x + layer.ffn(ffn_input)[0]
  np.testing.assert_allclose(model.logits(x), model(tokens_BxL)[0], atol=1e-5)
  return probabilities


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_every_layer_routes_each_token_to_the_same_experts(name):
  reference = expected(name)
  hf = imported(name)
  probabilities = router_probabilities_by_layer(hf.model, jnp.asarray(reference["input_ids"]))
  assert len(probabilities) == reference["router_top_k"].shape[0]
  top_k = hf.config.moe.top_k
  for layer, probabilities_TxE in enumerate(probabilities):
    np.testing.assert_allclose(probabilities_TxE, reference["router_probabilities"][layer], atol=1e-5)
    chosen = np.argsort(-probabilities_TxE, axis=-1, kind="stable")[:, :top_k]
    np.testing.assert_array_equal(chosen, reference["router_top_k"][layer], err_msg=f"layer {layer}")


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_greedy_continuations_match_transformers(name):
  reference = expected(name)
  hf = imported(name)
  (continuation,) = hf.generate([reference["greedy_prompt"][0].tolist()], 32, stop_at_eos=False)
  assert continuation == reference["greedy_tokens"].tolist()
  rows = [
    [int(token) for token, real in zip(prompt, mask, strict=True) if real]
    for prompt, mask in zip(reference["padded_prompts"], reference["padded_attention_mask"], strict=True)
  ]
  assert len(rows[0]) != len(rows[1])  # prompts of different lengths, left-padded together
  assert hf.generate(rows, 16, stop_at_eos=False) == reference["padded_greedy_tokens"].tolist()


def test_dropless_default_matches():
  """The import's default dispatch computes every assignment, as transformers does."""
  hf = from_hf(FIXTURES / "olmoe")
  assert hf.config.moe.dispatch == "dropless"
  reference = expected("olmoe")
  logits = forward_logits(hf.model, jnp.asarray(reference["input_ids"]))
  np.testing.assert_allclose(np.asarray(logits), reference["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_experts_split_over_eight_devices_reproduce_transformers(name):
  """Logits, every layer's top-k and 32 greedy tokens again, with one expert on each of 8 devices."""
  mesh = make_mesh(data=1, expert=8)
  hf = from_hf(FIXTURES / name, mesh=mesh, **NO_DROPS)  # routing groups of one sequence, as imported
  experts = hf.model.layers[0].ffn.experts.w_gate_ExDxF[...]
  assert len(experts.sharding.device_set) == 8
  assert experts.addressable_shards[0].data.shape[0] == 1  # one expert per device
  reference = expected(name)
  tokens = jnp.asarray(reference["input_ids"])
  np.testing.assert_allclose(
    np.asarray(forward_logits(hf.model, tokens)), reference["logits"], atol=1e-4, rtol=0
  )
  for layer, probabilities_TxE in enumerate(router_probabilities_by_layer(hf.model, tokens)):
    chosen = np.argsort(-probabilities_TxE, axis=-1, kind="stable")[:, : hf.config.moe.top_k]
    np.testing.assert_array_equal(chosen, reference["router_top_k"][layer], err_msg=f"layer {layer}")
  (continuation,) = hf.generate([reference["greedy_prompt"][0].tolist()], 32, stop_at_eos=False)
  assert continuation == reference["greedy_tokens"].tolist()


@pytest.mark.parametrize("name", ["mixtral", "mixtral_fused", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_export_then_import_is_bit_identical(name, tmp_path):
  hf = imported(name)
  out = save_hf(
    hf.model,
    tmp_path / "export",
    family=hf.family,
    special_ids=hf.special_ids,
    tokenizer_path=hf.tokenizer_path,
  )
  again = from_hf(out, **NO_DROPS)
  assert again.config == hf.config
  before, after = model_parameters(hf.model), model_parameters(again.model)
  assert before.keys() == after.keys()
  for path in before:
    np.testing.assert_array_equal(np.asarray(after[path]), np.asarray(before[path]), err_msg=str(path))
  # The export is the layout transformers writes: the per-expert fixture's tensors, bit for bit.
  original = read_tensors(FIXTURES / ("mixtral" if name == "mixtral_fused" else name))
  exported = read_tensors(out)
  assert exported.keys() == original.keys()
  for tensor_name, tensor in original.items():
    np.testing.assert_array_equal(np.asarray(exported[tensor_name]), np.asarray(tensor), err_msg=tensor_name)
  assert (out / "tokenizer.json").read_bytes() == (FIXTURES / name / "tokenizer.json").read_bytes()


def test_generate_decodes_text_with_the_checkpoint_tokenizer():
  hf = imported("qwen3_moe")
  prompt = "a dog runs"
  ids = hf.encode(prompt)
  assert ids[0] == hf.special_ids["bos"]  # the tokenizer's post-processor adds <s>
  (text,) = hf.generate([prompt], 8, stop_at_eos=False)
  (tokens,) = hf.generate([ids], 8, stop_at_eos=False)
  assert text == hf.tokenizer.decode(tokens)


def test_a_sharded_checkpoint_reads_as_the_single_file(tmp_path):
  from safetensors.flax import save_file

  directory = tmp_path / "sharded"
  directory.mkdir()
  for name in ("config.json", "tokenizer.json"):
    shutil.copy(FIXTURES / "qwen2_moe" / name, directory / name)
  tensors = read_tensors(FIXTURES / "qwen2_moe")
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for file_name, shard_names in shards.items():
    save_file({name: tensors[name] for name in shard_names}, str(directory / file_name))
  weight_map = {name: file_name for file_name, shard_names in shards.items() for name in shard_names}
  (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  sharded, single = model_parameters(from_hf(directory).model), model_parameters(imported("qwen2_moe").model)
  assert sharded.keys() == single.keys()
  for path in single:
    np.testing.assert_array_equal(np.asarray(sharded[path]), np.asarray(single[path]))


# --- bad checkpoints: one CheckpointFormatError naming the field or tensor --------------------------


def copy_fixture(tmp_path, name="qwen2_moe") -> pathlib.Path:
  directory = tmp_path / name
  shutil.copytree(FIXTURES / name, directory)
  return directory


def edit_config(directory: pathlib.Path, **changes) -> None:
  config = json.loads((directory / "config.json").read_text())
  config.update(changes)
  (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
  "changes,message",
  [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "model_type 'llama'"),
    ({"use_sliding_window": True}, "use_sliding_window=True: sliding-window attention"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"mlp_only_layers": [1]}, "mlp_only_layers"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"num_experts_per_tok": None}, "num_experts_per_tok is missing"),
  ],
)
def test_unsupported_or_incomplete_configs_are_named(tmp_path, changes, message):
  directory = copy_fixture(tmp_path)
  edit_config(directory, **changes)
  with pytest.raises(CheckpointFormatError, match=message):
    from_hf(directory)


def test_mixtral_sliding_window_is_refused(tmp_path):
  directory = copy_fixture(tmp_path, "mixtral")
  edit_config(directory, sliding_window=4096)
  with pytest.raises(CheckpointFormatError, match="sliding_window=4096"):
    from_hf(directory)


def rewrite_tensors(directory: pathlib.Path, edit) -> None:
  from safetensors.flax import save_file

  tensors = read_tensors(directory)
  edit(tensors)
  save_file(tensors, str(directory / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path):
  directory = copy_fixture(tmp_path)
  rewrite_tensors(directory, lambda tensors: tensors.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
  with pytest.raises(CheckpointFormatError, match=r"model.layers.1.mlp.experts.3.up_proj.weight is missing"):
    from_hf(directory)


def test_misshaped_tensor_is_named(tmp_path):
  directory = copy_fixture(tmp_path)

  def shrink(tensors):
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:8]

  rewrite_tensors(directory, shrink)
  with pytest.raises(CheckpointFormatError, match=r"layers.0.attention.key.kernel.*\(32, 8\).*\(32, 16\)"):
    from_hf(directory)


def test_unexpected_tensor_is_named(tmp_path):
  directory = copy_fixture(tmp_path)
  rewrite_tensors(
    directory, lambda tensors: tensors.update({"model.layers.0.mlp.extra.weight": jnp.zeros(3)})
  )
  with pytest.raises(CheckpointFormatError, match="unexpected tensors.*model.layers.0.mlp.extra.weight"):
    from_hf(directory)


def test_export_refuses_what_the_family_cannot_express_and_writes_nothing(tmp_path):
  hf = imported("olmoe")
  mixtral = imported("mixtral").family
  with pytest.raises(CheckpointFormatError, match="model.qk_norm"):
    save_hf(hf.model, tmp_path / "out", family=mixtral)
  assert not (tmp_path / "out").exists()
