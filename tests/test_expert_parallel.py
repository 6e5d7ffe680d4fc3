"""Expert parallelism on 8 virtual CPU devices against the single-device MoE layer.

The reference is the library's own single-device layer, `MoEFeedForward`, run
on the whole batch with the same routing groups. Capacity is decided per
group, so the sharded layer must match it on every mesh, also where capacity
binds and tokens drop. Gradients are compared through `jax.grad` of one scalar
that mixes the output and every auxiliary loss.

Shapes: B sequences of L tokens, T = B*L, G routing groups of S tokens, D model
width, F hidden width, E experts, K top-k.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tmoe_jax.errors import ConfigError
from tmoe_jax.moe import load_balancing_loss, top_k_route
from tmoe_jax.moe.dispatch import expert_capacity
from tmoe_jax.moe.expert_parallel import bytes_moved_per_layer, expert_parallel_moe
from tmoe_jax.moe.experts import EXPERT_PARAMS_BY_TYPE, expert_weights_of
from tmoe_jax.moe.layer import MoEFeedForward
from tmoe_jax.moe.parameter_sharding import tree_shardings
from tmoe_jax.moe.settings import MoEConfig
from tmoe_jax.moe.statistics import finalize
from tmoe_jax.parallel.mesh import make_mesh
from tmoe_jax.parallel.sharding import batch_shardings
from tmoe_jax.training.state import TrainState, train_state_shardings

B, L, D, F, E, K = 16, 4, 8, 16, 8, 2
T = B * L
SEQUENCES_PER_GROUP = 2
G, S = B // SEQUENCES_PER_GROUP, SEQUENCES_PER_GROUP * L
AMPLE = E / K  # capacity = S: nothing drops
MESHES = [(1, 8), (2, 4), (8, 1)]
TOL = {"atol": 2e-5, "rtol": 2e-5}


def _layer(expert_type="mlp", activation="relu", capacity_factor=AMPLE, seed=0):
  config = MoEConfig(
    num_experts=E,
    top_k=K,
    d_model=D,
    d_ff=F,
    capacity_factor=capacity_factor,
    eval_capacity_factor=capacity_factor,
    activation=activation,
    expert_type=expert_type,
    sequences_per_group=SEQUENCES_PER_GROUP,
  )
  layer = MoEFeedForward(config, rngs=nnx.Rngs(seed))
  # Non-zero biases, so a bias mixed up between experts would show.
  for i, name in enumerate(("b_in_ExF", "b_out_ExD")):
    if hasattr(layer.experts, name):
      param = getattr(layer.experts, name)
      param[...] = 0.1 * jax.random.normal(jax.random.PRNGKey(100 + i), param[...].shape)
  # A router scale that spreads tokens over every expert without near-ties.
  layer.router.kernel[...] = layer.router.kernel[...] * 50.0
  return layer


def _inputs(seed=1):
  keys = jax.random.split(jax.random.PRNGKey(seed), 2)
  x_TxD = jax.random.normal(keys[0], (T, D))
  # Padding scattered over several shards.
  mask_T = jnp.ones((T,), bool).at[jnp.array([3, 17, 18, 40, 63])].set(False)
  cotangent_TxD = jax.random.normal(keys[1], (T, D))
  return x_TxD, mask_T, cotangent_TxD


def _scalar(y_TxD, aux, cotangent_TxD):
  """One scalar that depends on the output and on every differentiable statistic."""
  return (
    jnp.sum(y_TxD * cotangent_TxD)
    + 3.0 * aux.load_balancing_loss
    + 0.5 * aux.router_z_loss
    + aux.router_entropy
  )


def _run_layer(layer, x_TxD, mask_T=None):
  """The single-device layer on the [T, D] tokens as B sequences of L."""
  mask_BxL = None if mask_T is None else mask_T.reshape(B, L)
  y_BxLxD, aux = layer(x_TxD.reshape(B, L, D), mask_BxL, deterministic=False)
  return y_BxLxD.reshape(T, D), aux


def _reference_loss(params, x_TxD, mask_T, cotangent_TxD, graphdef, rest):
  y, aux = _run_layer(nnx.merge(graphdef, params, rest), x_TxD, mask_T)
  return _scalar(y, aux, cotangent_TxD), (y, aux)


def _capacity(capacity_factor):
  return None if capacity_factor is None else expert_capacity(S, E, K, capacity_factor)


def _expert_parallel(x_TxD, router_DxE, weights, *, mesh, capacity_factor, mask_T=None, **settings):
  """`expert_parallel_moe` on the [T, D] tokens cut into the layer's G groups of S; (y_TxD, MoEAux)."""
  mask_T = jnp.ones((T,), bool) if mask_T is None else mask_T
  y, sums = expert_parallel_moe(
    x_TxD.reshape(G, S, -1),
    mask_T.reshape(G, S),
    router_DxE,
    weights,
    mesh=mesh,
    top_k=K,
    capacity=_capacity(capacity_factor),
    **settings,
  )
  return y.reshape(T, -1), finalize(sums, K)


def _sharded_loss(
  params, x_TxD, mask_T, cotangent_TxD, *, mesh, capacity_factor, expert_type="mlp", activation="relu"
):
  layer_params = nnx.to_pure_dict(params)
  weights = tuple(layer_params["experts"][name] for name in EXPERT_PARAMS_BY_TYPE[expert_type])
  y, stats = _expert_parallel(
    x_TxD,
    layer_params["router"]["kernel"],
    weights,
    mesh=mesh,
    capacity_factor=capacity_factor,
    mask_T=mask_T,
    expert_type=expert_type,
    activation=activation,
  )
  return _scalar(y, stats, cotangent_TxD), (y, stats)


@pytest.fixture(scope="module")
def reference():
  """(params, value, (y, aux), grads) of the single-device layer with ample capacity."""
  layer = _layer()
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x_TxD, mask_T, cotangent_TxD = _inputs()
  fn = jax.jit(
    jax.value_and_grad(
      lambda p, x: _reference_loss(p, x, mask_T, cotangent_TxD, graphdef, rest), argnums=(0, 1), has_aux=True
    )
  )
  (value, outputs), grads = fn(params, x_TxD)
  # The comparison is meaningful only if nothing dropped and routing used every expert.
  assert float(outputs[1].dropped_fraction) == 0.0
  assert float(jnp.min(outputs[1].expert_fraction_E)) > 0.0
  return params, value, outputs, grads


@pytest.mark.parametrize("capacity_factor", [AMPLE, None], ids=["ample", "dropless"])
@pytest.mark.parametrize("data, expert", MESHES)
def test_outputs_losses_and_gradients_equal_the_single_device_layer(reference, data, expert, capacity_factor):
  params, ref_value, (ref_y, ref_aux), (ref_grad_params, ref_grad_x) = reference
  x_TxD, mask_T, cotangent_TxD = _inputs()
  mesh = make_mesh(data, expert)
  fn = jax.jit(
    jax.value_and_grad(
      lambda p, x: _sharded_loss(p, x, mask_T, cotangent_TxD, mesh=mesh, capacity_factor=capacity_factor),
      argnums=(0, 1),
      has_aux=True,
    )
  )
  (value, (y, stats)), (grad_params, grad_x) = fn(params, x_TxD)

  chex.assert_trees_all_close(y, ref_y, **TOL)
  chex.assert_trees_all_equal(y[~mask_T], jnp.zeros((int(jnp.sum(~mask_T)), D)))
  chex.assert_trees_all_close(stats, ref_aux, **TOL)
  chex.assert_trees_all_close(value, ref_value, **TOL)
  chex.assert_trees_all_close(grad_x, ref_grad_x, **TOL)
  chex.assert_trees_all_close(nnx.to_pure_dict(grad_params), nnx.to_pure_dict(ref_grad_params), **TOL)
  # Every expert weight really received gradient (none was silently left out).
  for name, grad in nnx.to_pure_dict(grad_params)["experts"].items():
    assert float(jnp.min(jnp.sum(jnp.abs(grad.reshape(E, -1)), axis=-1))) > 0.0, name


def test_gated_experts_equal_the_single_device_layer():
  layer = _layer(expert_type="gated", activation="silu")
  x_TxD, mask_T, _ = _inputs()
  ref_y, ref_aux = _run_layer(layer, x_TxD, mask_T)
  y, stats = jax.jit(
    lambda x: _expert_parallel(
      x,
      layer.router.kernel[...],
      expert_weights_of(layer.experts, "gated"),
      mesh=make_mesh(2, 4),
      capacity_factor=AMPLE,
      activation="silu",
      mask_T=mask_T,
      expert_type="gated",
    )
  )(x_TxD)
  chex.assert_trees_all_close(y, ref_y, **TOL)
  chex.assert_trees_all_close(stats.load_balancing_loss, ref_aux.load_balancing_loss, **TOL)


def test_dropless_gated_experts_equal_the_single_device_layer():
  """The ragged exchange with gated experts (grouped kernel), gradients included."""
  layer = _layer(expert_type="gated", activation="silu")
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x_TxD, mask_T, cotangent_TxD = _inputs()
  reference = jax.value_and_grad(
    lambda p, x: _reference_loss(p, x, mask_T, cotangent_TxD, graphdef, rest), argnums=(0, 1), has_aux=True
  )
  sharded = jax.value_and_grad(
    lambda p, x: _sharded_loss(
      p,
      x,
      mask_T,
      cotangent_TxD,
      mesh=make_mesh(2, 4),
      capacity_factor=None,
      expert_type="gated",
      activation="silu",
    ),
    argnums=(0, 1),
    has_aux=True,
  )
  (ref_value, (ref_y, _)), ref_grads = jax.jit(reference)(params, x_TxD)
  (value, (y, stats)), grads = jax.jit(sharded)(params, x_TxD)
  assert float(stats.dropped_fraction) == 0.0
  chex.assert_trees_all_close(y, ref_y, **TOL)
  chex.assert_trees_all_close(value, ref_value, **TOL)
  chex.assert_trees_all_close(grads[1], ref_grads[1], **TOL)
  chex.assert_trees_all_close(nnx.to_pure_dict(grads[0]), nnx.to_pure_dict(ref_grads[0]), **TOL)


@pytest.mark.parametrize("data, expert", MESHES)
def test_binding_capacity_drops_the_same_tokens_on_every_mesh(data, expert):
  """Capacity is per routing group, never per device: drops, outputs and gradients match one device."""
  factor = 1.0
  layer = _layer(capacity_factor=factor)
  # A skewed router so that several experts overflow in most groups.
  layer.router.kernel[...] = layer.router.kernel[...].at[:, 0].add(1.0)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x_TxD, mask_T, cotangent_TxD = _inputs()
  reference = jax.value_and_grad(
    lambda p: _reference_loss(p, x_TxD, mask_T, cotangent_TxD, graphdef, rest), has_aux=True
  )
  sharded = jax.value_and_grad(
    lambda p: _sharded_loss(
      p, x_TxD, mask_T, cotangent_TxD, mesh=make_mesh(data, expert), capacity_factor=factor
    ),
    has_aux=True,
  )
  (ref_value, (ref_y, ref_aux)), ref_grads = jax.jit(reference)(params)
  (value, (y, stats)), grads = jax.jit(sharded)(params)
  assert float(ref_aux.dropped_fraction) > 0.1, "the test needs capacity to bind"
  chex.assert_trees_all_close(y, ref_y, **TOL)
  chex.assert_trees_all_close(stats, ref_aux, **TOL)
  chex.assert_trees_all_close(value, ref_value, **TOL)
  chex.assert_trees_all_close(nnx.to_pure_dict(grads), nnx.to_pure_dict(ref_grads), **TOL)


def test_dropless_never_drops_where_capacity_would():
  """All tokens to one expert: capacity 1.0 drops most, dropless keeps all, equal to the ample layer."""
  layer = _layer()
  layer.router.kernel[...] = layer.router.kernel[...].at[:, 3].add(100.0)
  x_TxD = jnp.abs(_inputs()[0])  # x >= 0 with a large router column: expert 3 is everyone's first choice
  mesh = make_mesh(2, 4)
  run = lambda cf: jax.jit(
    lambda x: _expert_parallel(
      x, layer.router.kernel[...], expert_weights_of(layer.experts), mesh=mesh, capacity_factor=cf
    )
  )(x_TxD)
  _, tight = run(1.0)
  y, dropless = run(None)
  ref_y, ref_aux = _run_layer(layer, x_TxD)  # capacity E/K: S slots per expert
  assert float(tight.dropped_fraction) > 0.3
  assert float(dropless.dropped_fraction) == 0.0
  assert float(ref_aux.dropped_fraction) == 0.0
  np.testing.assert_allclose(float(dropless.expert_fraction_E[3]), 0.5, rtol=1e-6)
  chex.assert_trees_all_close(y, ref_y, **TOL)


def test_balancing_loss_is_global_not_a_mean_of_per_shard_losses():
  """Each shard prefers a different expert: every shard is skewed, the batch is balanced.

  The mean of per-shard Switch losses is then large while the global loss is
  near 1; the sharded layer must give the global value.
  """
  mesh = make_mesh(2, 4)
  shards = 8
  tokens_per_shard = T // shards
  # D = E = 8 and an identity router: a token near one-hot e_s prefers expert s.
  router_DxE = 4.0 * jnp.eye(E)
  shard_T = jnp.repeat(jnp.arange(shards), tokens_per_shard)
  x_TxD = jax.nn.one_hot(shard_T, E) + 0.3 * jax.random.normal(jax.random.PRNGKey(0), (T, E))
  weights = expert_weights_of(_layer().experts)
  _, stats = jax.jit(lambda x: _expert_parallel(x, router_DxE, weights, mesh=mesh, capacity_factor=AMPLE))(
    x_TxD
  )

  route = top_k_route(x_TxD @ router_DxE, K)
  global_loss = load_balancing_loss(route.router_probs_TxE, route.expert_indices_TxK)
  per_shard = [
    load_balancing_loss(
      route.router_probs_TxE[s * tokens_per_shard : (s + 1) * tokens_per_shard],
      route.expert_indices_TxK[s * tokens_per_shard : (s + 1) * tokens_per_shard],
    )
    for s in range(shards)
  ]
  mean_of_products = float(jnp.mean(jnp.stack(per_shard)))
  assert mean_of_products > float(global_loss) + 1.0, (mean_of_products, float(global_loss))
  np.testing.assert_allclose(float(stats.load_balancing_loss), float(global_loss), rtol=1e-5)


def test_jitter_and_expert_bias_match_single_device_routing():
  """Jitter noise (drawn once for the batch, as `top_k_route` draws it) and a bias steer every mesh alike."""
  layer = _layer()
  x_TxD, _, _ = _inputs()
  key = jax.random.PRNGKey(7)
  bias_E = 0.05 * jnp.arange(E, dtype=jnp.float32)
  noise_TxE = jax.random.uniform(key, (T, E), jnp.float32, minval=0.7, maxval=1.3)
  y, stats = jax.jit(
    lambda x: _expert_parallel(
      x,
      layer.router.kernel[...],
      expert_weights_of(layer.experts),
      mesh=make_mesh(1, 8),
      capacity_factor=None,
      jitter_GxSxE=noise_TxE.reshape(G, S, E),
      expert_bias_E=bias_E,
    )
  )(x_TxD)
  route = top_k_route(layer.router(x_TxD), K, jitter_key=key, jitter_eps=0.3, expert_bias_E=bias_E)
  # Per-token reference: each token through its K chosen experts, gate-weighted.
  outputs = layer.experts(jnp.broadcast_to(x_TxD[None], (E, T, D)))  # every expert on every token
  expected = jnp.einsum(
    "tkd,tk->td",
    jnp.take_along_axis(outputs.transpose(1, 0, 2), route.expert_indices_TxK[:, :, None], axis=1),
    route.gates_TxK,
  )
  chex.assert_trees_all_close(y, expected, **TOL)
  np.testing.assert_allclose(
    float(stats.load_balancing_loss),
    float(load_balancing_loss(route.router_probs_TxE, route.expert_indices_TxK)),
    rtol=1e-5,
  )


def test_group_count_and_expert_count_must_divide():
  layer = _layer()
  weights = expert_weights_of(layer.experts)
  with pytest.raises(ValueError, match="routing groups"):
    expert_parallel_moe(
      jnp.zeros((6, S, D)),
      jnp.ones((6, S), bool),
      layer.router.kernel[...],
      weights,
      mesh=make_mesh(2, 4),
      top_k=K,
      capacity=2,
    )
  with pytest.raises(ConfigError, match=r"^model\.num_experts"):
    expert_parallel_moe(
      jnp.zeros((G, S, D)),
      jnp.ones((G, S), bool),
      jnp.zeros((D, 6)),
      tuple(w[:6] for w in weights),
      mesh=make_mesh(2, 4),
      top_k=K,
      capacity=2,
    )


def test_a_batch_that_does_not_split_over_the_mesh_takes_the_one_device_path():
  """12 sequences in groups of 2 = 6 groups for 8 devices: same math, not expert-parallel."""
  mesh = make_mesh(2, 4)
  layer = _layer()
  sharded_layer = MoEFeedForward(layer.config, mesh=mesh, rngs=nnx.Rngs(0))
  nnx.update(sharded_layer, nnx.state(layer))
  x_BxLxD = jax.random.normal(jax.random.PRNGKey(3), (12, L, D))
  chex.assert_trees_all_close(
    jax.jit(lambda x: sharded_layer(x, deterministic=False))(x_BxLxD),
    layer(x_BxLxD, deterministic=False),
    **TOL,
  )


def test_bytes_moved_per_layer_from_shapes():
  # T_local = 256, C = ceil(1.25 * 256 * 2 / 8) = 80, buffer 8 * 80 * 128 * 4 bytes.
  moved = bytes_moved_per_layer(2048, 128, 8, 2, 1.25, data=1, expert=8)
  assert moved.capacity == 80
  assert moved.buffer_bytes_per_device == 8 * 80 * 128 * 4
  assert moved.sent_bytes_per_device == 2 * 8 * 80 * 128 * 4 * 7 // 8
  assert moved.total_bytes == 8 * moved.sent_bytes_per_device
  assert moved.payload_bytes == 2 * 2048 * 2 * 128 * 4 * 7 // 8
  assert bytes_moved_per_layer(2048, 128, 8, 2, None, data=8, expert=1).total_bytes == 0
  # Dropless on (2, 4): T_local = 256, E_local = 2, so S = 256 * min(2, 2) rows per peer, 4 peers.
  dropless = bytes_moved_per_layer(2048, 128, 8, 2, None, data=2, expert=4)
  assert dropless.capacity is None and dropless.rows_per_device == 4 * 512
  assert dropless.sent_bytes_per_device == 2 * 4 * 512 * 128 * 4 * 3 // 4
  # 64 experts on 8 devices: 8 * T_local * 2 rows instead of E * T_local.
  assert bytes_moved_per_layer(2048, 128, 64, 2, None, data=1, expert=8).rows_per_device == 8 * 256 * 2
  assert bytes_moved_per_layer(2048, 128, 8, 2, 1.0, data=1, expert=8, dtype=jnp.bfloat16).capacity == 64
  # Routing groups of 64 tokens: 4 groups per device of C = ceil(1.25 * 64 * 2 / 8) = 20 slots.
  grouped = bytes_moved_per_layer(2048, 128, 8, 2, 1.25, data=1, expert=8, group_size=64)
  assert grouped.capacity == 20 and grouped.rows_per_device == 4 * 8 * 20


# ---------------------------------------------------------------------------
# Shardings of a whole TrainState through a jitted step.


def test_expert_weights_and_adam_moments_stay_sharded_through_a_jitted_step(reference):
  data, expert = 2, 4
  mesh = make_mesh(data, expert)
  params = reference[0]
  optimizer = optax.adam(1e-2)
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    model_state=nnx.State({}),
    opt_state=optimizer.init(params),
    rng=jax.random.PRNGKey(0),
  )
  state_shardings = train_state_shardings(state, mesh)
  x_TxD, mask_T, cotangent_TxD = _inputs()
  batch = {"x": x_TxD, "mask": mask_T, "cotangent": cotangent_TxD}

  def step(state, batch):
    loss_fn = lambda p: _sharded_loss(
      p, batch["x"], batch["mask"], batch["cotangent"], mesh=mesh, capacity_factor=AMPLE
    )[0]
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
    return new_state, loss, grads

  jitted = jax.jit(
    step,
    in_shardings=(state_shardings, batch_shardings(batch, mesh)),
    out_shardings=(state_shardings, None, None),
  )
  new_state, _, grads = jitted(jax.device_put(state, state_shardings), batch)

  adam = new_state.opt_state[0]
  for tree in (new_state.params, adam.mu, adam.nu):
    pure = nnx.to_pure_dict(tree)
    for name in EXPERT_PARAMS_BY_TYPE["mlp"]:
      leaf = pure["experts"][name]
      assert leaf.sharding.spec == P("expert"), name
      assert leaf.addressable_shards[0].data.shape[0] == E // expert, name
      assert len({shard.index[0].start for shard in leaf.addressable_shards}) == expert, name
    assert pure["router"]["kernel"].sharding.is_fully_replicated
  assert new_state.step.sharding.is_fully_replicated
  # The moments are the gradients of the single-device layer, and the update moved the weights.
  ref_grads = nnx.to_pure_dict(reference[3][0])
  chex.assert_trees_all_close(nnx.to_pure_dict(adam.mu), jax.tree.map(lambda g: 0.1 * g, ref_grads), **TOL)
  chex.assert_trees_all_close(nnx.to_pure_dict(grads), ref_grads, **TOL)
  moved = jax.tree.map(
    lambda a, b: float(jnp.max(jnp.abs(a - b))), nnx.to_pure_dict(new_state.params), nnx.to_pure_dict(params)
  )
  assert min(jax.tree.leaves(moved)) > 0.0


def test_tree_shardings_use_the_name_table_and_refuse_uneven_experts():
  layer = _layer()
  params = nnx.state(layer, nnx.Param)
  shardings = nnx.to_pure_dict(tree_shardings(params, make_mesh(2, 4)))
  for name in EXPERT_PARAMS_BY_TYPE["mlp"]:
    assert shardings["experts"][name].spec == P("expert")
  assert shardings["router"]["kernel"].spec == P()
  with pytest.raises(ConfigError, match=r"^model\.num_experts: expert weight .*w_in_ExDxF"):
    tree_shardings({"experts": {"w_in_ExDxF": jnp.zeros((6, D, F))}}, make_mesh(2, 4))
