"""Builds the task an experiment config names (`config.task`), trains it and prints its results."""

from __future__ import annotations

import pathlib
import sys
from typing import Any

from tmoe_jax.errors import ConfigError
from tmoe_jax.parallel import distributed
from tmoe_jax.tasks.table import TASKS
from tmoe_jax.training import loop
from tmoe_jax.training import workdir as workdir_files
from tmoe_jax.training.task import Task


def make_task(config) -> Task:
  """The `Task` named by `config.task`, built (and its config sections validated) from `config`."""
  if "task" not in config or config.task not in TASKS:
    raise ConfigError(f"task: must be one of {sorted(TASKS)}, got {config.get('task')!r}")
  return TASKS[config.task](config)


def train(config, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Trains and evaluates the experiment `config` describes in `workdir`; returns its results.

  A workdir written before some config keys existed resumes with the values it was trained with.
  """
  for note in workdir_files.adopt_keys_added_later(pathlib.Path(workdir), config):
    sys.stderr.write(f"warning: {note}\n")
  return loop.train_and_evaluate(config, workdir, make_task(config))


def run(config, workdir: str) -> dict[str, Any]:
  results = train(config, workdir)
  if not distributed.is_main_process():
    return results
  print(f"results ({workdir}/results.txt):")
  for name, value in results.items():
    print(f"  {name}: {value}")
  return results
