"""A Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json) <-> a runnable `CausalLM`.

```python
import tmoe_jax

hf = tmoe_jax.from_hf("path/to/Qwen3-MoE-dir")       # no network: everything from the directory
hf.generate(["The cat", "A dog sat on"], max_new_tokens=20)   # -> list[str]
logits, moe_aux = hf.model(token_ids_BxL)
tmoe_jax.hf.save_hf(hf.model, "out-dir", family=hf.family, tokenizer_path=hf.tokenizer_path)
```

Every check (architecture, settings, tensor names and shapes) runs before a model is built or a
file written; each failure is one `CheckpointFormatError` naming the field or tensor.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file
from tokenizers import Tokenizer

from tmoe_jax.errors import CheckpointFormatError
from tmoe_jax.generation import Sampling, generate_texts
from tmoe_jax.hf.families import Family, config_from_hf, hf_config_from
from tmoe_jax.hf.tensors import Path, hf_tensors_from, parameters_from_hf
from tmoe_jax.models.causal_lm import CausalLM, CausalLMConfig
from tmoe_jax.moe.parameter_sharding import tree_shardings

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"


def read_config(directory: str | pathlib.Path) -> dict[str, Any]:
  path = pathlib.Path(directory) / "config.json"
  if not path.is_file():
    raise CheckpointFormatError(f"{directory}: no config.json (not a Hugging Face checkpoint directory)")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise CheckpointFormatError(f"{path}: not JSON ({error})") from None


def read_tensors(directory: str | pathlib.Path) -> dict[str, jax.Array]:
  """Every tensor of model.safetensors, or of the shards model.safetensors.index.json lists."""
  directory = pathlib.Path(directory)
  if (directory / SAFETENSORS_INDEX).is_file():
    weight_map = json.loads((directory / SAFETENSORS_INDEX).read_text()).get("weight_map", {})
    files = sorted(set(weight_map.values()))
  elif (directory / SAFETENSORS).is_file():
    files = [SAFETENSORS]
  else:
    raise CheckpointFormatError(f"{directory}: no {SAFETENSORS} nor {SAFETENSORS_INDEX}")
  tensors = {}
  for name in files:
    if not (directory / name).is_file():
      raise CheckpointFormatError(f"{directory}: {SAFETENSORS_INDEX} names {name}, which is missing")
    with safe_open(directory / name, framework="flax") as shard:
      tensors.update({key: shard.get_tensor(key) for key in shard.keys()})
  return tensors


def special_token_ids(hf_config: dict[str, Any]) -> dict[str, int | None]:
  """bos / eos / pad ids of config.json (an eos list: its first)."""
  eos = hf_config.get("eos_token_id")
  return {
    "bos": hf_config.get("bos_token_id"),
    "eos": eos[0] if isinstance(eos, list) else eos,
    "pad": hf_config.get("pad_token_id"),
  }


def build_model(config: CausalLMConfig, parameters: dict[Path, jax.Array], *, mesh=None) -> CausalLM:
  """A `CausalLM` holding `parameters` (cast to each parameter's dtype, shape-checked); with `mesh`,
  placed as `moe.parameter_sharding` says (experts over 'expert')."""
  abstract = nnx.eval_shape(lambda: CausalLM(config, mesh=mesh, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  filled = []
  for path, variable in nnx.to_flat_state(state):
    if path not in parameters:
      raise CheckpointFormatError(f"no tensor for parameter {'.'.join(map(str, path))}")
    value = parameters[path]
    if tuple(value.shape) != tuple(variable.shape):
      raise CheckpointFormatError(
        f"parameter {'.'.join(map(str, path))}: the checkpoint's tensor has shape {tuple(value.shape)}, "
        f"config.json implies {tuple(variable.shape)}"
      )
    filled.append((path, variable.replace(jnp.asarray(value, variable.dtype))))
  state = nnx.from_flat_state(filled)
  if mesh is not None:
    state = jax.device_put(state, tree_shardings(state, mesh))
  return nnx.merge(graphdef, state)


@dataclasses.dataclass
class HFModel:
  """An imported checkpoint: its family, settings, model and (if the directory has one) tokenizer."""

  family: Family
  config: CausalLMConfig
  model: CausalLM
  hf_config: dict[str, Any]
  tokenizer: Tokenizer | None
  tokenizer_path: pathlib.Path | None

  @property
  def special_ids(self) -> dict[str, int | None]:
    return special_token_ids(self.hf_config)

  def encode(self, text: str) -> list[int]:
    """The tokenizer's ids of `text` (with the special tokens its post-processor adds, e.g. <s>)."""
    if self.tokenizer is None:
      raise CheckpointFormatError("the checkpoint directory has no tokenizer.json; pass token ids instead")
    return self.tokenizer.encode(text).ids

  def generate(
    self,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    sampling: Sampling = Sampling(),
    stop_at_eos: bool = True,
    seed: int = 0,
  ) -> list[str] | list[list[int]]:
    """Continuations of each prompt (`generation.generate_texts`): texts for text prompts, token ids
    for id prompts; with `stop_at_eos`, each stops before the checkpoint's eos token."""
    pad = self.special_ids["pad"]
    return generate_texts(
      self.model,
      self.tokenizer,
      [prompts] if isinstance(prompts, str) else prompts,
      max_new_tokens,
      sampling=sampling,
      eos_id=self.special_ids["eos"] if stop_at_eos else None,
      pad_id=pad if pad is not None else 0,
      seed=seed,
    )


def from_hf(directory: str | pathlib.Path, *, mesh=None, **overrides) -> HFModel:
  """The checkpoint in `directory` as a runnable model. `overrides`: `CausalLMConfig` fields to change
  (e.g. dtype=jnp.bfloat16, remat="full", dispatch="capacity"); `mesh`: place the experts on it."""
  directory = pathlib.Path(directory)
  hf_config = read_config(directory)
  family, config = config_from_hf(hf_config, **overrides)
  parameters = parameters_from_hf(read_tensors(directory), config, family)
  model = build_model(config, parameters, mesh=mesh)
  tokenizer_path = directory / TOKENIZER
  tokenizer = Tokenizer.from_file(str(tokenizer_path)) if tokenizer_path.is_file() else None
  return HFModel(family, config, model, hf_config, tokenizer, tokenizer_path if tokenizer else None)


def model_parameters(model: CausalLM) -> dict[Path, jax.Array]:
  """path -> value of every parameter."""
  return {path: variable.get_value() for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def save_hf(
  model: CausalLM,
  directory: str | pathlib.Path,
  *,
  family: Family,
  special_ids: dict[str, int | None] | None = None,
  tokenizer_path: str | pathlib.Path | None = None,
  overwrite: bool = False,
) -> pathlib.Path:
  """Writes config.json, model.safetensors (per-expert layout) and tokenizer.json (copied) for
  `transformers` to load as `family`. Nothing is written unless the whole model translates."""
  directory = pathlib.Path(directory)
  hf_config = hf_config_from(model.config, family, special_ids or {})
  tensors = hf_tensors_from(model_parameters(model), model.config, family)
  if directory.exists() and any(directory.iterdir()) and not overwrite:
    raise CheckpointFormatError(f"{directory} exists and is not empty (pass overwrite=True to replace it)")
  directory.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(directory / SAFETENSORS), metadata={"format": "pt"})
  (directory / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
  if tokenizer_path is not None:
    shutil.copyfile(tokenizer_path, directory / TOKENIZER)
  return directory
