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
# Keys of those sections that change how a step is computed, not what it computes: a run may
# resume with another value (rematerialisation recomputes the same activations).
CHANGEABLE_ON_RESUME = ("model.remat",)
# Keys a task's config gained after runs were written with it, each with the value that
# reproduces how those older runs behaved. A saved config.json without the key reads as
# if it had this value, so an old run resumes and loads unchanged.
KEYS_ADDED_LATER: dict[str, dict[str, Any]] = {
  # Before routing groups, capacity was decided over the whole batch: one group. Before
  # `model.remat`, every block kept its intermediates for the backward pass (same results).
  "seq2seq": {"model.sequences_per_group": 0, "model.remat": "none"},
  # Before the language model held a full MoEConfig, its top-k layers used these defaults.
  "language_model": {
    "model.sequences_per_group": 0,
    "model.normalize_gates": True,
    "model.router": "top_k",
    "model.softmax_order": "before",
    "model.router_jitter": 0.0,
    "model.batch_prioritized": False,
    "model.expert_bias_rate": 0.0,
    "model.num_shared_experts": 0,
    "model.expert_type": "mlp",
    "model.remat": "none",
  },
}
# The Transformer's sMoE settings before they were one `SMoEConfig` (only the keep rate was a key).
KEYS_ADDED_LATER["seq2seq"].update(
  {
    "model.smoe_selection": "gated_top1",
    "model.smoe_sample_steps": 1000,
    "model.smoe_mask_scaling": "keep_rate",
  }
)
# The shared experts' type, width and gate and the router's dtype came with the Hugging Face MoE
# families; before them, shared experts were one biased MLP of num_shared_experts * d_ff units,
# ungated, and the router was float32.
for _task in ("seq2seq", "language_model"):
  KEYS_ADDED_LATER[_task].update(
    {
      "model.shared_expert_type": "mlp",
      "model.shared_expert_d_ff": 0,
      "model.shared_expert_gate": False,
      "model.router_dtype": "float32",
    }
  )
# The decoder-only LM's first runs predate the router dtype setting and the test split (they
# reported validation).
KEYS_ADDED_LATER["causal_lm"] = {"model.router_dtype": "float32", "data.test_file": ""}
# Before the dates task had a validation split, every date outside the test bucket was a training
# date (and the test split was evaluated during training).
KEYS_ADDED_LATER["seq2seq"]["data.num_validation"] = 0
# Keys of KEYS_ADDED_LATER that only runs on some data have: {dotted key: data.name}.
KEYS_ONLY_FOR_DATA = {"data.num_validation": "dates"}

# Values a key accepted under an older name: {task: {dotted key: {old value: current value}}}.
# Saved and current configs are compared (on resume) with the current names.
VALUES_RENAMED: dict[str, dict[str, dict[Any, Any]]] = {
  # The feed-forward kinds became one table (`models.blocks.FEED_FORWARDS`): "sparse" is "moe".
  "seq2seq": {"model.moe_layer": {"sparse": "moe"}},
}


def _keys_missing_from(saved: dict[str, Any]) -> dict[str, Any]:
  """The KEYS_ADDED_LATER of the saved run's task that its config lacks, with their old values."""
  missing = {}
  data_name = saved.get("data", {}).get("name") if isinstance(saved.get("data"), dict) else None
  for dotted, value in KEYS_ADDED_LATER.get(saved.get("task"), {}).items():
    section, key = dotted.split(".")
    if KEYS_ONLY_FOR_DATA.get(dotted, data_name) != data_name:
      continue
    if isinstance(saved.get(section), dict) and key not in saved[section]:
      missing[dotted] = value
  return missing


def read_saved_config_json(path: pathlib.Path) -> dict[str, Any]:
  """The config a workdir was written with, as nested dicts; WorkdirError if it is not a JSON object."""
  try:
    saved = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise WorkdirError(f"{path}: cannot read the saved config ({error})") from error
  if not isinstance(saved, dict):
    raise WorkdirError(f"{path}: the saved config is not a JSON object")
  for dotted, value in _keys_missing_from(saved).items():
    section, key = dotted.split(".")
    saved[section][key] = value
  return with_current_value_names(saved)


def with_current_value_names(config: dict[str, Any]) -> dict[str, Any]:
  """`config` (nested dicts) with each value of `VALUES_RENAMED` under its current name, in place."""
  for dotted, names in VALUES_RENAMED.get(config.get("task"), {}).items():
    section, key = dotted.split(".")
    values = config.get(section)
    if isinstance(values, dict) and key in values and values[key] in names:
      values[key] = names[values[key]]
  return config


def adopt_keys_added_later(workdir: pathlib.Path, config) -> list[str]:
  """Sets, in `config`, each key the run saved in `workdir` predates to the value that run had.

  Resuming an old run then trains on as it started, whatever the newer default.
  Returns one line per key adopted, for a warning; [] for a new or current workdir.
  """
  path = workdir / CONFIG_FILE
  if not path.is_file():
    return []
  try:
    raw = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return []  # prepare_workdir reports the damaged file
  if not isinstance(raw, dict) or raw.get("task") != config.get("task"):
    return []
  notes = []
  for dotted, value in _keys_missing_from(raw).items():
    section, key = dotted.split(".")
    if section in config and key in config[section] and config[section][key] != value:
      notes.append(
        f"{dotted}: {path} predates this key; the run keeps the behaviour it was trained with, "
        f"{value!r} (not {config[section][key]!r})"
      )
      config[section][key] = value
  return notes


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
    current = with_current_value_names(current)
    differences = []
    for section in RESUME_INCOMPATIBLE_SECTIONS:
      old, new = _section(saved, section), _section(current, section)
      for key in sorted(set(old) | set(new)):
        name = f"{section}.{key}" if key else section
        if old.get(key) != new.get(key) and name not in CHANGEABLE_ON_RESUME:
          differences.append(f"{name}: saved {old.get(key)!r}, now {new.get(key)!r}")
    if differences:
      raise WorkdirError(
        f"{saved_path}: this workdir was written by an incompatible config; use another "
        "--workdir or the same settings. Differences: " + "; ".join(differences)
      )
  if write:
    reporting.write_text_atomic(saved_path, json.dumps(current, indent=2, sort_keys=True) + "\n")
