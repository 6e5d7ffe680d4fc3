"""The accelerator path, checked without one: the full train step lowered for GPU or TPU by `jax.export`.

The step is the one `python -m train` runs for the seq2seq Transformer-MoE
(`tasks.seq2seq.jit_train_step` with `training.state.train_state_shardings` on
`parallel.mesh.make_mesh`'s mesh, as `training.loop` builds it), traced on
ShapeDtypeStructs that carry the NamedShardings: nothing is allocated and no
accelerator is needed; 8 virtual CPU devices stand in for an 8-device mesh.

  built = sharded_train_step(config, vocab_size=64)    # config: configs/tmoe.py's get_config()
  exported = export_train_step(built, "cuda")           # a jax.export.Exported
  ops_found(exported.mlir_module())                     # {"all_to_all": 8, "all_reduce": 3, ...}

`lower_train_step` does all three and reports a failed lowering instead of raising;
`ShardedTrainStep.init` makes a real state for the same step (bench.device_check runs it).

Three things differ from lowering on the machine itself:

- The dropless kernel (`moe.dropless.resolve_method`) and exchange
  (`parallel.ragged_exchange.resolve_exchange`) pick "auto" by the backend they
  are traced for (`parallel.platform.target_backend`), the local one unless the
  tracing runs inside `parallel.platform.lowering_for(platform)`, which
  `export_train_step` applies: a CUDA lowering traced on CPU then holds the
  ragged_dot kernel and ragged exchange, not the CPU block loop and padded exchange.
- `jax.lax.ragged_all_to_all` lowers to a `stablehlo.custom_call
  @ragged_all_to_all` that jax.export refuses to serialize by default (no
  compatibility guarantee): `RAGGED_ALL_TO_ALL_REFUSAL` is its message. The
  lowered module is what is checked here, not a stable artifact, so
  `export_train_step` disables that one check (`UNSTABLE_CUSTOM_CALLS`).
- Collectives appear in the module text only where the program spells them
  out: those of the expert-parallel `shard_map` (all_to_all, ragged_all_to_all,
  the psum of routing sums and the gradient psums of its transpose, as
  all_reduce). The gradient all-reduce of the replicated dense weights over the
  batch axes is inserted later, by XLA's SPMD partitioner when the module is
  compiled on the accelerator, and is not in the text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from tmoe_jax.models.transformer import TransformerConfig
from tmoe_jax.parallel import sharding
from tmoe_jax.parallel.mesh import check_batch_divisible, mesh_from_config
from tmoe_jax.parallel.platform import lowering_for
from tmoe_jax.tasks import seq2seq
from tmoe_jax.training import grad_accumulation, steps
from tmoe_jax.training.optimizer import make_optimizer, make_schedule
from tmoe_jax.training.state import TrainState, create_train_state, train_state_shardings

# Custom calls without a compatibility guarantee that `export_train_step` lets through.
UNSTABLE_CUSTOM_CALLS = ("ragged_all_to_all",)
# The start of the ValueError jax.export raises for them when the check is on.
RAGGED_ALL_TO_ALL_REFUSAL = (
  "Cannot serialize code with custom calls whose targets have no compatibility guarantees"
)

# Op name -> regex over the StableHLO text that counts it (one match per op instance).
OP_PATTERNS = {
  "all_to_all": r"stablehlo\.all_to_all\b",
  "ragged_all_to_all": r"stablehlo\.custom_call @ragged_all_to_all\b",
  # GPU/TPU: a composite op with a reference decomposition; on CPU it is decomposed at once.
  "ragged_dot": r"stablehlo\.composite \"chlo\.ragged_dot\"",
  "all_reduce": r"stablehlo\.all_reduce\b",
  "all_gather": r"stablehlo\.all_gather\b",
  "reduce_scatter": r"stablehlo\.reduce_scatter\b",
  "collective_permute": r"stablehlo\.collective_permute\b",
  "while": r"stablehlo\.while\b",
  "sort": r"stablehlo\.sort\b",
  "custom_call": r"stablehlo\.custom_call\b",
}


# ---------------------------------------------------------------------------
# Tracing as if on another backend.


# ---------------------------------------------------------------------------
# The sharded train step.


@dataclasses.dataclass(frozen=True)
class ShardedTrainStep:
  """The jitted train step of an experiment on a mesh, with abstract arguments to trace it with.

  step: `(state, batch) -> (state, metrics)`, jitted with the TrainState's shardings
    and the batch split over every device, state donated.
  make_step: `() -> step`, a fresh jit of it: jit caches its trace, and with the trace
    the dropless choices of `lowering_for`, so each export traces a fresh one.
  init: `() -> TrainState`, jitted: a fresh state created straight into its shardings.
  state: a TrainState of ShapeDtypeStructs carrying `train_state_shardings`' NamedShardings.
  batch: {"source": [B, S], "decoder_input": [B, L], "target": [B, L]} int32
    ShapeDtypeStructs split over every device.
  model_config: the Transformer's settings (e.g. for `bench.train_step.train_flops_per_step`).
  microbatches: how many microbatches the step accumulates its gradient over
    (`grad_accumulation.microbatch_plan`: `train.grad_accum_steps`; 1 = one batch).
  """

  step: Callable
  make_step: Callable[[], Callable]
  init: Callable[[], TrainState]
  state: TrainState
  batch: dict[str, jax.ShapeDtypeStruct]
  mesh: Mesh
  graphdef: nnx.GraphDef
  model_config: TransformerConfig
  microbatches: int = 1

  @property
  def args(self) -> tuple[TrainState, dict[str, jax.ShapeDtypeStruct]]:
    """What `step.lower(*args)` and `jax.export.export(step, ...)(*args)` take."""
    return (self.state, self.batch)


def _with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda leaf, leaf_sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf_sharding),
    tree,
    shardings,
  )


def sharded_train_step(
  config,
  *,
  vocab_size: int,
  mesh: Mesh | None = None,
  source_length: int | None = None,
  target_length: int | None = None,
) -> ShardedTrainStep:
  """The seq2seq train step of the experiment `config` (configs/tmoe.py's sections), built as
  `training.loop` builds it for `python -m train`, without allocating anything.

  `mesh` defaults to `mesh_from_config(config.mesh)` over the local
  devices; lengths default to `config.model.max_length`; the batch has
  `config.train.batch_size` rows. `train.grad_accum_steps` = N accumulates the
  gradient over N microbatches as the loop does (`grad_accumulation.microbatch_plan`,
  whose ConfigError a setting it forbids raises here too).
  """
  mesh = mesh_from_config(config.mesh) if mesh is None else mesh
  train_config = config.train
  check_batch_divisible(train_config.batch_size, mesh)
  microbatches, group_rows = grad_accumulation.microbatch_plan(config, mesh)
  model_config = TransformerConfig.from_config(config.model, vocab_size=vocab_size)
  optimizer = make_optimizer(train_config)
  graphdefs = []

  def init_state() -> TrainState:
    model = seq2seq.build_model(config, vocab_size, train_config.seed, mesh=mesh)
    graphdef, state = create_train_state(model, optimizer, train_config.seed)
    graphdefs.append(graphdef)  # static: safe to take out of the trace
    return state

  state = jax.eval_shape(init_state)
  graphdef = graphdefs[0]
  state_shardings = train_state_shardings(state, mesh)

  def make_step() -> Callable:
    return steps.jit_train_step(
      graphdef,
      optimizer,
      make_schedule(train_config),
      steps.LossWeights.from_config(config.model),
      functools.partial(seq2seq.seq2seq_loss, label_smoothing=train_config.label_smoothing),
      state_shardings=state_shardings,
      mesh=mesh,
      microbatches=microbatches,
      group_rows=group_rows,
    )

  batch_sharding = sharding.batch_sharding(mesh)
  lengths = {
    "source": source_length or config.model.max_length,
    "decoder_input": target_length or config.model.max_length,
    "target": target_length or config.model.max_length,
  }
  batch = {
    name: jax.ShapeDtypeStruct((train_config.batch_size, length), jnp.int32, sharding=batch_sharding)
    for name, length in lengths.items()
  }
  return ShardedTrainStep(
    step=make_step(),
    make_step=make_step,
    init=jax.jit(init_state, out_shardings=state_shardings),
    state=_with_shardings(state, state_shardings),
    batch=batch,
    mesh=mesh,
    graphdef=graphdef,
    model_config=model_config,
    microbatches=microbatches,
  )


# ---------------------------------------------------------------------------
# Exporting and reading the module.


def export_train_step(
  built: ShardedTrainStep,
  platform: str,
  *,
  unstable_custom_calls: Sequence[str] = UNSTABLE_CUSTOM_CALLS,
  assume: bool = True,
) -> jax.export.Exported:
  """`jax.export` of the step for `platform` ("cuda", "tpu", ...), traced as on that platform.

  `unstable_custom_calls`: custom-call targets whose serialization check is disabled
  (pass () to see jax.export's refusal, `RAGGED_ALL_TO_ALL_REFUSAL`). `assume=False`
  traces with this machine's backend choices (`lowering_for` not applied). Each call
  traces a fresh jit of the step (`built.make_step`), so one `built` exports for any platform.
  """
  disabled = [jax.export.DisabledSafetyCheck.custom_call(name) for name in unstable_custom_calls]
  exporter = jax.export.export(built.make_step(), platforms=[platform], disabled_checks=disabled)
  with lowering_for(platform) if assume else contextlib.nullcontext():
    return exporter(*built.args)


def ops_found(module_text: str, patterns: dict[str, str] | None = None) -> dict[str, int]:
  """How many times each op of `patterns` (default `OP_PATTERNS`) occurs in StableHLO text; 0s left out."""
  counts = {
    name: len(re.findall(pattern, module_text)) for name, pattern in (patterns or OP_PATTERNS).items()
  }
  return {name: count for name, count in counts.items() if count}


def lower_train_step(config, platform: str, *, vocab_size: int, mesh: Mesh | None = None, **lengths) -> dict:
  """Builds, exports and reads the step: {"platform", "ok", "ops" or "error"}; a failed lowering is
  reported, not raised.

  "error" is "<ExceptionType>: <message>" of whatever the lowering raised.
  """
  built = sharded_train_step(config, vocab_size=vocab_size, mesh=mesh, **lengths)
  try:
    exported = export_train_step(built, platform)
  except Exception as error:  # noqa: BLE001 (reported, not hidden: the caller asserts on it)
    return {"platform": platform, "ok": False, "error": f"{type(error).__name__}: {error}"}
  return {"platform": platform, "ok": True, "ops": ops_found(exported.mlir_module())}
