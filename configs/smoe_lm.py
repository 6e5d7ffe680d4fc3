"""sMoE vs top-k MoE vs dense FFN in a character-level decoder-only LM on the pydoc corpus.

A 2-layer pre-LN decoder-only Transformer (d_model 128, 4 heads, context 128
characters) trained on the documentation text that ships with CPython
(`pydoc_data.topics`, ~465K characters, no download); the last 10 % is held
out. Every feed-forward layer is `model.ffn`:
  "smoe":  sMoE, one shared FFN of d_ff / keep_rate units and num_experts fixed
           dropout masks (keep rate 0.8, kept units scaled by 1 / mean(mask)),
           a top-1 router per token picks the mask;
  "moe":   classic top-k MoE, num_experts experts of d_ff / top_k units;
  "dense": one FFN of d_ff units,
so each token uses d_ff hidden units (equal active parameters up to the
router). Reports val_loss (nats/char) and val_bits_per_char.

Run the three variants (same steps and data):
  python -m train --config configs/smoe_lm.py --workdir runs/smoe_lm
  python -m train --config configs/smoe_lm.py --workdir runs/smoe_lm_moe --config.model.ffn=moe
  python -m train --config configs/smoe_lm.py --workdir runs/smoe_lm_dense --config.model.ffn=dense
The original sMoE schedule (sample the mask from the router for smoe_sample_steps steps, 1,000
by default as in the original, then the argmax; here half of the 800 steps):
  python -m train --config configs/smoe_lm.py --workdir runs/smoe_lm_sampled \
      --config.model.smoe_selection=sample_then_argmax --config.model.smoe_sample_steps=400
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "language_model"

  config.model = ml_collections.ConfigDict()
  config.model.ffn = "smoe"  # or "moe", "dense"
  config.model.d_model = 128
  config.model.num_heads = 4
  config.model.num_layers = 2
  # Hidden units each token uses: the dense width; per expert d_ff / top_k; sMoE d_ff / keep_rate.
  config.model.d_ff = 256
  config.model.dropout_rate = 0.0
  config.model.position_embedding = "sinusoidal"  # or "learned"
  config.model.max_length = 128  # characters of context = training window length
  config.model.activation = "relu"  # or "gelu", "silu"
  config.model.dtype = "float32"  # compute dtype; "bfloat16" on GPU/TPU
  common.add_remat_setting(config.model)  # "full" / "save_dots": less memory, more compute
  # moe: top-k experts (and the sMoE's dropout masks: num_experts of them)
  common.add_moe_settings(config.model, num_experts=10, top_k=2, sequences_per_group=2)
  common.add_smoe_settings(config.model, smoe_keep_rate=0.8, smoe_mask_scaling="mask_mean")
  config.model.load_balancing_weight = 1e-2  # moe and smoe routers
  config.model.router_z_weight = 1e-3

  config.train = common.train_section(
    num_steps=800,
    batch_size=16,  # windows of max_length characters
    learning_rate=2e-3,
    warmup_steps=100,
    log_every=25,
    eval_every=200,
    checkpoint_every=400,
  )
  config.eval = common.eval_section(
    batch_size=64,
    num_examples_during_training=64,  # windows; the final evaluation uses all (363)
  )
  config.mesh = common.mesh_section()

  config.data = ml_collections.ConfigDict()
  config.data.validation_fraction = 0.1  # the final share of the text, held out
  return config
