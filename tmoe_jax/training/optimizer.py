"""Optax optimizer and learning-rate schedule from the `train` config section."""

from __future__ import annotations

import optax

from tmoe_jax.errors import ConfigError


def constant_schedule(train_config) -> optax.Schedule:
  return (
    optax.join_schedules(
      [
        optax.linear_schedule(0.0, train_config.learning_rate, train_config.warmup_steps),
        optax.constant_schedule(train_config.learning_rate),
      ],
      [train_config.warmup_steps],
    )
    if train_config.warmup_steps
    else optax.constant_schedule(train_config.learning_rate)
  )


def cosine_schedule(train_config) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=train_config.learning_rate,
    warmup_steps=train_config.warmup_steps,
    decay_steps=max(train_config.num_steps, train_config.warmup_steps + 1),
    end_value=train_config.learning_rate * train_config.final_learning_rate_fraction,
  )


SCHEDULES = {"constant": constant_schedule, "cosine": cosine_schedule}


def make_schedule(train_config) -> optax.Schedule:
  if train_config.schedule not in SCHEDULES:
    raise ConfigError(f"train.schedule: must be one of {sorted(SCHEDULES)}, got {train_config.schedule!r}")
  return SCHEDULES[train_config.schedule](train_config)


def make_optimizer(train_config) -> optax.GradientTransformation:
  """Adam (b1=0.9, b2=0.98 as in Vaswani et al.), optional global-norm clipping first."""
  adam = optax.adamw(
    learning_rate=make_schedule(train_config),
    b1=train_config.adam_b1,
    b2=train_config.adam_b2,
    eps=1e-9,
    weight_decay=train_config.weight_decay,
  )
  if train_config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm), adam)
  return adam
