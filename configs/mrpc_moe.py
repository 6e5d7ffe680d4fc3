"""MRPC-MoE: paraphrase detection on GLUE MRPC with a mixture of sequence experts trained from scratch.

The pair is encoded jointly ("s1 <sep> s2": word + segment + overlap-kind embeddings),
a gating network weights E experts (MLP, RNN or CNN) that each turn the sequence into
one vector, and a small classifier reads it with lexical-overlap features of the pair
(`tmoe_jax.models.pair_classifier`). Weights are selected on a validation split carved
from train.tsv, never on dev; dev accuracy and F1 are reported with the majority-class
baseline (68.4 %, F1 81.2).

Default (CNN experts, 4 x 256, 600 steps): dev accuracy 79.2 %, F1 85.0 (weights of step
350, validation accuracy 75.2 %; over train.seed 0, 1, 2: 78.3 +- 1.9 %, F1 85.2 +- 1.2,
results/mrpc_sweep/); 6-7 minutes wall on a shared 2-core CPU under load
(about 2 minutes of CPU time).

Run (MRPC's GLUE TSVs in DIR: train.tsv, dev.tsv):
  python -m train --config configs/mrpc_moe.py --config.data.dir=DIR --workdir runs/mrpc_moe
The original project's table (4 x 256, 10 x 512, dropout, RNN and CNN experts):
  python -m train.sweep_mrpc --data-dir DIR --out mrpc_table.md [--seeds 0,1,2]
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "sentence_pair"

  config.model = ml_collections.ConfigDict()
  config.model.embedding_size = 128  # word, segment and overlap-kind embeddings (summed)
  config.model.num_experts = 4
  config.model.hidden_size = 256  # each expert's output width
  config.model.expert_type = "cnn"  # "mlp" (mean-pool MLP), "rnn" (model.rnn_cell) or "cnn"
  config.model.rnn_cell = "gru"  # or "lstm"; used by expert_type "rnn"
  config.model.kernel_width = 3  # CNN experts' window, in tokens
  config.model.gating = "dense"  # every expert softmax-weighted (the original); "top_k": the best K only
  config.model.top_k = 2  # experts per pair with gating "top_k"
  config.model.router_hidden_size = 0  # 0 = linear gating network; > 0: one ReLU layer of this width
  config.model.dropout_rate = 0.1  # embeddings, mixture output, classifier hidden layer
  config.model.classifier_hidden_size = 64  # 0 = a linear classifier on [mixture output; pair features]
  config.model.dtype = "float32"  # compute dtype; "bfloat16" on GPU/TPU
  config.model.load_balancing_weight = 1e-2  # Switch loss over pairs (argmax expert with dense gating)
  config.model.router_z_weight = 1e-3

  config.train = common.train_section(
    num_steps=600,  # ~6 epochs of the 3,268 training pairs; validation accuracy peaks before
    batch_size=32,
    learning_rate=1e-3,
    warmup_steps=100,
    weight_decay=1e-2,  # AdamW, decoupled
    log_every=50,
    eval_every=200,
    checkpoint_every=200,
    # Validation accuracy is measured every this many steps and the best weights kept
    # (in the train state); 0 = evaluate the final weights.
    select_every=50,
  )
  config.eval = common.eval_section(
    batch_size=64,  # also the chunk of the in-step validation pass; RNN experts hold [E, B, L, 3H]
    num_examples_during_training=512,  # all of dev (408 pairs)
  )
  config.mesh = common.mesh_section()

  config.data = ml_collections.ConfigDict()
  config.data.name = "glue/mrpc"
  config.data.dir = ""  # folder with GLUE's train.tsv and dev.tsv (and a labelled test.tsv, if any)
  config.data.tfds_data_dir = ""  # or a TFDS data dir holding an array_record build of glue/mrpc
  config.data.validation_size = 400  # pairs of train.tsv held out for selection (never dev)
  config.data.seed = 0  # which pairs go to validation
  config.data.max_length = (
    88  # joint "s1 <sep> s2" tokens (MRPC's longest train pair: 82); longer pairs are truncated
  )
  config.data.lowercase = True
  config.data.min_word_count = 2  # rarer training words become <unk> (their overlap kind is kept)
  config.data.max_vocabulary_size = 0  # 0 = no limit
  return config
