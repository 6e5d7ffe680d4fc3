"""Load a trained run of any task from its workdir: the config, the restored model and the task's call.

```python
import tmoe_jax

run = tmoe_jax.load("runs/tmoe")              # newest readable checkpoint; step=N for another
run.translate(["3/3/98", "tue 3 mar 1998"])   # -> ["1998-03-03", "1998-03-03"]
logits, moe_aux = run.model(source_ids, decoder_input_ids)
tmoe_jax.load("runs/mnist_moe").classify(images_NxHxW)           # -> int labels [N]
tmoe_jax.load("runs/smoe_lm").generate("def ", max_new_tokens=40)  # -> str
```

Everything comes from the workdir: `config.json` (the full resolved config the
run was trained with), the files its task wrote (e.g. `vocabulary.json`) and
`checkpoints/<step>/`. Only the `eval` section may be changed (`eval_overrides`):
the other sections fix the parameter shapes, the token ids and the data, which
the checkpoint must match. The common part (config, task, read-only restore) is
here; `tasks.table.LOADED_RUNS` gives each task's natural call (`tasks.loaded_runs`).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tmoe_jax.errors import ConfigError, WorkdirError
from tmoe_jax.tasks import runner
from tmoe_jax.tasks.loaded_runs import LoadedRun
from tmoe_jax.tasks.table import LOADED_RUNS
from tmoe_jax.training import checkpointing
from tmoe_jax.training import workdir as workdir_files
from tmoe_jax.training.optimizer import make_optimizer
from tmoe_jax.training.run_fields import TRAIN_LOOP_FIELDS
from tmoe_jax.training.state import TrainState
from tmoe_jax.training.task import Task
from tmoe_jax.validation import validate_fields

# The config section that may differ from the one the run was trained with.
OVERRIDABLE_SECTION = "eval"


def check_workdir(workdir: str | pathlib.Path) -> pathlib.Path:
  workdir = pathlib.Path(workdir)
  if not workdir.exists():
    raise WorkdirError(f"{workdir}: no such workdir")
  if not workdir.is_dir():
    raise WorkdirError(f"{workdir}: the workdir is a file, not a directory")
  return workdir


def read_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The resolved config saved in `<workdir>/config.json`, as a locked ConfigDict."""
  path = check_workdir(workdir) / workdir_files.CONFIG_FILE
  if not path.is_file():
    raise WorkdirError(f"{path}: missing; was this workdir written by `python -m train`?")
  config = ml_collections.ConfigDict(workdir_files.read_saved_config_json(path))
  config.lock()
  return config


def _check_override_type(field: str, old: Any, new: Any) -> Any:
  """`new` converted to the type of `old` where that loses nothing (int -> float); else ConfigError."""
  if isinstance(old, bool) or isinstance(new, bool):
    ok = isinstance(old, bool) and isinstance(new, bool)
  elif isinstance(old, float):
    ok = isinstance(new, (int, float))
    new = float(new) if ok else new
  else:
    ok = isinstance(new, type(old))
  if not ok:
    raise ConfigError(f"{field}: expected {type(old).__name__}, got {new!r} ({type(new).__name__})")
  return new


def with_eval_overrides(
  config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  """A copy of `config` with the given `eval.<name>` fields replaced, checked like the training config.

  overrides: {"eval.beam_size": 4, ...}; a field of another section raises ConfigError
    naming it, since the checkpoint fixes those.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  for field, value in overrides.items():
    section, _, name = field.partition(".")
    if section != OVERRIDABLE_SECTION:
      raise ConfigError(
        f"{field}: only {OVERRIDABLE_SECTION}.* fields can be changed for a trained run; "
        "the others are fixed by its checkpoint and config.json"
      )
    if name not in config[section]:
      raise ConfigError(f"{field}: no such field; {section} has {sorted(config[section])}")
    config[section][name] = _check_override_type(field, config[section][name], value)
  validate_fields(config, TRAIN_LOOP_FIELDS)
  config.lock()
  return config


def load_task(workdir: str | pathlib.Path, config) -> Task:
  """The run's task, rebuilt from its config with the files its training wrote (e.g. the vocabulary)."""
  task = runner.make_task(config)
  task.read_files(check_workdir(workdir))
  return task


def abstract_train_state(config, build_model: Callable[[], nnx.Module]) -> tuple[nnx.GraphDef, TrainState]:
  """The graph definition and the shapes of the TrainState `config` trains, without computing any values."""
  abstract_model = nnx.eval_shape(build_model)
  graphdef, params, model_state = nnx.split(abstract_model, nnx.Param, ...)
  optimizer = make_optimizer(config.train)

  def init(params, model_state):
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      model_state=model_state,
      opt_state=optimizer.init(params),
      rng=jax.random.PRNGKey(0),
    )

  abstract_state = jax.eval_shape(init, params, model_state)
  # Place every restored array on the default device (eval_shape gives no sharding).
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract_state = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_state
  )
  return graphdef, abstract_state


def restore_train_state(
  workdir: str | pathlib.Path, config, task: Task, step: int | None = None
) -> tuple[nnx.GraphDef, TrainState]:
  """Restores `<workdir>/checkpoints/<step>` (default: the newest readable one), read-only."""
  directory = check_workdir(workdir) / workdir_files.CHECKPOINT_DIR
  if not directory.is_dir():
    raise WorkdirError(f"{directory}: no checkpoints in this workdir")
  graphdef, abstract_state = abstract_train_state(config, lambda: task.build_model(None))
  manager = checkpointing.make_manager(directory, max_to_keep=config.train.keep_checkpoints, read_only=True)
  try:
    return graphdef, checkpointing.restore(manager, abstract_state, step, renames=task.parameter_renames)
  finally:
    manager.close()


def load(
  workdir: str | pathlib.Path, step: int | None = None, *, eval_overrides: Mapping[str, Any] | None = None
) -> LoadedRun:
  """Restores the run in `workdir` at `step` (default: the newest checkpoint that can be read).

  Returns the task's class of `tasks.table.LOADED_RUNS` (`tasks.loaded_runs`): e.g. `translate` for
  seq2seq, `classify` for the classifiers, `generate` and `score` for the language model,
  `predict` for regression.

  eval_overrides: {"eval.beam_size": 4, ...} changes evaluation settings (decoding, batch
    size); other sections raise ConfigError. Raises WorkdirError for a missing or unreadable
    workdir or checkpoint.
  """
  config = with_eval_overrides(read_config(workdir), eval_overrides or {})
  task = load_task(workdir, config)
  if config.task not in LOADED_RUNS:
    raise ConfigError(f"task: can load runs of {sorted(LOADED_RUNS)}, not {config.task!r}")
  graphdef, state = restore_train_state(workdir, config, task, step)
  return LOADED_RUNS[config.task].from_task(task, graphdef, state)
