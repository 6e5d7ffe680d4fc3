"""Fully-sharded data parallelism: the 'fsdp' mesh axis splits every weight, gradient and Adam moment.

The same train step on meshes with an 'fsdp' axis (alone, with 'data', with 'expert',
with both) gives the one-device step's losses and parameters; each device holds about
1 / fsdp of the state; a checkpoint saved on one mesh restores on another.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tmoe_jax.models.transformer import Transformer, TransformerConfig
from tmoe_jax.parallel.mesh import FSDP_AXIS, make_mesh
from tmoe_jax.tasks.seq2seq import jit_train_step
from tmoe_jax.training import checkpointing, steps
from tmoe_jax.training.state import create_train_state, train_state_shardings

# (data, fsdp, expert)
MESHES = [(1, 8, 1), (2, 4, 1), (1, 2, 4), (2, 2, 2)]
STEPS = 3
BATCH = 16


def _config() -> TransformerConfig:
  return TransformerConfig.from_flat(
    vocab_size=24,
    d_model=32,
    num_heads=4,
    num_layers=2,
    num_decoder_layers=2,
    d_ff=64,
    moe_every=2,
    num_experts=8,
    top_k=2,
    sequences_per_group=2,
  )


def _batches():
  rng = np.random.default_rng(0)
  for _ in range(STEPS):
    source = rng.integers(1, 24, size=(BATCH, 10))
    target = rng.integers(1, 24, size=(BATCH, 8))
    decoder_input = np.concatenate([np.ones((BATCH, 1)), target[:, :-1]], axis=1)
    yield {
      "source": jnp.asarray(source, jnp.int32),
      "decoder_input": jnp.asarray(decoder_input, jnp.int32),
      "target": jnp.asarray(target, jnp.int32),
    }


def _train(mesh_shape):
  """Losses and final state of STEPS steps on the (data, fsdp, expert) mesh (None: one device)."""
  data, fsdp, expert = mesh_shape or (1, 1, 1)
  mesh = make_mesh(data, expert, fsdp=fsdp)
  model = Transformer(_config(), mesh=mesh if mesh_shape else None, rngs=nnx.Rngs(0))
  # SGD: the update is linear in the gradient (Adam's first steps are lr * sign(g), which
  # would compare the rounding noise of gradients that are 0, as of attention key biases).
  optimizer = optax.sgd(0.5, momentum=0.9)
  graphdef, state = create_train_state(model, optimizer, seed=0)
  shardings = train_state_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  step = jit_train_step(
    graphdef,
    optimizer,
    optax.constant_schedule(0.5),
    steps.LossWeights(),
    state_shardings=shardings,
    mesh=mesh,
  )
  losses = []
  for batch in _batches():
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"] + metrics["aux_loss"]))
  return losses, state, mesh


@pytest.fixture(scope="module")
def reference():
  return _train(None)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda shape: "x".join(map(str, shape)))
def test_fsdp_meshes_train_the_one_device_model(reference, mesh_shape):
  expected_losses, expected_state, _ = reference
  losses, state, mesh = _train(mesh_shape)
  np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
  chex.assert_trees_all_close(
    jax.device_get(state.params), jax.device_get(expected_state.params), rtol=1e-5, atol=1e-6
  )
  # The dense weights really are split over 'fsdp' (ZeRO-3), optimizer state included.
  kernel = state.params["encoder_layers"][0]["attention"]["query"]["kernel"].value
  assert FSDP_AXIS in kernel.sharding.spec
  assert kernel.addressable_shards[0].data.size == kernel.size // mesh.shape["fsdp"]


def test_each_device_holds_a_share_of_the_state():
  """Bytes of parameters + optimizer state on one device fall about 1 / fsdp."""
  model = Transformer(_config(), rngs=nnx.Rngs(0))
  graphdef, state = create_train_state(model, optax.adam(1e-3), seed=0)
  del graphdef
  total = sum(leaf.nbytes for leaf in jax.tree.leaves((state.params, state.opt_state)))
  for fsdp in (2, 8):
    mesh = make_mesh(1, 1, fsdp=fsdp)
    shardings = train_state_shardings(state, mesh)
    placed = jax.device_put((state.params, state.opt_state), (shardings.params, shardings.opt_state))
    device = mesh.devices.flat[0]
    on_device = sum(
      shard.data.nbytes
      for leaf in jax.tree.leaves(placed)
      for shard in leaf.addressable_shards
      if shard.device == device
    )
    # Only scalars and vectors no axis of which fsdp divides stay whole: within 5 % of 1 / fsdp.
    assert on_device <= 1.05 * total / fsdp, (fsdp, on_device, total)


def test_a_checkpoint_restores_onto_another_mesh(tmp_path, reference):
  """Saved from (fsdp=8), restored onto (data=2, fsdp=2, expert=2): the same arrays, resharded."""
  del reference  # trained first, so this test reuses its compiled step
  _, saved_state, _ = _train((1, 8, 1))
  manager = checkpointing.make_manager(tmp_path / "checkpoints", max_to_keep=1)
  checkpointing.save(manager, saved_state, wait=True)
  manager.close()
  mesh = make_mesh(2, 2, fsdp=2)
  model = Transformer(_config(), mesh=mesh, rngs=nnx.Rngs(1))
  _, fresh = create_train_state(model, optax.sgd(0.5, momentum=0.9), seed=1)
  shardings = train_state_shardings(fresh, mesh)
  abstract = jax.tree.map(
    lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), fresh, shardings
  )
  manager = checkpointing.make_manager(tmp_path / "checkpoints", max_to_keep=1, read_only=True)
  restored = checkpointing.restore(manager, abstract)
  manager.close()
  chex.assert_trees_all_equal(jax.device_get(restored.params), jax.device_get(saved_state.params))
  kernel = restored.params["encoder_layers"][0]["attention"]["query"]["kernel"].value
  assert (
    kernel.sharding.spec == shardings.params["encoder_layers"][0]["attention"]["query"]["kernel"].value.spec
  )
