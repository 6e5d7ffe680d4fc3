"""Picks the trainer for an experiment config (`config.task`) and prints its results."""

from __future__ import annotations

from typing import Any, Callable

from tmoe_jax.errors import ConfigError
from tmoe_jax.training import seq2seq_trainer

TRAINERS: dict[str, Callable[..., dict[str, Any]]] = {"seq2seq": seq2seq_trainer.train_and_evaluate}


def run(config, workdir: str) -> dict[str, Any]:
  if "task" not in config or config.task not in TRAINERS:
    raise ConfigError(f"task: must be one of {sorted(TRAINERS)}, got {config.get('task')!r}")
  results = TRAINERS[config.task](config, workdir)
  print(f"results ({workdir}/results.txt):")
  for name, value in results.items():
    print(f"  {name}: {value}")
  return results
