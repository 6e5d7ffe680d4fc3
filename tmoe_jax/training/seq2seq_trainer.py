"""Train and evaluate the Transformer-MoE seq2seq model: the loop around the pure steps.

`train_and_evaluate(config, workdir)` validates the config, resumes from the
newest checkpoint in `workdir` if there is one, trains to `train.num_steps`,
evaluates, and writes config.json, vocabulary.json, metrics.jsonl,
results.txt, loss_curve.png and checkpoints/ into the workdir.

Crash safety: files are replaced atomically and metrics rows past the restored
step are dropped, so a run killed at any point and rerun ends as an
uninterrupted one would. Every step reports whether its loss, gradients and new
state are finite; the host reads those flags before any row, evaluation or
checkpoint depends on them and stops with TrainingDivergedError otherwise.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax
import numpy as np
import tqdm
from flax import nnx

from tmoe_jax.config import TransformerConfig, validate_run_config
from tmoe_jax.data import batching
from tmoe_jax.data.seq2seq import Seq2SeqData, Seq2SeqSplit, load_seq2seq_data, make_batch
from tmoe_jax.data.vocabulary import CharVocabulary
from tmoe_jax.errors import ConfigError, TmoeError, WorkdirError
from tmoe_jax.parallel.mesh import check_batch_divisible, make_mesh
from tmoe_jax.parallel.sharding import train_state_shardings
from tmoe_jax.training import checkpointing, reporting
from tmoe_jax.training import seq2seq_steps as steps
from tmoe_jax.training.optimizer import make_optimizer, make_schedule
from tmoe_jax.training.preemption import PreemptionGuard
from tmoe_jax.training.state import TrainState, count_params, create_train_state
from tmoe_jax.transformer import Transformer

CONFIG_FILE = "config.json"
VOCABULARY_FILE = "vocabulary.json"
CHECKPOINT_DIR = "checkpoints"
# Sections that fix the shapes of the parameters or the meaning of token ids:
# a workdir written with other values cannot be resumed.
RESUME_INCOMPATIBLE_SECTIONS = ("model", "data")


class TrainingDivergedError(TmoeError):
  """The loss, gradients or train state became non-finite."""


def read_saved_config_json(path: pathlib.Path) -> dict[str, Any]:
  """The config a workdir was written with, as nested dicts; WorkdirError if it is not a JSON object."""
  try:
    saved = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise WorkdirError(f"{path}: cannot read the saved config ({error})") from error
  if not isinstance(saved, dict):
    raise WorkdirError(f"{path}: the saved config is not a JSON object")
  return saved


def prepare_workdir(workdir: pathlib.Path, config) -> None:
  """Creates the workdir, or checks that the config it was written with is compatible."""
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f"{workdir}: the workdir exists and is a file, not a directory")
  workdir.mkdir(parents=True, exist_ok=True)
  saved_path = workdir / CONFIG_FILE
  current = json.loads(config.to_json())
  if saved_path.exists():
    saved = read_saved_config_json(saved_path)
    differences = [
      f"{section}.{key}: saved {saved.get(section, {}).get(key)!r}, now {current[section].get(key)!r}"
      for section in RESUME_INCOMPATIBLE_SECTIONS
      for key in sorted(set(saved.get(section, {})) | set(current[section]))
      if saved.get(section, {}).get(key) != current[section].get(key)
    ]
    if differences:
      raise WorkdirError(
        f"{saved_path}: this workdir was written by an incompatible config; use another "
        "--workdir or the same settings. Differences: " + "; ".join(differences)
      )
  reporting.write_text_atomic(saved_path, json.dumps(current, indent=2, sort_keys=True) + "\n")


def build_model(config, vocab_size: int, seed: int, mesh=None) -> Transformer:
  """The Transformer of `config.model`; with a multi-device `mesh` its MoE layers run expert-parallel."""
  model_config = TransformerConfig.from_config(config.model, vocab_size=vocab_size, mesh=mesh)
  return Transformer(model_config, rngs=nnx.Rngs(params=seed))


def evaluate(
  state: TrainState,
  split: Seq2SeqSplit,
  vocabulary: CharVocabulary,
  eval_config,
  *,
  num_examples: int | None = None,
  eval_fn,
  decode_fn,
) -> dict[str, float]:
  """Teacher-forced loss and token accuracy, and exact match / token accuracy of decoded outputs."""
  num_examples = len(split) if num_examples is None else min(num_examples, len(split))
  loss_sum = correct_forced = forced_tokens = 0.0
  exact = correct_decoded = target_tokens = 0
  for indices, num_valid in batching.sequential_batches(num_examples, eval_config.batch_size):
    batch = make_batch(split, indices, vocabulary.BOS_ID)
    # Padding rows repeat example 0: zero their targets so they add nothing to the sums.
    batch["target"][num_valid:] = 0
    sums = jax.device_get(eval_fn(state.params, state.model_state, batch))
    loss_sum += float(sums["loss_sum"])
    correct_forced += float(sums["correct_tokens"])
    forced_tokens += float(sums["num_tokens"])
    decoded = np.asarray(decode_fn(state.params, state.model_state, batch["source"]))[:num_valid]
    targets = batch["target"][:num_valid]
    valid = targets != 0
    exact += int(np.sum(np.all((decoded == targets) | ~valid, axis=1)))
    correct_decoded += int(np.sum((decoded == targets) & valid))
    target_tokens += int(np.sum(valid))
  return {
    "loss": loss_sum / max(forced_tokens, 1.0),
    "teacher_forced_accuracy": correct_forced / max(forced_tokens, 1.0),
    "exact_match": exact / max(num_examples, 1),
    "token_accuracy": correct_decoded / max(target_tokens, 1),
    "num_examples": num_examples,
  }


# What a step keeps for the host until its finiteness is checked: enough to say what went wrong.
_DIVERGENCE_METRICS = ("is_finite", "loss", "aux_loss", "grad_norm")
# Unchecked steps are checked anyway once this many pile up (a huge log_every, no checkpoints).
_MAX_UNCHECKED_STEPS = 256


def train_and_evaluate(config, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Trains (resuming if possible), evaluates on the test split and returns the results."""
  validate_run_config(config)
  if config.data.tfds_data_dir:
    raise ConfigError(f"data.tfds_data_dir: task {config.data.name!r} is generated in code; leave it empty")
  workdir = pathlib.Path(workdir)
  data: Seq2SeqData = load_seq2seq_data(config.data)
  mesh = make_mesh(config.mesh.data, config.mesh.expert)
  check_batch_divisible(config.train.batch_size, mesh)
  model = build_model(config, data.vocabulary.size, config.train.seed, mesh=mesh)
  if max(data.max_source_length, data.max_target_length) > model.config.max_length:
    raise ConfigError(
      f"model.max_length: must be >= the longest sequence "
      f"({max(data.max_source_length, data.max_target_length)}), got {model.config.max_length}"
    )
  prepare_workdir(workdir, config)
  reporting.write_text_atomic(workdir / VOCABULARY_FILE, data.vocabulary.to_json())

  train_config = config.train
  optimizer = make_optimizer(train_config)
  schedule = make_schedule(train_config)
  graphdef, state = create_train_state(model, optimizer, train_config.seed)
  state_shardings = train_state_shardings(state, mesh)
  # Expert weights (and their Adam moments) live sharded on 'expert'; restoring into
  # this abstract state reads each array straight into its sharding, whatever mesh saved it.
  state = jax.device_put(state, state_shardings)
  num_params = count_params(state.params)
  # Closing waits for the saves in flight, also when training stops with an error.
  with checkpointing.make_manager(
    workdir / CHECKPOINT_DIR, max_to_keep=train_config.keep_checkpoints
  ) as manager:
    if manager.all_steps():
      # Falls back past damaged newer checkpoints (with a warning), never to a fresh start.
      state = checkpointing.restore(manager, checkpointing.abstract_like(state), set_aside_unreadable=True)
      print(f"resumed from {manager.directory}/{int(state.step)}")
    start_step = int(state.step)

    loss_weights = steps.LossWeights(
      train_config.label_smoothing, config.model.load_balancing_weight, config.model.router_z_weight
    )
    train_step = steps.jit_train_step(
      graphdef, optimizer, schedule, loss_weights, state_shardings=state_shardings, mesh=mesh
    )
    eval_fn = steps.jit_eval_step(graphdef)
    decode_fn = steps.jit_decode(
      graphdef,
      max_length=data.max_target_length,
      beam_size=config.eval.beam_size,
      bos_id=data.vocabulary.BOS_ID,
      eos_id=data.vocabulary.EOS_ID,
      length_penalty=config.eval.length_penalty,
    )
    writer = reporting.MetricsWriter(workdir, resume_step=start_step)
    train_split, test_split = data.splits["train"], data.splits["test"]

    def batch_at(step: int):
      indices = batching.example_indices(len(train_split), train_config.batch_size, train_config.seed, step)
      return make_batch(train_split, indices, data.vocabulary.BOS_ID)

    # Steps whose `is_finite` flag the host has not read yet, oldest first: (step, metrics).
    unchecked: list[tuple[int, dict[str, jax.Array]]] = []

    def check_finite(up_to_step: int) -> None:
      """Raises TrainingDivergedError at the first non-finite step <= up_to_step."""
      due = [(step, metrics) for step, metrics in unchecked if step <= up_to_step]
      if not due:
        return
      for (step, metrics), ok in zip(due, jax.device_get([metrics["is_finite"] for _, metrics in due])):
        if not ok:
          values = jax.device_get(metrics)
          manager.wait_until_finished()  # the saves in flight hold finite states: let them land
          last = manager.latest_step()
          kept = (
            f"the last checkpoint, {manager.directory}/{last}, was written before it and is kept"
            if last is not None
            else "no checkpoint was written"
          )
          raise TrainingDivergedError(
            f"training diverged at step {step}: non-finite loss, gradients or train state "
            f"(loss {values['loss']:.4g}, aux_loss {values['aux_loss']:.4g}, "
            f"grad_norm {values['grad_norm']:.4g}); {kept}. Try a lower train.learning_rate "
            "or train.grad_clip_norm > 0"
          )
      del unchecked[: len(due)]

    def save_checked(state: TrainState) -> None:
      check_finite(int(state.step))
      checkpointing.save(manager, state)

    # The newest step's metrics, written one step late (once the next step is queued)
    # so that the host never waits for the device just to log.
    pending: tuple[int, dict[str, jax.Array]] | None = None
    train_seconds = 0.0
    tokens_since_log, time_of_log = 0, time.perf_counter()
    stopped_by = ""

    def log_pending(*, final: bool = False) -> None:
      """Writes the pending step's row if it is a logging step (or the last step of this run)."""
      nonlocal pending, tokens_since_log, time_of_log
      if pending is None:
        return
      step, metrics = pending
      if not (step % train_config.log_every == 0 or step == train_config.num_steps or final):
        return
      check_finite(step)
      now = time.perf_counter()
      row = {
        "step": step,
        "split": "train",
        **reporting.to_python({k: v for k, v in metrics.items() if k != "is_finite"}),
        "tokens_per_second": tokens_since_log / max(now - time_of_log, 1e-9),
      }
      writer.write(row)
      tokens_since_log, time_of_log, pending = 0, now, None
      progress.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_second']:.0f}")

    progress = tqdm.tqdm(
      total=train_config.num_steps,
      initial=start_step,
      disable=not train_config.progress_bar,
      dynamic_ncols=True,
      mininterval=1.0,
      desc="train",
    )
    with PreemptionGuard() as guard:
      try:
        for step in range(start_step, train_config.num_steps):
          step_start = time.perf_counter()
          batch = batch_at(step)
          state, metrics = train_step(state, batch)
          tokens_since_log += int(np.sum(batch["source"] != 0) + np.sum(batch["target"] != 0))
          done = step + 1
          unchecked.append((done, {k: metrics[k] for k in _DIVERGENCE_METRICS}))
          log_pending()  # the previous step's row, now that this step is queued
          pending = (done, metrics)
          if len(unchecked) > _MAX_UNCHECKED_STEPS:
            check_finite(done - 1)
          train_seconds += time.perf_counter() - step_start
          progress.update(1)
          if (
            train_config.eval_every and done % train_config.eval_every == 0 and done < train_config.num_steps
          ):
            log_pending()  # rows stay in step order; evaluating waits for the device anyway
            check_finite(done)
            result = evaluate(
              state,
              test_split,
              data.vocabulary,
              config.eval,
              num_examples=config.eval.num_examples_during_training,
              eval_fn=eval_fn,
              decode_fn=decode_fn,
            )
            writer.write({"step": done, "split": "test", **result})
            progress.write(
              f"step {done}: test exact_match={result['exact_match']:.4f} loss={result['loss']:.4f}"
            )
          if train_config.checkpoint_every and done % train_config.checkpoint_every == 0:
            # The row goes first: a crash right after the save must not leave a resumed run without it.
            log_pending()
            save_checked(state)
          if guard.requested:
            stopped_by = guard.signal_name
            break
        log_pending(final=True)
        save_checked(state)
      finally:
        progress.close()
  if stopped_by:
    print(
      f"stopped by {stopped_by} at step {int(state.step)}; checkpoint saved in {manager.directory}. "
      "Run the same command again to resume."
    )
    return {"stopped_at_step": int(state.step)}

  test = evaluate(state, test_split, data.vocabulary, config.eval, eval_fn=eval_fn, decode_fn=decode_fn)
  writer.write({"step": int(state.step), "split": "test", **test})
  rows = reporting.read_metrics(workdir)
  train_rows = [r for r in rows if r.get("split") == "train"]
  trained_steps = int(state.step) - start_step
  results = {
    "exact_match": test["exact_match"],
    "token_accuracy": test["token_accuracy"],
    "test_loss": test["loss"],
    "test_teacher_forced_accuracy": test["teacher_forced_accuracy"],
    "test_examples": test["num_examples"],
    "final_train_loss": train_rows[-1]["loss"] if train_rows else float("nan"),
    "final_aux_loss": train_rows[-1]["aux_loss"] if train_rows else float("nan"),
    "steps": int(state.step),
    "parameters": num_params,
    "train_time_seconds": train_seconds,
    "steps_per_second_this_run": trained_steps / train_seconds if train_seconds else 0.0,
    "decode": "greedy" if config.eval.beam_size == 1 else f"beam{config.eval.beam_size}",
  }
  reporting.write_results(workdir, results)
  reporting.plot_loss_curve(workdir)
  return results
