"""Hugging Face MoE checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) in and out of `models.causal_lm`."""

from tmoe_jax.hf.checkpoint_directory import HFModel, from_hf, save_hf
from tmoe_jax.hf.families import FAMILIES, Family

__all__ = ["FAMILIES", "Family", "HFModel", "from_hf", "save_hf"]
