"""Orbax checkpoints of the TrainState under `<workdir>/checkpoints/<step>/`.

Saves are atomic (Orbax writes to a temporary directory and renames it), so a
crash mid-save leaves the previous checkpoints intact. Restoring needs an
abstract TrainState (shapes and dtypes) built from the current config; a
checkpoint whose shapes disagree raises `WorkdirError` naming the directory.
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

from tmoe_jax.errors import WorkdirError
from tmoe_jax.training.state import TrainState

STATE_ITEM = "state"


def make_manager(directory: str | pathlib.Path, *, max_to_keep: int) -> ocp.CheckpointManager:
  directory = pathlib.Path(directory).absolute()
  if directory.exists() and not directory.is_dir():
    raise WorkdirError(f"{directory}: exists and is not a directory")
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, state: TrainState, *, wait: bool = False) -> None:
  """Saves `state` at its own step (asynchronously unless `wait`); a step already saved is skipped."""
  step = int(state.step)
  if step in manager.all_steps():
    return
  manager.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state)}), force=True)
  if wait:
    manager.wait_until_finished()


def abstract_like(state: TrainState) -> TrainState:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def restore(
  manager: ocp.CheckpointManager, abstract_state: TrainState, step: int | None = None
) -> TrainState:
  """Restores the checkpoint at `step` (default: newest) into the structure of `abstract_state`."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise WorkdirError(f"{manager.directory}: no checkpoint to restore")
  try:
    restored = manager.restore(
      step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state)})
    )
  except (ValueError, KeyError, TypeError) as error:
    raise WorkdirError(
      f"{manager.directory}/{step}: checkpoint does not match the current model config "
      f"(was it written with other model settings?): {error}"
    ) from error
  return restored[STATE_ITEM]
