"""The training loop every experiment shares, around the pure jitted train step.

`train_and_evaluate(config, workdir, task)` validates the run settings, builds
the mesh and the task's model, resumes from the newest checkpoint in `workdir`
if there is one, trains to `train.num_steps`, evaluates the task's split and
writes config.json, metrics.jsonl (+ TensorBoard events), results.txt,
loss_curve.png and checkpoints/ into the workdir.

Crash safety: files are replaced atomically and metrics rows past the restored
step are dropped, so a run killed at any point and rerun ends as an
uninterrupted one would. Every step reports whether its loss and gradients (which
keep the new parameters and Adam moments finite) and its new non-parameter state
are finite; the host reads those flags before any row, evaluation or checkpoint
depends on them and stops with TrainingDivergedError otherwise.

Multi-process runs (`jax.distributed`): every process runs this loop on its own
rows of each global batch; only the main process writes files other than
checkpoints, which Orbax writes from all processes together.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

import jax
import tqdm
from flax import nnx

from tmoe_jax.errors import ConfigError, TmoeError
from tmoe_jax.parallel import distributed, sharding
from tmoe_jax.parallel.mesh import check_batch_divisible, expert_axis_size, mesh_from_config
from tmoe_jax.training import checkpointing, grad_accumulation, reporting, steps
from tmoe_jax.training.optimizer import make_optimizer, make_schedule
from tmoe_jax.training.preemption import PreemptionGuard
from tmoe_jax.training.run_fields import TRAIN_LOOP_FIELDS
from tmoe_jax.training.state import TrainState, count_params, create_train_state, train_state_shardings
from tmoe_jax.training.task import Task
from tmoe_jax.training.workdir import CHECKPOINT_DIR, CONFIG_FILE, prepare_workdir
from tmoe_jax.validation import validate_fields


class TrainingDivergedError(TmoeError):
  """The loss, gradients or train state became non-finite."""


# What a step keeps for the host until its finiteness is checked: enough to say what went wrong.
_DIVERGENCE_METRICS = ("is_finite", "loss", "aux_loss", "grad_norm")
# Unchecked steps are checked anyway once this many pile up (a huge log_every, no checkpoints).
_MAX_UNCHECKED_STEPS = 256


def evaluation_view(task: Task, graphdef, mesh):
  """(graphdef, state -> state) that tasks evaluate with.

  On one process: the training model and state as they are. Across processes, arrays
  sharded over other hosts cannot be read back, so every process evaluates its own
  full copy of the state (gathered once per evaluation) with the single-device model.
  """
  if jax.process_count() == 1:
    return graphdef, lambda state: state
  local_graphdef = nnx.graphdef(nnx.eval_shape(lambda: task.build_model(None)))
  gather = jax.jit(lambda state: state, out_shardings=sharding.replicated(mesh))

  def local_copy(state: TrainState) -> TrainState:
    return jax.tree.map(lambda x: x.addressable_data(0), gather(state))

  return local_graphdef, local_copy


def train_and_evaluate(config, workdir: str | pathlib.Path, task: Task) -> dict[str, Any]:
  """Trains (resuming if possible), evaluates `task.eval_split` and returns the results."""
  validate_fields(config, TRAIN_LOOP_FIELDS)
  workdir = pathlib.Path(workdir)
  is_main = distributed.is_main_process()
  train_config = config.train
  mesh = mesh_from_config(config.mesh)
  if expert_axis_size(mesh) > 1 and not task.expert_parallel:
    name = config.get("task", type(task).__name__)
    raise ConfigError(
      f"mesh.expert: the {name} model keeps its experts replicated on every device (it has no "
      f"expert-parallel layer); use mesh.expert=1 and put the devices on mesh.data, got "
      f"mesh.expert={expert_axis_size(mesh)}"
    )
  check_batch_divisible(train_config.batch_size, mesh)
  microbatches, group_rows = grad_accumulation.microbatch_plan(config, mesh)
  rows = distributed.process_batch_rows(train_config.batch_size)
  prepare_workdir(workdir, config, write=False)  # only checks: a bad model config must not write
  if (workdir / CONFIG_FILE).exists():
    task.read_files(workdir)
  model = task.build_model(mesh)
  task.check_model(model)
  prepare_workdir(workdir, config, write=is_main)
  if is_main:
    task.write_files(workdir)

  optimizer = make_optimizer(train_config)
  schedule = make_schedule(train_config)
  graphdef, state = create_train_state(model, optimizer, train_config.seed)
  del model
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
      state = checkpointing.restore(
        manager, checkpointing.abstract_like(state), set_aside_unreadable=True, renames=task.parameter_renames
      )
      if is_main:
        print(f"resumed from {manager.directory}/{int(state.step)}")
    start_step = int(state.step)

    loss_weights = steps.LossWeights.from_config(config.model)
    train_step = steps.jit_train_step(
      graphdef,
      optimizer,
      schedule,
      loss_weights,
      task.loss,
      state_shardings=state_shardings,
      mesh=mesh,
      microbatches=microbatches,
      group_rows=group_rows,
    )
    eval_graphdef, eval_state = evaluation_view(task, graphdef, mesh)
    evaluator = task.make_evaluator(eval_graphdef)
    writer = reporting.MetricsWriter(workdir, resume_step=start_step) if is_main else None
    write_row = writer.write if writer else lambda row: None
    units_name = f"{task.throughput_unit}_per_second"

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
    units_since_log, time_of_log = 0, time.perf_counter()
    stopped_by = ""

    def log_pending(*, final: bool = False) -> None:
      """Writes the pending step's row if it is a logging step (or the last step of this run)."""
      nonlocal pending, units_since_log, time_of_log
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
        # Throughput of the whole global batch: each process counts its rows, all run in lockstep.
        units_name: units_since_log * jax.process_count() / max(now - time_of_log, 1e-9),
      }
      write_row(row)
      units_since_log, time_of_log, pending = 0, now, None
      progress.set_postfix(loss=f"{row['loss']:.4f}", per_s=f"{row[units_name]:.0f}")

    def evaluate(split: str, num_examples: int | None) -> dict[str, Any]:
      return evaluator(eval_state(state), split, num_examples)

    validation_split = task.validation_split
    if (
      train_config.eval_every and validation_split is None and is_main and start_step < train_config.num_steps
    ):
      print(
        f"train.eval_every={train_config.eval_every}: this run has no validation split, so nothing is "
        f"evaluated during training; the {task.eval_split} split is evaluated once, at the end"
      )

    progress = tqdm.tqdm(
      total=train_config.num_steps,
      initial=start_step,
      disable=not (train_config.progress_bar and is_main),
      dynamic_ncols=True,
      mininterval=1.0,
      desc="train",
    )
    with PreemptionGuard() as guard:
      try:
        for step in range(start_step, train_config.num_steps):
          step_start = time.perf_counter()
          batch = task.train_batch(step, rows)
          state, metrics = train_step(state, distributed.global_batch(batch, mesh, train_config.batch_size))
          units_since_log += task.count_units(batch)
          done = step + 1
          unchecked.append((done, {k: metrics[k] for k in _DIVERGENCE_METRICS}))
          log_pending()  # the previous step's row, now that this step is queued
          pending = (done, metrics)
          if len(unchecked) > _MAX_UNCHECKED_STEPS:
            check_finite(done - 1)
          task.after_train_step(done, state, batch)
          train_seconds += time.perf_counter() - step_start
          progress.update(1)
          if (
            validation_split is not None
            and train_config.eval_every
            and done % train_config.eval_every == 0
            and done < train_config.num_steps
          ):
            log_pending()  # rows stay in step order; evaluating waits for the device anyway
            check_finite(done)
            result = evaluate(validation_split, config.eval.num_examples_during_training)
            write_row({"step": done, "split": validation_split, **result})
            summary = " ".join(f"{k}={v:.4f}" for k, v in result.items() if isinstance(v, float))
            progress.write(f"step {done}: {validation_split} {summary}")
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
    if is_main:
      print(
        f"stopped by {stopped_by} at step {int(state.step)}; checkpoint saved in {manager.directory}. "
        "Run the same command again to resume."
      )
    return {"stopped_at_step": int(state.step)}

  final = evaluate(task.eval_split, None)
  trained_steps = int(state.step) - start_step
  if not is_main:
    return task.headline_results(final)
  writer.write({"step": int(state.step), "split": task.eval_split, **final})
  train_rows = [r for r in reporting.read_metrics(workdir) if r.get("split") == "train"]
  results = {
    **task.headline_results(final),
    "final_train_loss": train_rows[-1]["loss"] if train_rows else float("nan"),
    "final_aux_loss": train_rows[-1]["aux_loss"] if train_rows else float("nan"),
    "steps": int(state.step),
    "parameters": num_params,
    "train_time_seconds": train_seconds,
    "steps_per_second_this_run": trained_steps / train_seconds if train_seconds else 0.0,
  }
  reporting.write_results(workdir, results)
  reporting.plot_loss_curve(
    workdir, eval_splits=tuple(split for split in dict.fromkeys((validation_split, task.eval_split)) if split)
  )
  task.finish(workdir, state, graphdef)
  writer.close()
  return results
