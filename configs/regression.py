"""Regression with a softmax mixture of experts: the original notebook's model on y = sum of squares.

Every step draws a fresh batch of 1,000 points x ~ N(0, I_10) (a pure function
of (train.seed, step)); the target is sum_i x_i^2 and the loss the mean squared
error. Five MLP experts 10 -> 32 -> 1 are mixed by a softmax gate; Adam, lr
1e-3. The run evaluates as many validation points (a third stream) during training,
reports `test_mse` on 10,000 held-out points (another random stream, fixed by data.seed),
scored once at the end, and writes loss_curve.png.

Run the three variants:
  python -m train --config configs/regression.py --workdir runs/regression
  python -m train --config configs/regression.py --workdir runs/regression_top2 --config.model.gating=top_k
  python -m train --config configs/regression.py --workdir runs/regression_dense_mlp \
      --config.model.kind=dense_mlp
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "regression"

  config.model = ml_collections.ConfigDict()
  # "moe": softmax-gated mixture of MLP experts; "dense_mlp": one MLP with as many
  # parameters as the mixture (its width is computed, not configured).
  config.model.kind = "moe"
  # "dense": every expert runs, mixed by the full softmax (the notebook);
  # "top_k": the top_k largest softmax weights, renormalised (tmoe_jax.moe.routing).
  config.model.gating = "dense"
  config.model.num_experts = 5
  config.model.hidden = 32  # hidden units of each expert
  config.model.top_k = 2  # experts per point with gating "top_k"
  config.model.activation = "relu"  # or "gelu", "silu"
  # Switch balancing loss weight (top_k gating only: dense gating has no load to balance).
  config.model.load_balancing_weight = 1e-2
  config.model.router_z_weight = 0.0  # ST-MoE z-loss weight; the notebook had none

  config.train = common.train_section(
    num_steps=10_000,
    batch_size=1000,  # fresh points per step
    learning_rate=1e-3,
    schedule="constant",
    warmup_steps=0,
    adam_b2=0.999,  # torch.optim.Adam defaults, as in the notebook
    grad_clip_norm=0.0,
    log_every=25,
    eval_every=500,
    checkpoint_every=2500,
  )
  config.eval = common.eval_section(
    batch_size=2000,
    num_examples_during_training=10_000,  # all of the held-out points: evaluating is cheap
  )
  config.mesh = common.mesh_section()

  config.data = ml_collections.ConfigDict()
  config.data.input_dim = 10  # dimension of the Gaussian inputs
  config.data.num_test = 10_000  # held-out points for test_mse
  config.data.seed = 0  # seeds the held-out stream (training batches use train.seed)
  return config
