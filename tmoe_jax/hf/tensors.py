"""Hugging Face tensor names <-> the parameters of `models.causal_lm.CausalLM`.

Shapes: V vocabulary, D d_model, E experts, F an expert's hidden width.

A torch `Linear` stores its weight [out, in] and an nnx kernel is [in, out], so every
projection is transposed. Experts come in two layouts, both read:
  per expert  `model.layers.{l}.{prefix}.experts.{e}.{gate|up|down}.weight`, [F, D], [F, D], [D, F]
              (the original Mixtral checkpoints and what transformers' save_pretrained writes);
  fused       `model.layers.{l}.mlp.experts.gate_up_proj` [E, 2F, D] (gate rows first) and
              `model.layers.{l}.mlp.experts.down_proj` [E, D, F] (transformers 5 in memory).
Writing uses the per-expert layout, which every transformers version loads.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

from tmoe_jax.errors import CheckpointFormatError
from tmoe_jax.hf.families import Family
from tmoe_jax.models.causal_lm import CausalLMConfig

Path = tuple[str | int, ...]
EXPERT_PARAMETERS = ("w_gate_ExDxF", "w_up_ExDxF", "w_down_ExFxD")
# Buffers some checkpoints carry that are recomputed, not loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def dense_tensor_names(config: CausalLMConfig, family: Family) -> dict[Path, tuple[str, bool]]:
  """Every parameter but the routed experts and routers: path -> (tensor name, transposed)."""
  names: dict[Path, tuple[str, bool]] = {
    ("embedding", "embedding"): ("model.embed_tokens.weight", False),
    ("final_norm", "scale"): ("model.norm.weight", False),
  }
  if not config.tie_embeddings:
    names["output", "kernel"] = ("lm_head.weight", True)
  for layer in range(config.num_layers):
    hf, ours = f"model.layers.{layer}", ("layers", layer)
    names[(*ours, "attention_norm", "scale")] = (f"{hf}.input_layernorm.weight", False)
    names[(*ours, "ffn_norm", "scale")] = (f"{hf}.post_attention_layernorm.weight", False)
    for projection, name in (("query", "q"), ("key", "k"), ("value", "v"), ("output", "o")):
      names[(*ours, "attention", projection, "kernel")] = (f"{hf}.self_attn.{name}_proj.weight", True)
      if config.qkv_bias and projection != "output":
        names[(*ours, "attention", projection, "bias")] = (f"{hf}.self_attn.{name}_proj.bias", False)
    if config.qk_norm != "none":
      names[(*ours, "attention", "query_norm", "scale")] = (f"{hf}.self_attn.q_norm.weight", False)
      names[(*ours, "attention", "key_norm", "scale")] = (f"{hf}.self_attn.k_norm.weight", False)
    if family.shared_expert:
      for projection, name in zip(("gate", "up", "down"), ("gate_proj", "up_proj", "down_proj"), strict=True):
        names[(*ours, "ffn", "shared_experts", projection, "kernel")] = (
          f"{hf}.mlp.shared_expert.{name}.weight",
          True,
        )
      names[(*ours, "ffn", "shared_expert_gate", "kernel")] = (f"{hf}.mlp.shared_expert_gate.weight", True)
  return names


def router_names(family: Family, layer: int) -> tuple[str, ...]:
  """Where a layer's router may be: beside per-expert tensors, or under `mlp` (the fused layout)."""
  return tuple(
    dict.fromkeys(
      (f"model.layers.{layer}.{family.expert_prefix}.gate.weight", f"model.layers.{layer}.mlp.gate.weight")
    )
  )


def per_expert_name(family: Family, layer: int, expert: int, projection: int) -> str:
  """projection 0, 1, 2: gate, up, down."""
  return (
    f"model.layers.{layer}.{family.expert_prefix}.experts.{expert}.{family.expert_names[projection]}.weight"
  )


def fused_names(layer: int) -> tuple[str, str]:
  return f"model.layers.{layer}.mlp.experts.gate_up_proj", f"model.layers.{layer}.mlp.experts.down_proj"


class _Reader:
  """Takes tensors out of the checkpoint by name, so the ones never taken can be named at the end."""

  def __init__(self, tensors: Mapping[str, jnp.ndarray]):
    self.tensors = tensors
    self.taken: set[str] = set()

  def has(self, name: str) -> bool:
    return name in self.tensors

  def take(self, name: str) -> jnp.ndarray:
    if name not in self.tensors:
      raise CheckpointFormatError(f"model.safetensors: tensor {name} is missing")
    self.taken.add(name)
    return jnp.asarray(self.tensors[name])

  def check_all_taken(self) -> None:
    left = sorted(
      name for name in self.tensors if name not in self.taken and not name.endswith(IGNORED_SUFFIXES)
    )
    if left:
      more = f" (and {len(left) - 3} more)" if len(left) > 3 else ""
      raise CheckpointFormatError(
        f"model.safetensors: unexpected tensors {left[:3]}{more}: the checkpoint has parts config.json does not describe"
      )


def _experts(reader: _Reader, family: Family, layer: int, num_experts: int) -> dict[str, jnp.ndarray]:
  """The layer's stacked expert weights [E, D, F], [E, D, F], [E, F, D] from either layout."""
  gate_up_name, down_name = fused_names(layer)
  if reader.has(gate_up_name):
    gate_up_Ex2FxD = reader.take(gate_up_name)
    if gate_up_Ex2FxD.ndim != 3 or gate_up_Ex2FxD.shape[1] % 2:
      raise CheckpointFormatError(
        f"model.safetensors: {gate_up_name} has shape {gate_up_Ex2FxD.shape}, expected [E, 2F, D]"
      )
    gate_ExFxD, up_ExFxD = jnp.split(gate_up_Ex2FxD, 2, axis=1)
    stacked = (gate_ExFxD, up_ExFxD, reader.take(down_name))
  else:
    stacked = tuple(
      jnp.stack(
        [reader.take(per_expert_name(family, layer, expert, projection)) for expert in range(num_experts)]
      )
      for projection in range(3)
    )
  return {name: weight.transpose(0, 2, 1) for name, weight in zip(EXPERT_PARAMETERS, stacked, strict=True)}


def parameters_from_hf(
  tensors: Mapping[str, jnp.ndarray], config: CausalLMConfig, family: Family
) -> dict[Path, jnp.ndarray]:
  """Every parameter of the model, by path, from a checkpoint's tensors (CheckpointFormatError naming a
  missing or unexpected tensor); shapes are checked by the caller against the model's."""
  reader = _Reader(tensors)
  parameters = {}
  for path, (name, transposed) in dense_tensor_names(config, family).items():
    tensor = reader.take(name)
    parameters[path] = tensor.T if transposed else tensor
  for layer in range(config.num_layers):
    router = next(
      (name for name in router_names(family, layer) if reader.has(name)), router_names(family, layer)[0]
    )
    parameters["layers", layer, "ffn", "router", "kernel"] = reader.take(router).T
    for name, weight in _experts(reader, family, layer, config.moe.num_experts).items():
      parameters["layers", layer, "ffn", "experts", name] = weight
  reader.check_all_taken()
  return parameters


def hf_tensors_from(
  parameters: Mapping[Path, jnp.ndarray], config: CausalLMConfig, family: Family
) -> dict[str, jnp.ndarray]:
  """The checkpoint tensors of the model's parameters, in the per-expert layout (`parameters_from_hf`'s inverse)."""
  tensors = {}
  for path, (name, transposed) in dense_tensor_names(config, family).items():
    tensors[name] = parameters[path].T if transposed else parameters[path]
  for layer in range(config.num_layers):
    tensors[router_names(family, layer)[0]] = parameters["layers", layer, "ffn", "router", "kernel"].T
    for projection, parameter in enumerate(EXPERT_PARAMETERS):
      stacked = parameters["layers", layer, "ffn", "experts", parameter]
      for expert in range(config.moe.num_experts):
        tensors[per_expert_name(family, layer, expert, projection)] = stacked[expert].T
  # safetensors writes contiguous buffers; a transposed view is not one.
  return {name: jnp.asarray(tensor).copy() for name, tensor in tensors.items()}
