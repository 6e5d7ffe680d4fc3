"""Experiments as `training.task.Task`s (`TASKS`, by `config.task` name) and the runner that trains them."""

from tmoe_jax.tasks.table import TASKS

__all__ = ["TASKS"]
