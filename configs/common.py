"""Config sections every experiment shares; each `configs/NAME.py` starts from these and overrides.

The training loop (`tmoe_jax.training.loop`) reads `train`, `eval` and `mesh`;
the task reads `model`, `data` and any extra `eval` fields it adds.
"""

import ml_collections


def train_section(**overrides) -> ml_collections.ConfigDict:
  """Adam lr 1e-3, batch 32 (the original TMOE settings), warm-up + cosine decay, clipping."""
  train = ml_collections.ConfigDict()
  train.num_steps = 2500
  train.batch_size = 32
  train.learning_rate = 1e-3
  train.schedule = "cosine"  # or "constant"
  train.warmup_steps = 100
  train.final_learning_rate_fraction = 0.1
  train.adam_b1 = 0.9
  train.adam_b2 = 0.98
  train.weight_decay = 0.0
  train.grad_clip_norm = 1.0  # 0 = no clipping
  # Microbatches per update: the same update (of batch_size rows) in less memory, at the
  # cost of one more forward pass per microbatch (`tmoe_jax.training.grad_accumulation`).
  train.grad_accum_steps = 1
  train.seed = 0
  train.log_every = 50
  train.eval_every = 500  # 0 = only at the end
  train.checkpoint_every = 500  # 0 = only at the end
  train.keep_checkpoints = 3
  train.progress_bar = True
  train.update(overrides)
  return train


def eval_section(**overrides) -> ml_collections.ConfigDict:
  evaluation = ml_collections.ConfigDict()
  evaluation.batch_size = 256
  evaluation.num_examples_during_training = 512  # at each eval_every; the final evaluation uses all
  evaluation.update(overrides)
  return evaluation


def add_moe_settings(model: ml_collections.ConfigDict, **overrides) -> None:
  """Adds every sparse-MoE key (`tmoe_jax.moe.settings.MoEConfig`) to a `model` section, with its default."""
  model.num_experts = 4
  model.top_k = 2
  model.capacity_factor = 1.25  # expert slots per (token, choice) in training; overflow is dropped
  model.eval_capacity_factor = 2.0
  model.normalize_gates = True  # rescale the top-k gates to sum to 1 (k > 1)
  model.router = "top_k"  # or "expert_choice" (not causal: encoder layers only)
  model.softmax_order = "before"  # softmax then top-k (Switch/GShard); "after": Mixtral
  model.router_dtype = "float32"  # or "model": the router matmul in the compute dtype (HF checkpoints)
  model.router_jitter = 0.0  # multiplicative noise on router logits in training
  model.batch_prioritized = False  # capacity goes to the most confident tokens first
  model.expert_bias_rate = 0.0  # > 0: DeepSeek-V3 auxiliary-loss-free balancing bias
  model.num_shared_experts = 0  # DeepSeekMoE always-on experts beside the routed ones
  model.shared_expert_type = "mlp"  # or "gated" (SwiGLU/GeGLU without biases, as Qwen2-MoE's)
  model.shared_expert_d_ff = 0  # the shared FFN's width; 0 = num_shared_experts * the experts' width
  model.shared_expert_gate = False  # Qwen2-MoE: scale the shared output by sigmoid(x w)
  model.dispatch = "capacity"  # or "dropless": no capacity, nothing dropped
  model.expert_type = "mlp"  # or "gated": SwiGLU with activation "silu", GeGLU with "gelu"
  # Capacity and drop order are decided per routing group of this many whole sequences
  # (0 = the whole batch is one group), so every device mesh trains the same model;
  # train.batch_size / (mesh.data * mesh.expert) must be a multiple of it to run expert-parallel.
  model.sequences_per_group = 4
  model.update(overrides)


def add_smoe_settings(model: ml_collections.ConfigDict, **overrides) -> None:
  """Adds every sMoE key (`tmoe_jax.moe.settings.SMoEConfig`, as `smoe_<field>`) with its default."""
  model.smoe_keep_rate = 0.5  # share of the shared FFN's hidden units each mask keeps
  # "gated_top1": the router's argmax; "sample_then_argmax": drawn from the router's softmax
  # for the first smoe_sample_steps training steps, then the argmax (the original sMoE).
  model.smoe_selection = "gated_top1"
  model.smoe_sample_steps = 1000
  model.smoe_mask_scaling = "keep_rate"  # kept units / keep_rate; or "mask_mean": / mean(mask)
  model.update(overrides)


def add_remat_setting(model: ml_collections.ConfigDict, remat: str = "none") -> None:
  """Adds `model.remat` (`tmoe_jax.models.blocks.REMATS`): what the backward pass recomputes of
  each block instead of keeping it from the forward pass. Same results, less memory, more time."""
  # "none" keeps everything; "full" keeps only each block's input; "save_dots" keeps every
  # matmul output; "save_dots_no_batch" only those of matmuls without batch dimensions (the
  # dense projections and FFNs, not attention scores nor per-expert matmuls).
  model.remat = remat


def mesh_section(data: int = -1, expert: int = 1, fsdp: int = 1) -> ml_collections.ConfigDict:
  """Device mesh: the batch split over data * fsdp * expert devices, every weight (and its Adam
  moments) over `fsdp`, experts over `expert` (-1 = the rest of the devices)."""
  mesh = ml_collections.ConfigDict()
  mesh.data = data
  mesh.fsdp = fsdp
  mesh.expert = expert
  return mesh


def distributed_section() -> ml_collections.ConfigDict:
  """Multi-process settings (`tmoe_jax.parallel.distributed`); all unset = one process, or
  whatever the cluster's environment (SLURM, Open MPI, Cloud TPU, JAX_* variables) says."""
  from tmoe_jax.parallel import distributed

  return distributed.default_config()
