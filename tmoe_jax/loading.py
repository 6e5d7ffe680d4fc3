"""Load a trained run from its workdir: the config, the vocabulary and the restored model.

```python
import tmoe_jax

run = tmoe_jax.load("runs/tmoe")              # newest readable checkpoint; step=N for another
run.translate(["3/3/98", "tue 3 mar 1998"])   # -> ["1998-03-03", "1998-03-03"]
logits, moe_aux = run.model(source_ids, decoder_input_ids)
```

Everything comes from the workdir: `config.json` (the full resolved config the
run was trained with), `vocabulary.json` and `checkpoints/<step>/`. Only the
`eval` section may be changed (`eval_overrides`): the other sections fix the
parameter shapes, the token ids and the data, which the checkpoint must match.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tmoe_jax.config import TRAIN_LOOP_FIELDS, validate_fields
from tmoe_jax.data.subword import SubwordVocabulary
from tmoe_jax.data.vocabulary import CharVocabulary
from tmoe_jax.errors import ConfigError, DataError, WorkdirError
from tmoe_jax.tasks import runner
from tmoe_jax.training import checkpointing
from tmoe_jax.training import seq2seq_steps as steps
from tmoe_jax.training import workdir as workdir_files
from tmoe_jax.training.optimizer import make_optimizer
from tmoe_jax.training.state import TrainState
from tmoe_jax.training.task import Task
from tmoe_jax.transformer import Transformer

# The config section that may differ from the one the run was trained with.
OVERRIDABLE_SECTION = "eval"
LOADABLE_TASKS = ("seq2seq",)


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
    return graphdef, checkpointing.restore(manager, abstract_state, step)
  finally:
    manager.close()


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedRun:
  """A trained run, restored from its workdir.

  config: the run's resolved config (locked), with any eval overrides applied.
  model: the Transformer with the checkpoint's parameters and non-parameter state.
  vocabulary: the vocabulary (characters or subwords) the model's token ids refer to.
  step: the training step of the restored checkpoint.
  max_source_length / max_target_length: the padded lengths (EOS included) the
    model was trained on; `translate` pads sources to, and decodes up to, them.
  """

  config: ml_collections.ConfigDict
  model: Transformer
  vocabulary: CharVocabulary | SubwordVocabulary
  step: int
  max_source_length: int
  max_target_length: int
  _decode: Callable = dataclasses.field(repr=False, compare=False)

  def source_length(self, text: str) -> int:
    """How many ids `text` encodes to, EOS included; `translate` accepts up to `max_source_length`."""
    return len(self.vocabulary.encode(text))

  def translate(self, texts: Sequence[str]) -> list[str]:
    """Decodes each text (greedy, or beam search when config.eval.beam_size > 1); one output per input.

    Raises DataError naming the first text longer than `max_source_length` ids.
    """
    if isinstance(texts, str):
      raise DataError("translate takes a list of strings, not one str")
    texts = list(texts)
    for index, text in enumerate(texts):
      if not isinstance(text, str):
        raise DataError(f"texts[{index}]: expected str, got {type(text).__name__}")
      length = self.source_length(text)
      if length > self.max_source_length:
        raise DataError(
          f"texts[{index}] {text[:60]!r}: {length} tokens with EOS; this model reads at most "
          f"{self.max_source_length}"
        )
    if not texts:
      return []
    graphdef, params, model_state = nnx.split(self.model, nnx.Param, ...)
    del graphdef  # fixed when the decoder was compiled
    outputs = []
    batch_size = self.config.eval.batch_size
    for start in range(0, len(texts), batch_size):
      chunk = texts[start : start + batch_size]
      source_BxS = self.vocabulary.encode_batch(chunk, self.max_source_length)
      # Pad the batch by repeating its first row (a row of padding would attend to nothing),
      # to a power of two so that few batch shapes are ever compiled.
      padded_rows = min(batch_size, 1 << (len(chunk) - 1).bit_length())
      source_BxS = np.concatenate([source_BxS, np.repeat(source_BxS[:1], padded_rows - len(chunk), axis=0)])
      decoded_BxL = np.asarray(self._decode(params, model_state, source_BxS))
      outputs.extend(self.vocabulary.decode(row) for row in decoded_BxL[: len(chunk)])
    return outputs


def load(
  workdir: str | pathlib.Path, step: int | None = None, *, eval_overrides: Mapping[str, Any] | None = None
) -> LoadedRun:
  """Restores the run in `workdir` at `step` (default: the newest checkpoint that can be read).

  eval_overrides: {"eval.beam_size": 4, ...} changes decoding settings; other sections
    raise ConfigError. Raises WorkdirError for a missing or unreadable workdir or checkpoint.
  """
  config = with_eval_overrides(read_config(workdir), eval_overrides or {})
  if config.get("task") not in LOADABLE_TASKS:
    raise ConfigError(f"task: can load runs of {list(LOADABLE_TASKS)}, not {config.get('task')!r}")
  task = load_task(workdir, config)
  data, vocabulary = task.data, task.data.vocabulary
  graphdef, state = restore_train_state(workdir, config, task, step)
  decode = steps.jit_decode(
    graphdef,
    max_length=data.max_target_length,
    beam_size=config.eval.beam_size,
    bos_id=vocabulary.BOS_ID,
    eos_id=vocabulary.EOS_ID,
    length_penalty=config.eval.length_penalty,
  )
  return LoadedRun(
    config=config,
    model=nnx.merge(graphdef, state.params, state.model_state),
    vocabulary=vocabulary,
    step=int(state.step),
    max_source_length=data.max_source_length,
    max_target_length=data.max_target_length,
    _decode=decode,
  )
