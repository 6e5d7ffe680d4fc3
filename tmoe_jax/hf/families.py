"""The Hugging Face MoE families read and written here, and their config.json <-> `CausalLMConfig`.

A family is a `model_type` of config.json (mixtral, qwen2_moe, qwen3_moe, olmoe). All four are
the same decoder (`models.causal_lm`): RMSNorm, rotary grouped-query attention, SwiGLU experts
behind a softmax router. They differ in a few conventions, each a field of `Family`: where the
expert width is stored, the names of the expert tensors, whether the k gates are renormalised,
the q/k norm, q/k/v biases and the gated shared expert. A setting this library does not
implement (sliding windows, rope scaling, dense layers between MoE layers, clipped q/k/v, ...)
raises `CheckpointFormatError` naming the config.json field, before anything is built or written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from tmoe_jax.errors import CheckpointFormatError, ConfigError
from tmoe_jax.models.causal_lm import CausalLMConfig


@dataclasses.dataclass(frozen=True)
class Family:
  """One family's conventions.

  expert_width_key: config.json's key of each routed expert's hidden width.
  expert_prefix / expert_names: the per-expert tensor layout,
    `model.layers.{l}.{expert_prefix}.experts.{e}.{gate|up|down name}.weight`.
  renormalize_key: the config key that says whether the k gates are rescaled to sum to 1;
    None: always (Mixtral).
  qk_norm: `attention.QK_NORMS`: none, per head (Qwen3) or over the projection (OLMoE).
  qkv_bias_key / qkv_bias_default: the key (and its default) of biases on q, k and v; None: none.
  shared_expert: a SwiGLU shared expert with a sigmoid gate (Qwen2-MoE).
  """

  model_type: str
  architecture: str
  expert_width_key: str
  expert_prefix: str
  expert_names: tuple[str, str, str]
  renormalize_key: str | None
  qk_norm: str = "none"
  qkv_bias_key: str | None = None
  qkv_bias_default: bool = False
  shared_expert: bool = False


PROJECTION_NAMES = ("gate_proj", "up_proj", "down_proj")
FAMILIES: dict[str, Family] = {
  "mixtral": Family(
    "mixtral", "MixtralForCausalLM", "intermediate_size", "block_sparse_moe", ("w1", "w3", "w2"), None
  ),
  "qwen2_moe": Family(
    "qwen2_moe",
    "Qwen2MoeForCausalLM",
    "moe_intermediate_size",
    "mlp",
    PROJECTION_NAMES,
    "norm_topk_prob",
    qkv_bias_key="qkv_bias",
    qkv_bias_default=True,
    shared_expert=True,
  ),
  "qwen3_moe": Family(
    "qwen3_moe",
    "Qwen3MoeForCausalLM",
    "moe_intermediate_size",
    "mlp",
    PROJECTION_NAMES,
    "norm_topk_prob",
    "heads",
  ),
  "olmoe": Family(
    "olmoe", "OlmoeForCausalLM", "intermediate_size", "mlp", PROJECTION_NAMES, "norm_topk_prob", "projection"
  ),
}


def _absent_or(*allowed) -> Callable[[Any], bool]:
  return lambda value: value is None or value in allowed


# (config.json key, whether its value is supported, what is not): settings outside this library.
UNSUPPORTED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
  ("hidden_act", lambda value: value in (None, "silu"), "experts other than SwiGLU (hidden_act silu)"),
  ("use_sliding_window", _absent_or(False), "sliding-window attention"),
  ("rope_scaling", lambda value: not value, "rope scaling"),
  ("partial_rotary_factor", _absent_or(1, 1.0), "partial rotary embeddings"),
  ("attention_bias", _absent_or(False), "biases on the attention output (attention_bias)"),
  ("clip_qkv", _absent_or(), "clipped q/k/v (clip_qkv)"),
  ("decoder_sparse_step", _absent_or(1), "dense layers between MoE layers (decoder_sparse_step)"),
  ("mlp_only_layers", lambda value: not value, "dense layers between MoE layers (mlp_only_layers)"),
  ("layer_types", lambda value: not value or set(value) == {"full_attention"}, "attention other than full"),
)


def family_of(hf_config: dict[str, Any]) -> Family:
  """The family of a config.json, by `model_type` (or its architecture); CheckpointFormatError if unknown."""
  model_type = hf_config.get("model_type")
  if model_type in FAMILIES:
    return FAMILIES[model_type]
  architectures = hf_config.get("architectures") or []
  for family in FAMILIES.values():
    if family.architecture in architectures:
      return family
  raise CheckpointFormatError(
    f"config.json: model_type {model_type!r} (architectures {architectures}) is not a supported MoE "
    f"family; supported: {sorted(FAMILIES)}"
  )


def _required(hf_config: dict[str, Any], key: str) -> Any:
  if hf_config.get(key) is None:
    raise CheckpointFormatError(f"config.json: {key} is missing")
  return hf_config[key]


def _rotary_base(hf_config: dict[str, Any]) -> float:
  """rope_theta, from `rope_parameters` (transformers 5) or the top level (older configs)."""
  parameters = hf_config.get("rope_parameters") or {}
  if parameters.get("rope_type", "default") != "default":
    raise CheckpointFormatError(
      f"config.json: rope_parameters.rope_type={parameters['rope_type']!r} is not supported (only 'default')"
    )
  theta = parameters.get("rope_theta", hf_config.get("rope_theta"))
  return float(theta if theta is not None else 10000.0)


def _check_supported(hf_config: dict[str, Any], family: Family) -> None:
  for key, supported, what in UNSUPPORTED:
    if not supported(hf_config.get(key)):
      raise CheckpointFormatError(f"config.json: {key}={hf_config[key]!r}: {what} is not supported")
  window = hf_config.get("sliding_window")
  if window and family.model_type == "mixtral":
    raise CheckpointFormatError(
      f"config.json: sliding_window={window!r}: sliding-window attention is not supported"
    )


def model_fields_from_hf(hf_config: dict[str, Any]) -> tuple[Family, dict[str, Any]]:
  """(family, the flat `model.*` fields of the same model) of a config.json's dict."""
  family = family_of(hf_config)
  _check_supported(hf_config, family)
  num_experts = hf_config.get("num_local_experts") or _required(hf_config, "num_experts")
  num_heads = _required(hf_config, "num_attention_heads")
  hidden_size = _required(hf_config, "hidden_size")
  renormalize = True if family.renormalize_key is None else bool(hf_config.get(family.renormalize_key, False))
  fields = {
    "vocab_size": _required(hf_config, "vocab_size"),
    "d_model": hidden_size,
    "num_heads": num_heads,
    "num_kv_heads": hf_config.get("num_key_value_heads") or num_heads,
    # 0 (d_model / num_heads) unless the family sets another size, so one model has one config.
    "head_size": 0
    if hf_config.get("head_dim") in (None, hidden_size // num_heads)
    else hf_config["head_dim"],
    "num_layers": _required(hf_config, "num_hidden_layers"),
    "d_ff": _required(hf_config, family.expert_width_key),
    "ffn": "moe",
    "activation": "silu",
    "rotary_base": _rotary_base(hf_config),
    "qk_norm": family.qk_norm,
    "qkv_bias": bool(hf_config.get(family.qkv_bias_key, family.qkv_bias_default))
    if family.qkv_bias_key
    else False,
    "norm_epsilon": float(hf_config.get("rms_norm_eps", 1e-6)),
    "tie_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
    "max_length": int(hf_config.get("max_position_embeddings", 2048)),
    "num_experts": num_experts,
    "top_k": _required(hf_config, "num_experts_per_tok"),
    "expert_type": "gated",
    "router_dtype": "model",  # the gate is a Linear of the model's dtype; its softmax is float32
    "dispatch": "dropless",
    # Dropless routing gives every group the same sums, and groups of one sequence let the
    # experts split over any 'expert' mesh axis without changing the config.
    "sequences_per_group": 1,
    # "after" (softmax over the k chosen logits) is the full softmax renormalised over the k, also
    # for k = 1, where "before" with normalize_gates keeps the raw probability.
    "softmax_order": "after" if renormalize else "before",
    "normalize_gates": renormalize,
  }
  if family.shared_expert:
    fields.update(
      num_shared_experts=1,
      shared_expert_type="gated",
      shared_expert_d_ff=_required(hf_config, "shared_expert_intermediate_size"),
      shared_expert_gate=True,
    )
  return family, fields


def config_from_hf(hf_config: dict[str, Any], **overrides) -> tuple[Family, CausalLMConfig]:
  """(family, `CausalLMConfig`); `overrides` (e.g. dtype, remat) replace fields of the translation."""
  family, fields = model_fields_from_hf(hf_config)
  try:
    return family, CausalLMConfig.from_flat(**{**fields, **overrides})
  except ConfigError as error:
    raise CheckpointFormatError(f"config.json gives an invalid model: {error}") from None


def _require_exportable(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise CheckpointFormatError(f"{field}: {message}, so the model has no Hugging Face equivalent")


def hf_config_from(
  config: CausalLMConfig, family: Family, special_ids: dict[str, int | None]
) -> dict[str, Any]:
  """The config.json of `config` as a model of `family` (CheckpointFormatError naming the field that
  the family cannot express). `special_ids`: bos/eos/pad token ids (None: absent)."""
  moe = config.moe
  _require_exportable(config.ffn == "moe", "model.ffn", f"{config.ffn!r} is not the family's top-k MoE")
  _require_exportable(moe.router == "top_k", "model.router", f"{moe.router!r} is not token-choice top-k")
  _require_exportable(moe.expert_type == "gated", "model.expert_type", "the family's experts are gated")
  _require_exportable(config.activation == "silu", "model.activation", "the family's experts use silu")
  _require_exportable(
    config.qk_norm == family.qk_norm, "model.qk_norm", f"{family.model_type} uses {family.qk_norm!r}"
  )
  _require_exportable(
    not config.qkv_bias or family.qkv_bias_key is not None, "model.qkv_bias", f"{family.model_type} has none"
  )
  _require_exportable(
    not moe.expert_bias_rate, "model.expert_bias_rate", "a routing bias is not in the family"
  )
  renormalized = moe.softmax_order == "after" or (moe.normalize_gates and moe.top_k > 1)
  _require_exportable(
    family.renormalize_key is not None or renormalized, "model.normalize_gates", "Mixtral always renormalises"
  )
  shared = (moe.num_shared_experts, moe.shared_expert_type, moe.shared_expert_gate)
  expected_shared = (
    (1, "gated", True) if family.shared_expert else (0, moe.shared_expert_type, moe.shared_expert_gate)
  )
  _require_exportable(shared == expected_shared, "model.num_shared_experts", f"{family.model_type} differs")
  head_size = config.attention_head_size
  _require_exportable(
    family.model_type in ("mixtral", "qwen3_moe") or head_size * config.num_heads == config.d_model,
    "model.head_size",
    f"{family.model_type} needs head_size * num_heads == d_model",
  )
  hf_config = {
    "architectures": [family.architecture],
    "model_type": family.model_type,
    "vocab_size": config.vocab_size,
    "hidden_size": config.d_model,
    "num_hidden_layers": config.num_layers,
    "num_attention_heads": config.num_heads,
    "num_key_value_heads": config.num_kv_heads,
    "head_dim": head_size,
    family.expert_width_key: config.d_ff,
    "num_experts_per_tok": moe.top_k,
    "num_local_experts" if family.model_type == "mixtral" else "num_experts": moe.num_experts,
    "hidden_act": "silu",
    "rms_norm_eps": config.norm_epsilon,
    "rope_parameters": {"rope_theta": config.rotary_base, "rope_type": "default"},
    "max_position_embeddings": config.max_length,
    "tie_word_embeddings": config.tie_embeddings,
    "attention_dropout": 0.0,
    "dtype": "bfloat16" if config.dtype == jnp.bfloat16 else "float32",
    "bos_token_id": special_ids.get("bos"),
    "eos_token_id": special_ids.get("eos"),
    "pad_token_id": special_ids.get("pad"),
  }
  if family.renormalize_key is not None:
    hf_config[family.renormalize_key] = renormalized
  if family.qkv_bias_key is not None:
    hf_config[family.qkv_bias_key] = config.qkv_bias
  if family.shared_expert:
    hf_config["shared_expert_intermediate_size"] = moe.shared_width
    hf_config["intermediate_size"] = moe.shared_width  # unused by the all-MoE layers; required by the class
    hf_config.update(decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False)
  return hf_config
