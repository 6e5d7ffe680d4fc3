"""Orbax checkpoints of the TrainState under `<workdir>/checkpoints/<step>/`.

Saves are atomic (Orbax writes to a temporary directory and renames it), so a
crash mid-save leaves the previous checkpoints intact. Restoring needs an
abstract TrainState (shapes and dtypes) built from the current config.

Two ways a restore can fail are told apart, because they call for opposite
responses:
- the checkpoint's own metadata lists other array names or shapes than the
  current config builds: the config is wrong, not the files, so `WorkdirError`
  names the differences and nothing falls back;
- the metadata cannot be read, or the arrays it describes cannot (files deleted,
  truncated or overwritten): the checkpoint is damaged. Restoring the newest
  step then warns on stderr and falls back to the previous step; if no step can
  be read, `WorkdirError` names the directory rather than starting from scratch.

Parameters a later version of a model renamed are mapped on restore: a task
lists `(regex, replacement)` rules over dotted array names (`renames`), and a
checkpoint whose names match the current ones after them is read under its own
names and handed back under the current ones.
"""

from __future__ import annotations

import logging
import pathlib
import re
import sys
import traceback
from collections.abc import Sequence

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import tree as ocp_tree

from tmoe_jax.errors import WorkdirError
from tmoe_jax.training.state import TrainState

STATE_ITEM = "state"
# Damaged step directories are renamed to `<step>.corrupt` (Orbax ignores names that
# are not step numbers) so that training can write that step again.
CORRUPT_SUFFIX = ".corrupt"
_MAX_LISTED_DIFFERENCES = 5
# (regex over a dotted array name, replacement): how an older name reads today.
Renames = Sequence[tuple[str, str]]


class UnreadableCheckpointError(WorkdirError):
  """A checkpoint's files are missing, truncated or garbled."""


def make_manager(
  directory: str | pathlib.Path, *, max_to_keep: int, read_only: bool = False
) -> ocp.CheckpointManager:
  """A manager for `directory`; `read_only` ones create, clean up and delete nothing (evaluation, loading)."""
  directory = pathlib.Path(directory).absolute()
  if directory.exists() and not directory.is_dir():
    raise WorkdirError(f"{directory}: exists and is not a directory")
  # Not Orbax's own read_only option: it logs three warnings per manager. A manager
  # that never saves writes nothing; max_to_keep only acts on save.
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    create=not read_only,
    # Leftovers of saves a crash interrupted; they never count as steps.
    cleanup_tmp_directories=not read_only,
  )
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


def step_directory(manager: ocp.CheckpointManager, step: int) -> pathlib.Path:
  return pathlib.Path(manager.directory) / str(step)


def _short(error: BaseException) -> str:
  """The first line of an error, capped: TensorStore errors run to pages."""
  lines = str(error).strip().splitlines()
  # Orbax wraps TensorStore's error in one that points at a spec dump; the cause says more.
  text = lines[0].split(" See full TensorStore details")[0] if lines else ""
  if error.__cause__ is not None and "TensorStore" in str(error):
    text += f" ({_short(error.__cause__)})"
  text = f"{type(error).__name__}: {text}" if text else type(error).__name__
  return text if len(text) <= 240 else text[:237] + "..."


def current_name(name: str, renames: Renames) -> str:
  """The name a saved array has today, after each rename rule in turn."""
  for pattern, replacement in renames:
    name = re.sub(pattern, replacement, name)
  return name


def _arrays(flat: dict) -> dict:
  # Empty containers (e.g. optax's EmptyState) hold no data; only arrays must agree.
  return {name: leaf for name, leaf in flat.items() if hasattr(leaf, "shape")}


def _flat_abstract(abstract_state: TrainState) -> dict:
  # keep_empty_nodes: Orbax cannot serialize a list with an empty element otherwise.
  return ocp_tree.to_flat_dict(ocp_tree.serialize_tree(abstract_state, keep_empty_nodes=True), sep=".")


def _shape_differences(saved_metadata, abstract_state: TrainState, renames: Renames = ()) -> list[str]:
  """'name: saved (shape, dtype), now (shape, dtype)' for each array that differs or exists on one side only."""
  saved = {
    current_name(name, renames): leaf
    for name, leaf in _arrays(ocp_tree.to_flat_dict(saved_metadata, sep=".")).items()
  }
  current = _arrays(_flat_abstract(abstract_state))

  def describe(leaf):
    return f"{tuple(leaf.shape)} {leaf.dtype}"

  differences = []
  # Parameters first: they say what differs in the model; optimizer moments only repeat it.
  for name in sorted(set(saved) | set(current), key=lambda name: (not name.startswith("params."), name)):
    if name not in saved:
      differences.append(f"{name}: not in the checkpoint")
    elif name not in current:
      differences.append(f"{name}: in the checkpoint but not in the current model")
    elif describe(saved[name]) != describe(current[name]):
      differences.append(f"{name}: saved {describe(saved[name])}, now {describe(current[name])}")
  return differences


def _is_abandoned_read(unraisable) -> bool:
  """Whether an unraisable exception comes from the reads Orbax abandons when a restore fails.

  Those reads finish later, on an event loop that is already closed, and Python would
  print a traceback for each: the coroutines Orbax leaves behind, and TensorStore's
  completion callbacks calling `call_soon_threadsafe` on the closed loop.
  """
  code = getattr(unraisable.object, "cr_code", None)
  if code is not None and "orbax" in code.co_filename:
    return True
  if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
    frames = traceback.extract_tb(unraisable.exc_traceback)
    return any(frame.name == "call_soon_threadsafe" for frame in frames)
  return False


class _AbandonedReadLogFilter(logging.Filter):
  """asyncio's 'Task/Future exception was never retrieved' for the reads of a failed restore.

  Which of the two asyncio reports depends on timing: an Orbax coroutine (a Task, named
  by its orbax source file) or a bare TensorStore read future (named by its tensorstore
  spec). Other never-retrieved exceptions get through.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    leftover = message.startswith(
      ("Task exception was never retrieved", "Future exception was never retrieved")
    )
    return not (leftover and ("orbax" in message or "tensorstore_spec" in message))


def _silence_abandoned_reads() -> None:
  """Drops the tracebacks of a failed restore's leftover reads; the failure itself is reported.

  Installed once per process, at the first restore; a restore that succeeds leaves
  no such reads, and other unraisable exceptions and asyncio messages get through.
  """
  asyncio_logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _AbandonedReadLogFilter) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_AbandonedReadLogFilter())
  if getattr(sys.unraisablehook, "is_tmoe_filter", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_abandoned_read(unraisable):
      previous(unraisable)

  hook.is_tmoe_filter = True
  sys.unraisablehook = hook


def _read(manager: ocp.CheckpointManager, step: int, target):
  directory = step_directory(manager, step)
  try:
    restored = manager.restore(
      step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)})
    )
  except Exception as error:  # TensorStore raises plain Exception for unreadable data
    raise UnreadableCheckpointError(f"{directory}: cannot read the checkpoint ({_short(error)})") from error
  return restored[STATE_ITEM]


def _read_renamed(
  manager: ocp.CheckpointManager, step: int, saved_tree, abstract_state: TrainState, renames: Renames
) -> TrainState:
  """Reads arrays under their saved names (each shaped and placed as its current name asks), then
  hands them back in the structure of `abstract_state`."""
  serialized = ocp_tree.serialize_tree(abstract_state, keep_empty_nodes=True)
  current = ocp_tree.to_flat_dict(serialized)  # {path tuple: abstract leaf}
  current_paths = {".".join(map(str, path)): path for path in current}
  saved = _arrays(ocp_tree.to_flat_dict(saved_tree))

  def current_path(saved_path):
    return current_paths[current_name(".".join(map(str, saved_path)), renames)]

  # The saved structure (its lists stay lists), with the current shapes, dtypes and shardings.
  target = ocp_tree.from_flat_dict({path: current[current_path(path)] for path in saved}, target=saved_tree)
  restored = _arrays(ocp_tree.to_flat_dict(_read(manager, step, target)))
  renamed = {**current, **{current_path(path): value for path, value in restored.items()}}
  return ocp_tree.deserialize_tree(
    ocp_tree.from_flat_dict(renamed, target=serialized), abstract_state, keep_empty_nodes=True
  )


def _restore_step(
  manager: ocp.CheckpointManager, abstract_state: TrainState, step: int, renames: Renames = ()
) -> TrainState:
  """Restores one step; raises WorkdirError (config mismatch) or UnreadableCheckpointError (damage)."""
  # Before reading, not after a failure: the leftover reads may finish before the error reaches us.
  _silence_abandoned_reads()
  directory = step_directory(manager, step)
  try:
    metadata = ocp.StandardCheckpointHandler().metadata(directory / STATE_ITEM)
    saved_tree = metadata.tree
  except Exception as error:  # any failure to read the metadata means damaged files
    raise UnreadableCheckpointError(
      f"{directory}: cannot read the checkpoint metadata ({_short(error)})"
    ) from error
  differences = _shape_differences(saved_tree, abstract_state, renames)
  if differences:
    listed = "; ".join(differences[:_MAX_LISTED_DIFFERENCES])
    more = len(differences) - _MAX_LISTED_DIFFERENCES
    raise WorkdirError(
      f"{directory}: checkpoint does not match the current model config "
      f"(was it written with other model settings?): {listed}" + (f"; and {more} more" if more > 0 else "")
    )
  saved_names = _arrays(ocp_tree.to_flat_dict(saved_tree, sep="."))
  if any(current_name(name, renames) != name for name in saved_names):
    return _read_renamed(manager, step, saved_tree, abstract_state, renames)
  return _read(manager, step, abstract_state)


def _set_aside(manager: ocp.CheckpointManager, step: int) -> pathlib.Path:
  """Renames a damaged step directory out of Orbax's view, never overwriting an earlier one."""
  source = step_directory(manager, step)
  target = source.with_name(f"{step}{CORRUPT_SUFFIX}")
  attempt = 1
  while target.exists():
    target = source.with_name(f"{step}{CORRUPT_SUFFIX}-{attempt}")
    attempt += 1
  source.rename(target)
  return target


def restore(
  manager: ocp.CheckpointManager,
  abstract_state: TrainState,
  step: int | None = None,
  *,
  set_aside_unreadable: bool = False,
  renames: Renames = (),
) -> TrainState:
  """Restores a checkpoint into the structure of `abstract_state`.

  step: that step exactly (WorkdirError if it is missing or unreadable); None: the
    newest step that can be read, warning on stderr about each newer one that cannot.
  set_aside_unreadable: rename the unreadable newer steps to `<step>.corrupt`, so a
    resumed run can save those steps again (training sets it; read-only loading does not).
  renames: rules mapping older array names to current ones (see the module docstring).
  """
  available = sorted(manager.all_steps(), reverse=True)
  if not available:
    raise WorkdirError(f"{manager.directory}: no checkpoint to restore")
  if step is not None:
    if step not in available:
      raise WorkdirError(f"{manager.directory}: no checkpoint at step {step}; available: {sorted(available)}")
    return _restore_step(manager, abstract_state, step, renames)

  unreadable = []
  for candidate in available:
    try:
      state = _restore_step(manager, abstract_state, candidate, renames)
    except UnreadableCheckpointError as error:
      older = [s for s in available if s < candidate]
      fallback = f"falling back to step {older[0]}" if older else "no older checkpoint to fall back to"
      sys.stderr.write(f"warning: {error}; {fallback}\n")
      unreadable.append(candidate)
      continue
    if set_aside_unreadable and unreadable:
      for bad_step in unreadable:
        moved_to = _set_aside(manager, bad_step)
        sys.stderr.write(f"warning: moved the unreadable checkpoint {bad_step} to {moved_to}\n")
      manager.reload()
    return state
  raise WorkdirError(
    f"{manager.directory}: none of the checkpoints (steps {sorted(available)}) can be read; "
    "move the directory away to start from scratch"
  )
