"""TMOE: a Transformer encoder-decoder with MoE feed-forward blocks, on the embedded date task.

Translates dates written in 16 human styles ("Tuesday, 3 March 1998", "3/3/98",
"March 3rd, '98", ...) into ISO 8601, character by character. Every second
feed-forward block is a top-2 MoE layer with 4 experts.

Run:
  python -m train --config configs/tmoe.py --workdir runs/tmoe
Override any field:
  python -m train --config configs/tmoe.py --config.model.num_experts=8 --config.train.num_steps=500
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "seq2seq"

  config.model = ml_collections.ConfigDict()
  config.model.d_model = 128
  config.model.num_heads = 4
  config.model.num_layers = 2  # encoder layers
  config.model.num_decoder_layers = 2
  config.model.d_ff = 256
  config.model.dropout_rate = 0.1
  config.model.attention_dropout_rate = 0.0
  config.model.share_embeddings = True
  config.model.position_embedding = "sinusoidal"  # or "learned"
  config.model.max_length = 32
  config.model.activation = "relu"
  config.model.dtype = "float32"  # compute dtype; "bfloat16" on GPU/TPU
  common.add_remat_setting(config.model)  # "full" / "save_dots": less memory, more compute
  config.model.moe_every = 2  # every 2nd FFN is MoE; 1 = all, 0 = dense model
  common.add_moe_settings(config.model, num_experts=4, top_k=2)
  # "moe" (top-k or expert-choice experts; "sparse" is an alias), or "smoe": one shared FFN
  # whose router picks one of num_experts dropout masks
  config.model.moe_layer = "moe"
  common.add_smoe_settings(config.model)
  config.model.load_balancing_weight = 1e-2
  config.model.router_z_weight = 1e-3

  config.train = common.train_section(label_smoothing=0.0)
  config.eval = common.eval_section(
    beam_size=1,  # 1 = greedy
    length_penalty=0.6,
  )
  config.mesh = common.mesh_section()
  config.distributed = common.distributed_section()

  config.data = ml_collections.ConfigDict()
  config.data.name = "dates"
  config.data.dir = ""  # local files; empty = the embedded (or TFDS) source
  config.data.tfds_data_dir = ""
  config.data.seed = 0
  config.data.num_train = 50_000
  config.data.num_test = 2_000
  # Drawn from dates held out of training (5 % of them), evaluated every train.eval_every steps;
  # the test dates are scored once, at the end.
  config.data.num_validation = 1_000
  return config
