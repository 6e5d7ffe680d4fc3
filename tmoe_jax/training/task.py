"""What an experiment plugs into the generic training loop (`training.loop`).

A `Task` owns its data, model, loss and evaluation; the loop owns everything
else (mesh, shardings, optimizer, checkpoints and resume, finiteness checks,
preemption, metrics.jsonl / TensorBoard / results.txt). A task is built from the
full run config and must validate the sections it reads in `__init__`, raising
ConfigError naming the field.
"""

from __future__ import annotations

import abc
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from tmoe_jax.moe.statistics import MoEAux
from tmoe_jax.training.state import TrainState

# (state, split, num_examples or None for all) -> float metrics of that split.
Evaluator = Callable[[TrainState, str, int | None], dict[str, Any]]


class Task(abc.ABC):
  """One experiment. Subclasses set `eval_split`, `throughput_unit` and implement the abstract methods."""

  eval_split: str = "test"  # the split the run reports: evaluated once, by the final weights
  # The split evaluated every `train.eval_every` steps, where choices may look: a validation split,
  # never the reported test split (it may equal `eval_split` when that is a validation split, as
  # for the language models). None: the task has none, and nothing is evaluated during training.
  validation_split: str | None = None
  throughput_unit: str = "examples"  # train rows log `<unit>_per_second`
  # Whether `build_model` splits MoE experts over the mesh's 'expert' axis; if not, the
  # loop refuses mesh.expert > 1 rather than silently replicating the experts.
  expert_parallel: bool = False
  # (regex, replacement) rules from parameter names older versions of the model saved to the
  # current ones (`checkpointing.restore`), so that old runs resume and load.
  parameter_renames: tuple[tuple[str, str], ...] = ()

  def __init__(self, config):
    self.config = config

  @abc.abstractmethod
  def build_model(self, mesh) -> nnx.Module:
    """The model with fresh parameters from `config.train.seed`; `mesh` for expert-parallel layers."""

  @abc.abstractmethod
  def train_batch(self, step: int, rows: slice) -> dict[str, np.ndarray]:
    """Rows `rows` of the global training batch of `step`: a pure function of (seed, step)."""

  @abc.abstractmethod
  def loss(
    self, model: nnx.Module, batch: dict[str, jax.Array], rngs: nnx.Rngs, step: jax.Array
  ) -> tuple[jax.Array, dict[str, jax.Array], tuple[MoEAux, ...]]:
    """Traced inside the jitted train step: (task loss, float metrics, MoEAux per MoE layer)."""

  @abc.abstractmethod
  def make_evaluator(self, graphdef: nnx.GraphDef) -> Evaluator:
    """Builds (and jits) the evaluation of a TrainState on a named split."""

  @abc.abstractmethod
  def headline_results(self, evaluation: dict[str, Any]) -> dict[str, Any]:
    """The results.txt entries (named as the README promises) from the final evaluation."""

  def count_units(self, batch: dict[str, np.ndarray]) -> int:
    """How many throughput units (examples or tokens) `batch` holds."""
    return len(next(iter(batch.values())))

  def check_model(self, model: nnx.Module) -> None:
    """Raises ConfigError when the built model cannot take this task's data."""

  def write_files(self, workdir: pathlib.Path) -> None:
    """Writes what a restored model needs besides its checkpoint (e.g. the vocabulary)."""

  def read_files(self, workdir: pathlib.Path) -> None:
    """Reads back what `write_files` wrote (called before `build_model` when resuming or loading a
    run), so that a restored model sees exactly the ids it was trained with; raise WorkdirError
    when they are missing or disagree with the data."""

  def after_train_step(self, step: int, state: TrainState, batch: dict[str, np.ndarray]) -> None:
    """Called after each step with the new state and this process's rows of the batch (e.g. to log
    gate activations). In a multi-process run it is called on every process, since a jitted
    computation over the global state needs all of them; write files only where
    `distributed.is_main_process()`."""

  def finish(self, workdir: pathlib.Path, state: TrainState, graphdef: nnx.GraphDef) -> None:
    """Called once on the main process after the final evaluation (plots, extra files)."""
