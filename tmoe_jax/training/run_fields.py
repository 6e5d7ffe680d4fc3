"""The checked fields of the run settings every experiment shares (train, eval, mesh sections).

Each rule is (dotted field, accepted types, predicate, what it must be); the
loop checks them with `validation.validate_fields`, which raises ConfigError
naming the first bad field. A task checks its own fields (model, data) itself.
"""

from __future__ import annotations

from tmoe_jax.validation import FieldRule

# The run settings every experiment shares; the model section is checked by the task.
TRAIN_LOOP_FIELDS: tuple[FieldRule, ...] = (
  ("train.num_steps", int, lambda v: v >= 0, ">= 0"),
  ("train.batch_size", int, lambda v: v >= 1, ">= 1"),
  ("train.learning_rate", (int, float), lambda v: v > 0, "> 0"),
  ("train.warmup_steps", int, lambda v: v >= 0, ">= 0"),
  ("train.final_learning_rate_fraction", (int, float), lambda v: 0 <= v <= 1, "in [0, 1]"),
  ("train.adam_b1", (int, float), lambda v: 0 <= v < 1, "in [0, 1)"),
  ("train.adam_b2", (int, float), lambda v: 0 <= v < 1, "in [0, 1)"),
  ("train.weight_decay", (int, float), lambda v: v >= 0, ">= 0"),
  ("train.grad_clip_norm", (int, float), lambda v: v >= 0, ">= 0 (0 = off)"),
  ("train.seed", int, lambda v: v >= 0, ">= 0"),
  ("train.log_every", int, lambda v: v >= 1, ">= 1"),
  ("train.eval_every", int, lambda v: v >= 0, ">= 0 (0 = only at the end)"),
  ("train.checkpoint_every", int, lambda v: v >= 0, ">= 0 (0 = only at the end)"),
  ("train.keep_checkpoints", int, lambda v: v >= 1, ">= 1"),
  ("eval.batch_size", int, lambda v: v >= 1, ">= 1"),
  ("eval.num_examples_during_training", int, lambda v: v >= 1, ">= 1"),
  ("mesh.data", int, lambda v: v == -1 or v >= 1, ">= 1, or -1 for the remaining devices"),
  ("mesh.expert", int, lambda v: v == -1 or v >= 1, ">= 1, or -1 for the remaining devices"),
)
# The MoE auxiliary-loss weights, for every task whose model has MoE layers.
MOE_LOSS_FIELDS: tuple[FieldRule, ...] = (
  ("model.load_balancing_weight", (int, float), lambda v: v >= 0, ">= 0"),
  ("model.router_z_weight", (int, float), lambda v: v >= 0, ">= 0"),
)
# Where a task reads a named dataset (local files, or TFDS), and the seed of its own splits.
DATA_SOURCE_FIELDS: tuple[FieldRule, ...] = (
  ("data.name", str, lambda v: bool(v), "a dataset name (e.g. 'mnist', 'glue/mrpc')"),
  ("data.dir", str, lambda v: True, "a directory of local files, or empty"),
  ("data.tfds_data_dir", str, lambda v: True, "a TFDS data dir, or empty"),
  ("data.seed", int, lambda v: v >= 0, ">= 0"),
)
