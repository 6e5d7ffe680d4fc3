"""The run directory: its fixed file names and the check that a rerun may resume it."""

from __future__ import annotations

import json
import pathlib
from typing import Any

from tmoe_jax.errors import WorkdirError
from tmoe_jax.training import reporting

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
# Sections that fix the shapes of the parameters or the meaning of the data:
# a workdir written with other values cannot be resumed.
RESUME_INCOMPATIBLE_SECTIONS = ("task", "model", "data")


def read_saved_config_json(path: pathlib.Path) -> dict[str, Any]:
  """The config a workdir was written with, as nested dicts; WorkdirError if it is not a JSON object."""
  try:
    saved = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise WorkdirError(f"{path}: cannot read the saved config ({error})") from error
  if not isinstance(saved, dict):
    raise WorkdirError(f"{path}: the saved config is not a JSON object")
  return saved


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
  value = config.get(name, {})
  # `task` is a plain string, the other sections are dicts of fields.
  return value if isinstance(value, dict) else {"": value}


def prepare_workdir(workdir: pathlib.Path, config, *, write: bool = True) -> None:
  """Creates the workdir, or checks that the config it was written with is compatible.

  `write=False` (processes other than the main one) only checks.
  """
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f"{workdir}: the workdir exists and is a file, not a directory")
  if write:
    workdir.mkdir(parents=True, exist_ok=True)
  saved_path = workdir / CONFIG_FILE
  current = json.loads(config.to_json())
  if saved_path.exists():
    saved = read_saved_config_json(saved_path)
    differences = []
    for section in RESUME_INCOMPATIBLE_SECTIONS:
      old, new = _section(saved, section), _section(current, section)
      for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
          name = f"{section}.{key}" if key else section
          differences.append(f"{name}: saved {old.get(key)!r}, now {new.get(key)!r}")
    if differences:
      raise WorkdirError(
        f"{saved_path}: this workdir was written by an incompatible config; use another "
        "--workdir or the same settings. Differences: " + "; ".join(differences)
      )
  if write:
    reporting.write_text_atomic(saved_path, json.dumps(current, indent=2, sort_keys=True) + "\n")
