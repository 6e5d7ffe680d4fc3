"""One process of the 2-process runs in tests/test_multiprocess.py (a script, not a test module).

    python tests/multiprocess_worker.py --init config --coordinator localhost:PORT \
        --num-processes 2 --process-id I --mesh 1,4 --task train --out OUT_I.json

`--init env` takes the process group from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID instead. Each process joins the group, builds a ('data', 'expert') mesh
over every process's devices and feeds its rows of `fixed_global_batch` through
`distributed.global_batch`; `--task batch` stops after checking where the rows landed,
`--task train` also runs `NUM_STEPS` steps of the tiny Transformer-MoE of
`model_config`. The main process alone writes the summary to --out. The test
imports `train` to run the same steps on one device as the reference.

Shapes: B global batch, S source length, L target length, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from tmoe_jax.models.transformer import PAD_ID, Transformer, TransformerConfig
from tmoe_jax.parallel import distributed
from tmoe_jax.parallel.mesh import make_mesh
from tmoe_jax.parallel.sharding import replicated
from tmoe_jax.tasks import seq2seq as seq2seq_steps
from tmoe_jax.training.state import create_train_state, train_state_shardings
from tmoe_jax.training.steps import LossWeights

NUM_STEPS = 3
GLOBAL_BATCH_SIZE = 8
SOURCE_LENGTH = 6
TARGET_LENGTH = 5
VOCAB_SIZE = 13
BOS_ID = 1
LEARNING_RATE = 0.5
# Compared across runs; the per-layer routing arrays are summarised by their worst value.
SCALAR_METRICS = ("loss", "aux_loss", "load_balancing_loss", "router_z_loss", "grad_norm")


def model_config() -> TransformerConfig:
  """d_model 16, 1 + 1 layers, every FFN an MoE of 4 experts, top-2, no dropout.

  capacity_factor E / K = 2: every expert has room for every token of a device, so
  no assignment drops on any mesh and the sharded step computes the same function.
  """
  return TransformerConfig.from_flat(
    vocab_size=VOCAB_SIZE,
    d_model=16,
    num_heads=2,
    d_ff=16,
    num_layers=1,
    num_decoder_layers=1,
    max_length=8,
    dropout_rate=0.0,
    num_experts=4,
    top_k=2,
    moe_every=1,
    capacity_factor=2.0,
    eval_capacity_factor=2.0,
    sequences_per_group=1,
  )


def fixed_global_batch() -> dict[str, np.ndarray]:
  """The same int32 batch in every process: source [B, S], decoder_input and target [B, L], some padding."""
  rng = np.random.default_rng(0)
  source_BxS = rng.integers(BOS_ID + 1, VOCAB_SIZE, (GLOBAL_BATCH_SIZE, SOURCE_LENGTH), dtype=np.int32)
  target_BxL = rng.integers(BOS_ID + 1, VOCAB_SIZE, (GLOBAL_BATCH_SIZE, TARGET_LENGTH), dtype=np.int32)
  for row in range(GLOBAL_BATCH_SIZE):
    source_BxS[row, SOURCE_LENGTH - row % 3 :] = PAD_ID
    target_BxL[row, TARGET_LENGTH - row % 2 :] = PAD_ID
  decoder_input_BxL = np.concatenate(
    [np.full((GLOBAL_BATCH_SIZE, 1), BOS_ID, np.int32), target_BxL[:, :-1]], axis=1
  )
  return {"source": source_BxS, "decoder_input": decoder_input_BxL, "target": target_BxL}


def init_state(mesh=None):
  """(graphdef, TrainState, optimizer, shardings): seed 0, one jit creating the state in its shardings.

  Each process computes only the shards its devices hold (the same values in every
  process, the init being seeded), so nothing is gathered or compared across processes.
  """
  optimizer = optax.sgd(LEARNING_RATE)
  graphdefs = []

  def create():
    graphdef, state = create_train_state(
      Transformer(model_config(), mesh=mesh, rngs=nnx.Rngs(params=0)), optimizer, 0
    )
    graphdefs.append(graphdef)
    return state

  shardings = None if mesh is None else train_state_shardings(jax.eval_shape(create), mesh)
  state = jax.jit(create, out_shardings=shardings)()
  return graphdefs[-1], state, optimizer, shardings


def device_batch(mesh=None) -> dict:
  """`fixed_global_batch` on the devices: this process's rows through `distributed.global_batch`."""
  full_batch = fixed_global_batch()
  if mesh is None:
    return full_batch
  rows = distributed.process_batch_rows(GLOBAL_BATCH_SIZE)
  return distributed.global_batch(
    {key: value[rows] for key, value in full_batch.items()}, mesh, GLOBAL_BATCH_SIZE
  )


def row_sums(batch, mesh) -> dict[str, list[int]]:
  """Per-row sums of every batch array, computed where the rows live and replicated to every process."""
  sums = jax.jit(
    lambda b: {key: value.sum(axis=tuple(range(1, value.ndim))) for key, value in b.items()},
    out_shardings=replicated(mesh),
  )(batch)
  return {key: np.asarray(value).tolist() for key, value in sums.items()}


def train(mesh=None) -> dict:
  """NUM_STEPS SGD steps from seed 0 on the fixed batch; metrics as Python floats.

  mesh=None: one device, no shardings (the reference). Otherwise the state is laid
  out by `train_state_shardings` and each process contributes its rows of the batch.
  """
  graphdef, state, optimizer, shardings = init_state(mesh)
  schedule = optax.constant_schedule(LEARNING_RATE)
  kwargs = {} if mesh is None else {"state_shardings": shardings, "mesh": mesh}
  step = seq2seq_steps.jit_train_step(graphdef, optimizer, schedule, LossWeights(), **kwargs)
  batch = device_batch(mesh)
  history = []
  for _ in range(NUM_STEPS):
    state, metrics = step(state, batch)
    row = {name: float(metrics[name]) for name in SCALAR_METRICS}
    row["max_dropped_fraction"] = float(np.max(metrics["dropped_fraction"]))
    history.append(row)
  norm = jax.jit(optax.tree.norm, out_shardings=None if mesh is None else replicated(mesh))
  return {"metrics": history, "param_norm": float(norm(state.params)), "state": state}


def _expert_shard_rows(state) -> list[int]:
  """Leading (expert) size of this process's shards of every stacked expert weight."""
  params = nnx.to_pure_dict(state.params)
  weights = list(params["encoder_layers"][0]["ffn"]["experts"].values())
  return sorted({shard.data.shape[0] for w in weights for shard in w.addressable_shards})


def _interleaved_mesh_error(mesh: Mesh) -> str:
  """What `global_batch` says about a mesh whose flat device order alternates between the processes."""
  by_process = sorted(mesh.devices.flat, key=lambda d: (d.process_index, d.id))
  half = len(by_process) // 2
  interleaved = [d for pair in zip(by_process[:half], by_process[half:]) for d in pair]
  bad_mesh = Mesh(np.asarray(interleaved, dtype=object).reshape(mesh.devices.shape), mesh.axis_names)
  local = {
    key: value[distributed.process_batch_rows(GLOBAL_BATCH_SIZE)]
    for key, value in fixed_global_batch().items()
  }
  try:
    distributed.global_batch(local, bad_mesh, GLOBAL_BATCH_SIZE)
  except ValueError as error:
    return str(error)
  return ""


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--init", choices=("config", "env"), required=True)
  parser.add_argument("--task", choices=("batch", "train"), default="train")
  parser.add_argument("--coordinator", default="")
  parser.add_argument("--num-processes", type=int, default=0)
  parser.add_argument("--process-id", type=int, default=-1)
  parser.add_argument("--mesh", default="1,4", help="data,expert")
  parser.add_argument("--out", type=pathlib.Path, required=True)
  parser.add_argument("--compilation-cache", default="", help="persistent XLA cache directory")
  args = parser.parse_args(argv)
  if args.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

  config = distributed.default_config()
  config.initialization_timeout = 60
  if args.init == "config":
    config.coordinator_address = args.coordinator
    config.num_processes = args.num_processes
    config.process_id = args.process_id
  if not distributed.initialize(config):
    raise SystemExit("distributed.initialize found no process group")

  data, expert = (int(size) for size in args.mesh.split(","))
  mesh = make_mesh(data, expert)
  summary = {
    "process_index": jax.process_index(),
    "process_count": jax.process_count(),
    "device_count": jax.device_count(),
    "local_device_count": jax.local_device_count(),
    # (data, fsdp * expert): the batch-split layout, as in a mesh without an fsdp axis.
    "mesh_process_indices": [
      [d.process_index for d in row] for row in mesh.devices.reshape(mesh.devices.shape[0], -1)
    ],
    "row_sums": row_sums(device_batch(mesh), mesh),
  }
  if args.task == "batch":
    summary["initialize_again"] = distributed.initialize(config)
    summary["interleaved_mesh_error"] = _interleaved_mesh_error(mesh)
  if args.task == "train":
    result = train(mesh)
    summary["expert_shard_rows"] = _expert_shard_rows(result["state"])
    summary["metrics"] = result["metrics"]
    summary["param_norm"] = result["param_norm"]
  if distributed.is_main_process():
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
