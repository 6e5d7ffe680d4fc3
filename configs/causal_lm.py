"""A decoder-only MoE LM (Mixtral-style: RMSNorm, rotary GQA, SwiGLU experts) trained from scratch on local text.

The English side of Multi30k (29,000 image captions; validation: its 1,014 `val` captions),
a byte-level BPE of 2,048 ids trained on the training captions, windows of 64 tokens.
Two layers, d_model 128, 4 query / 2 key-value heads; every feed-forward layer is
`model.ffn`:
  "moe":   8 SwiGLU experts of d_ff = 128 units, top-2, dropless: 256 active units per token;
  "dense": one SwiGLU FFN; give it d_ff = 256 for equal active parameters.
Validation (`val`) is evaluated during training; the run reports test_loss (nats/token) and
test_perplexity on test_2016_flickr's 1,000 English captions, scored once by the final weights.

  python -m train --config configs/causal_lm.py --config.data.dir=DATA/multi30k --workdir runs/clm_moe
  python -m train --config configs/causal_lm.py --config.data.dir=DATA/multi30k --workdir runs/clm_dense \
      --config.model.ffn=dense --config.model.d_ff=256
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "causal_lm"
  config.model = model_section()
  config.train = common.train_section(
    num_steps=600,
    batch_size=32,
    learning_rate=2e-3,
    warmup_steps=60,
    log_every=25,
    eval_every=200,
    checkpoint_every=200,
  )
  config.eval = common.eval_section(batch_size=64, num_examples_during_training=64)
  config.mesh = common.mesh_section()
  config.data = data_section(dir="")
  config.init = ml_collections.ConfigDict({"hf_checkpoint": "", "hf_family": ""})
  return config


def model_section(**overrides) -> ml_collections.ConfigDict:
  """Every `model.*` key of `tmoe_jax.models.causal_lm.CausalLMConfig` with this experiment's values."""
  model = ml_collections.ConfigDict()
  model.vocab_size = 0  # 0 = the tokenizer's size
  model.ffn = "moe"  # or "dense", "smoe"
  model.d_model = 128
  model.num_heads = 4
  model.num_kv_heads = 2  # grouped-query attention: 2 query heads per key/value head
  model.head_size = 0  # 0 = d_model / num_heads
  model.num_layers = 2
  model.d_ff = 128  # each expert's (or the dense FFN's) hidden units
  model.activation = "silu"  # SwiGLU
  model.rotary_base = 10000.0
  model.qk_norm = "none"  # or "heads" (Qwen3), "projection" (OLMoE)
  model.qkv_bias = False
  model.norm_epsilon = 1e-6
  model.tie_embeddings = False
  model.max_length = 2048  # the longest sequence generation may reach
  model.dropout_rate = 0.0
  model.dtype = "float32"
  common.add_remat_setting(model)
  common.add_moe_settings(
    model,
    num_experts=8,
    top_k=2,
    expert_type="gated",
    dispatch="dropless",
    sequences_per_group=0,
    softmax_order="after",  # the k gates renormalised (Mixtral)
  )
  common.add_smoe_settings(model)
  model.load_balancing_weight = 1e-2
  model.router_z_weight = 1e-3
  model.update(overrides)
  return model


def data_section(**overrides) -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict()
  data.dir = ""  # a folder holding the text files (e.g. ../shared/data/multi30k)
  data.train_file = "train.en.gz"  # one document per line; gzipped or plain
  data.validation_file = "val.en.gz"  # evaluated during training
  data.test_file = "test_2016_flickr.en.gz"  # scored once, by the final weights; empty = report validation
  data.tokenizer = ""  # a tokenizer.json; empty = train a byte-level BPE on the training text
  data.vocab_size = 2048  # of the trained BPE
  data.end_of_text_id = -1  # the id after each document; -1 = the tokenizer's "</s>"
  data.sequence_length = 64  # tokens per training / evaluation window
  data.update(overrides)
  return data
