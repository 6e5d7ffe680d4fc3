"""Fine-tune an imported Hugging Face MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) on local text.

The checkpoint directory comes after the config file's name; the model section is its
config.json translated (`tmoe_jax.hf.families`), the tokenizer its tokenizer.json, and the
run starts from its parameters with a fresh optimizer:

  python -m train --config configs/hf_finetune.py:CHECKPOINT_DIR --config.data.dir=DATA/multi30k \
      --workdir runs/finetune

Evaluation: perplexity on the validation text. `python -m train.import_hf` writes the same
workdir without training (its step 0, evaluated), and `python -m train.export_hf` writes a
trained workdir back as a checkpoint directory of the same family.
"""

import pathlib

import ml_collections

from configs import causal_lm, common


def get_config(checkpoint: str = "") -> ml_collections.ConfigDict:
  if not checkpoint:
    raise ValueError(
      "configs/hf_finetune.py needs a checkpoint directory: --config configs/hf_finetune.py:DIR"
    )
  from tmoe_jax.hf.checkpoint_directory import read_config
  from tmoe_jax.hf.families import model_fields_from_hf

  directory = pathlib.Path(checkpoint).resolve()
  hf_config = read_config(directory)
  family, fields = model_fields_from_hf(hf_config)
  eos = hf_config.get("eos_token_id")
  eos = eos[0] if isinstance(eos, list) else eos

  config = ml_collections.ConfigDict()
  config.task = "causal_lm"
  config.model = causal_lm.model_section(**fields)
  config.model.load_balancing_weight = float(hf_config.get("router_aux_loss_coef") or 1e-2)
  config.train = common.train_section(
    num_steps=200,
    batch_size=16,
    learning_rate=3e-4,
    warmup_steps=20,
    log_every=10,
    eval_every=100,
    checkpoint_every=100,
  )
  config.eval = common.eval_section(batch_size=32, num_examples_during_training=64)
  config.mesh = common.mesh_section()
  config.data = causal_lm.data_section(
    tokenizer=str(directory / "tokenizer.json"),
    end_of_text_id=-1 if eos is None else int(eos),
    sequence_length=64,
  )
  config.init = ml_collections.ConfigDict({"hf_checkpoint": str(directory), "hf_family": family.model_type})
  return config
