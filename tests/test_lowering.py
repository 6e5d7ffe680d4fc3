"""The full train step lowered for GPU and TPU on 8 virtual CPU devices (`tasks.lowering`).

For each dispatch, on one device and expert-parallel on a (data 2, expert 4) mesh with
8 experts, `jax.export` for "cuda" and "tpu" must succeed, and the exported StableHLO
must hold the ops that path is made of: ragged_dot for dropless experts (forward and
both backward products), all_to_all for the capacity exchange, ragged_all_to_all for
the dropless one, all_reduce for the psum'd routing statistics. The model has 2 MoE
layers (encoder and decoder layer 2 of 2).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import tmoe
from tmoe_jax.errors import ConfigError
from tmoe_jax.moe import dropless
from tmoe_jax.moe import expert_parallel as expert_parallel_module
from tmoe_jax.parallel.mesh import make_mesh
from tmoe_jax.parallel.platform import lowering_for
from tmoe_jax.tasks import lowering

PLATFORMS = ("cuda", "tpu")
MOE_LAYERS = 2
# name -> (dispatch, (mesh.data, mesh.expert), num_experts)
CASES = {
  "capacity": ("capacity", (1, 1), 4),
  "dropless": ("dropless", (1, 1), 4),
  "expert_parallel_capacity": ("capacity", (2, 4), 8),
  "expert_parallel_dropless": ("dropless", (2, 4), 8),
}
# name -> {op: count in the exported module}; ops not named must be absent among COLLECTIVES_AND_RAGGED.
# Per MoE layer: ragged_dot 2 forward + 4 backward (input and weight gradients of both
# projections); each exchange 2 forward (there and back) + 2 backward.
EXPECTED_OPS = {
  "capacity": {},
  "dropless": {"ragged_dot": 6 * MOE_LAYERS},
  "expert_parallel_capacity": {"all_to_all": 4 * MOE_LAYERS, "all_reduce": None},
  "expert_parallel_dropless": {
    "ragged_dot": 6 * MOE_LAYERS,
    "ragged_all_to_all": 4 * MOE_LAYERS,
    # The exchange plan swaps row counts and offsets with all_to_all too.
    "all_to_all": None,
    "all_reduce": None,
  },
}
COLLECTIVES_AND_RAGGED = ("all_to_all", "ragged_all_to_all", "ragged_dot", "all_reduce", "all_gather")


def _config(dispatch: str, mesh_shape: tuple[int, int], num_experts: int):
  config = tmoe.get_config()
  config.model.update(
    d_model=32,
    d_ff=64,
    num_heads=2,
    num_layers=2,
    num_decoder_layers=2,
    max_length=8,
    num_experts=num_experts,
    dispatch=dispatch,
    sequences_per_group=1,
  )
  config.train.batch_size = 16
  config.mesh.data, config.mesh.expert = mesh_shape
  return config


def _built(case: str) -> lowering.ShardedTrainStep:
  dispatch, mesh_shape, num_experts = CASES[case]
  return lowering.sharded_train_step(
    _config(dispatch, mesh_shape, num_experts), vocab_size=32, mesh=make_mesh(*mesh_shape)
  )


@functools.cache
def _exported(case: str, platform: str) -> jax.export.Exported:
  return lowering.export_train_step(_built(case), platform)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("case", CASES)
def test_train_step_lowers_with_the_expected_ops(case, platform):
  exported = _exported(case, platform)
  assert exported.platforms == (platform,)
  mesh_shape = CASES[case][1]
  assert exported.nr_devices == mesh_shape[0] * mesh_shape[1]
  found = lowering.ops_found(exported.mlir_module())
  for op, count in EXPECTED_OPS[case].items():
    assert found.get(op, 0) == count if count is not None else found.get(op, 0) > 0, (op, found)
  unexpected = set(COLLECTIVES_AND_RAGGED) & set(found) - set(EXPECTED_OPS[case])
  assert not unexpected, found


def test_exported_arguments_keep_the_expert_sharding():
  """The exported step takes the expert weights split over 'expert', the batch over both axes."""
  built = _built("expert_parallel_capacity")
  paths_and_leaves = jax.tree_util.tree_flatten_with_path(built.state.params)[0]
  expert_specs = {
    jax.tree_util.keystr(path): leaf.sharding.spec
    for path, leaf in paths_and_leaves
    if "ExDxF" in jax.tree_util.keystr(path)
  }
  assert expert_specs and set(expert_specs.values()) == {P("expert")}
  assert built.batch["source"].sharding.spec == P(("data", "fsdp", "expert"))
  text = _exported("expert_parallel_capacity", "cuda").mlir_module()
  # The 8 devices' 2 x 4 layout reaches the module as sharding annotations.
  assert '"expert"=4' in text and '"data"=2' in text


def test_cpu_traced_dropless_keeps_the_cpu_kernels_outside_lowering_for():
  """The dropless kernel and exchange are chosen by the target backend at trace time: traced on
  CPU outside `lowering_for`, a "cuda" lowering holds the block loop and the padded exchange.
  The same `built` then exports with the GPU kernels: each export traces afresh."""
  built = _built("expert_parallel_dropless")
  found = lowering.ops_found(lowering.export_train_step(built, "cuda", assume=False).mlir_module())
  assert "ragged_dot" not in found and "ragged_all_to_all" not in found
  assert found["while"] > 50  # the block loop's expert and block loops, forward and backward
  assert found["all_to_all"] > 0  # the padded exchange
  found = lowering.ops_found(lowering.export_train_step(built, "cuda").mlir_module())
  assert found["ragged_dot"] == 6 * MOE_LAYERS and found["ragged_all_to_all"] == 4 * MOE_LAYERS


@pytest.mark.xfail(raises=ValueError, strict=True, reason=lowering.RAGGED_ALL_TO_ALL_REFUSAL)
def test_ragged_all_to_all_is_refused_by_the_default_export_checks():
  """jax.export's own checks refuse the ragged_all_to_all custom call (no compatibility
  guarantee); `export_train_step` lets it through by default. The exception must be that one."""
  built = _built("expert_parallel_dropless")
  try:
    lowering.export_train_step(built, "cuda", unstable_custom_calls=())
  except ValueError as error:
    assert str(error).startswith(lowering.RAGGED_ALL_TO_ALL_REFUSAL), error
    assert "@ragged_all_to_all" in str(error), error
    raise


def test_lowering_for_changes_the_auto_choices_only_inside():
  method, exchange = dropless.resolve_method, expert_parallel_module.resolve_exchange
  assert (method("auto"), exchange("auto")) == ("block_loop", "padded")  # on CPU
  with lowering_for("tpu"):
    assert (dropless.resolve_method("auto"), expert_parallel_module.resolve_exchange("auto")) == (
      "ragged_dot",
      "ragged",
    )
    assert dropless.resolve_method("block_loop") == "block_loop"  # explicit names stay
    with pytest.raises(ValueError, match="method must be one of"):
      dropless.resolve_method("bogus")
  assert (method("auto"), exchange("auto")) == ("block_loop", "padded")
  with pytest.raises(ValueError, match="platform must be one of"), lowering_for("gpu"):
    pass


def test_ops_found_counts_each_op_once_per_instance():
  text = """
    %1 = "stablehlo.all_to_all"(%0) ...
    %2 = stablehlo.all_to_all %1 ...
    %3 = stablehlo.custom_call @ragged_all_to_all(%2) ...
    %4 = stablehlo.composite "chlo.ragged_dot" %3 ... decomposition = @chlo.ragged_dot.impl
    func.func private @chlo.ragged_dot.impl(...)
  """
  assert lowering.ops_found(text) == {
    "all_to_all": 2,
    "ragged_all_to_all": 1,
    "ragged_dot": 1,
    "custom_call": 1,
  }


def _accumulating(grad_accum_steps: int) -> lowering.ShardedTrainStep:
  config = _config("capacity", (1, 1), 4)
  # No randomness in training: the accumulated update must equal the one-batch update.
  config.model.update(dropout_rate=0.0, attention_dropout_rate=0.0, sequences_per_group=2)
  config.train.grad_accum_steps = grad_accum_steps
  return lowering.sharded_train_step(config, vocab_size=32, mesh=make_mesh(1, 1))


def test_train_step_accumulates_gradients_as_the_loop_does():
  """`train.grad_accum_steps` reaches the step (`grad_accumulation.microbatch_plan`, as in
  `training.loop`): 2 microbatches scan over the batch and give the one-batch update."""
  one, two = _accumulating(1), _accumulating(2)
  assert (one.microbatches, two.microbatches) == (1, 2)
  loops = [
    lowering.ops_found(built.step.lower(*built.args).as_text()).get("while", 0) for built in (one, two)
  ]
  assert loops[1] > loops[0], loops  # the microbatch scans (measuring pass and gradient pass)
  rng = np.random.default_rng(0)
  batch = {
    name: jax.device_put(rng.integers(1, 32, size=shape.shape).astype(np.int32), shape.sharding)
    for name, shape in one.batch.items()
  }
  (state_one, metrics_one), (state_two, metrics_two) = (
    built.step(built.init(), batch) for built in (one, two)
  )
  for name in ("loss", "load_balancing_loss", "router_z_loss", "grad_norm"):
    np.testing.assert_allclose(metrics_two[name], metrics_one[name], rtol=1e-5, err_msg=name)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), state_two.params, state_one.params
  )


def test_train_step_refuses_the_microbatches_the_loop_refuses():
  with pytest.raises(ConfigError, match="train.grad_accum_steps: must divide train.batch_size=16, got 3"):
    _accumulating(3)
  # 16 microbatches of 1 row cannot hold whole routing groups of 2 rows.
  with pytest.raises(ConfigError, match="model.sequences_per_group: must divide the microbatch of 1 rows"):
    _accumulating(16)


def test_lower_train_step_reports_a_failed_lowering_instead_of_raising(monkeypatch):
  def refuse(*args, **kwargs):
    raise NotImplementedError("no lowering for this platform")

  monkeypatch.setattr(lowering, "export_train_step", refuse)
  report = lowering.lower_train_step(
    _config("capacity", (1, 1), 4), "tpu", vocab_size=32, mesh=make_mesh(1, 1)
  )
  assert report == {
    "platform": "tpu",
    "ok": False,
    "error": "NotImplementedError: no lowering for this platform",
  }
