"""Sequence experts: E networks that each read a whole sequence and return one vector.

Shapes: B batch, L length, D input width, H hidden (= output) width, E experts,
W convolution kernel width, P = L + W - 1 the zero-padded length. `3H` / `4H`
are the GRU's / LSTM's gates stacked along the last axis.

These are the experts of the original PyTorch MRPC project (an MLP, an RNN and a
CNN under one gating network), rewritten so that every expert type is one stack:
all weights carry a leading E axis (ready to be split on the 'expert' mesh axis
by name: `SEQUENCE_EXPERT_PARAMS_BY_TYPE` lists them for `moe.parameter_sharding`) and
all E experts run as batched matmuls, never a Python loop over experts. Each stack maps

  x_ExBxLxD, token_mask_BxL (True = real token, None = all real) -> [E, B, H].

Padding: padded positions are zeroed before any arithmetic, so whatever they
hold (even NaN) changes neither outputs nor gradients. With right-padded
(prefix) masks every expert returns what it would on the unpadded sequence:
the recurrent experts hold their state over padded steps, the convolution sees
padding as the 'SAME' zero border, the pools skip it. A row with no real
token gives the initial state (RNNs), 0 (CNN) or the MLP of a zero mean.

The math is pure functions (`gru_last_state`, `lstm_last_state`,
`conv_max_pool`, `mean_pool_mlp`); the nnx modules only hold the weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tmoe_jax.moe.experts import expert_kernel_init


def _zero_padding(x_ExBxLxD: jax.Array, token_mask_BxL: jax.Array | None) -> jax.Array:
  # `where`, not a multiply: 0 * NaN is NaN, and a NaN in a padded slot would
  # also poison the weight gradients of the input projections.
  if token_mask_BxL is None:
    return x_ExBxLxD
  return jnp.where(token_mask_BxL[None, :, :, None], x_ExBxLxD, jnp.zeros((), x_ExBxLxD.dtype))


def masked_sequence_mean(x_BxLxD: jax.Array, token_mask_BxL: jax.Array | None) -> jax.Array:
  """[..., B, D]: the mean over real tokens of `x_...xBxLxD`, 0 for rows with no real token.

  Any leading axes (e.g. E) broadcast against the [B, L] mask.
  """
  if token_mask_BxL is None:
    return jnp.mean(x_BxLxD, axis=-2)
  mask_BxLx1 = token_mask_BxL[..., None]
  total_BxD = jnp.sum(jnp.where(mask_BxLx1, x_BxLxD, jnp.zeros((), x_BxLxD.dtype)), axis=-2)
  count_Bx1 = jnp.maximum(jnp.sum(mask_BxLx1, axis=-2), 1).astype(x_BxLxD.dtype)
  return total_BxD / count_Bx1


def _time_major_inputs(
  x_ExBxLxD: jax.Array, token_mask_BxL: jax.Array | None, w_input_ExDxG: jax.Array, b_ExG: jax.Array
):
  """Input projections of every step at once ([L, E, B, G]) and the step mask ([L, B]).

  Hoisting x W_input out of the scan leaves one [B, H] x [H, G] matmul per
  expert per step inside it, the part that is truly sequential.
  """
  batch, length = x_ExBxLxD.shape[1:3]
  x_ExBxLxD = _zero_padding(x_ExBxLxD, token_mask_BxL)
  xproj_LxExBxG = jnp.einsum("ebld,edg->lebg", x_ExBxLxD, w_input_ExDxG) + b_ExG[None, :, None]
  if token_mask_BxL is None:
    token_mask_BxL = jnp.ones((batch, length), bool)
  return xproj_LxExBxG, token_mask_BxL.T


def _hold(valid_B: jax.Array, new_ExBxH: jax.Array, old_ExBxH: jax.Array) -> jax.Array:
  return jnp.where(valid_B[None, :, None], new_ExBxH, old_ExBxH)


def gru_last_state(
  x_ExBxLxD: jax.Array,
  token_mask_BxL: jax.Array | None,
  w_input_ExDx3H: jax.Array,
  w_hidden_ExHx3H: jax.Array,
  b_input_Ex3H: jax.Array,
  b_hidden_Ex3H: jax.Array,
) -> jax.Array:
  """E GRUs (PyTorch's equations, gate order r, z, n) run over the sequence; [E, B, H].

    r = sigmoid(x W_ir + b_ir + h W_hr + b_hr)
    z = sigmoid(x W_iz + b_iz + h W_hz + b_hz)
    n = tanh(x W_in + b_in + r * (h W_hn + b_hn))
    h = (1 - z) * n + z * h

  Two biases because b_hn sits inside r * (...); this is also torch.nn.GRU's
  layout, so its weights port as w_input = weight_ih_l0.T, w_hidden =
  weight_hh_l0.T. The state starts at 0, stays put on padded steps, and the
  result is the state after the last real token.
  """
  hidden = w_hidden_ExHx3H.shape[1]
  xproj_LxExBx3H, mask_LxB = _time_major_inputs(x_ExBxLxD, token_mask_BxL, w_input_ExDx3H, b_input_Ex3H)

  def step(h_ExBxH, inputs):
    xproj_ExBx3H, valid_B = inputs
    hproj_ExBx3H = jnp.einsum("ebh,ehg->ebg", h_ExBxH, w_hidden_ExHx3H) + b_hidden_Ex3H[:, None]
    x_r, x_z, x_n = jnp.split(xproj_ExBx3H, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(hproj_ExBx3H, 3, axis=-1)
    reset_ExBxH = jax.nn.sigmoid(x_r + h_r)
    update_ExBxH = jax.nn.sigmoid(x_z + h_z)
    candidate_ExBxH = jnp.tanh(x_n + reset_ExBxH * h_n)
    new_ExBxH = (1.0 - update_ExBxH) * candidate_ExBxH + update_ExBxH * h_ExBxH
    return _hold(valid_B, new_ExBxH, h_ExBxH), None

  num_experts, batch = x_ExBxLxD.shape[:2]
  h0_ExBxH = jnp.zeros((num_experts, batch, hidden), xproj_LxExBx3H.dtype)
  h_ExBxH, _ = jax.lax.scan(step, h0_ExBxH, (xproj_LxExBx3H, mask_LxB))
  return h_ExBxH


def lstm_last_state(
  x_ExBxLxD: jax.Array,
  token_mask_BxL: jax.Array | None,
  w_input_ExDx4H: jax.Array,
  w_hidden_ExHx4H: jax.Array,
  b_Ex4H: jax.Array,
) -> jax.Array:
  """E LSTMs (PyTorch's gate order i, f, g, o) run over the sequence; [E, B, H], the last h.

    i, f, o = sigmoid(x W_i* + h W_h* + b_*);  g = tanh(x W_ig + h W_hg + b_g)
    c = f * c + i * g;  h = o * tanh(c)

  One bias: unlike the GRU, both of torch.nn.LSTM's biases only ever appear
  summed (b = bias_ih + bias_hh). h and c start at 0 and stay put on padded steps.
  """
  hidden = w_hidden_ExHx4H.shape[1]
  xproj_LxExBx4H, mask_LxB = _time_major_inputs(x_ExBxLxD, token_mask_BxL, w_input_ExDx4H, b_Ex4H)

  def step(carry, inputs):
    h_ExBxH, c_ExBxH = carry
    xproj_ExBx4H, valid_B = inputs
    gates_ExBx4H = xproj_ExBx4H + jnp.einsum("ebh,ehg->ebg", h_ExBxH, w_hidden_ExHx4H)
    i, f, g, o = jnp.split(gates_ExBx4H, 4, axis=-1)
    new_c_ExBxH = jax.nn.sigmoid(f) * c_ExBxH + jax.nn.sigmoid(i) * jnp.tanh(g)
    new_h_ExBxH = jax.nn.sigmoid(o) * jnp.tanh(new_c_ExBxH)
    return (_hold(valid_B, new_h_ExBxH, h_ExBxH), _hold(valid_B, new_c_ExBxH, c_ExBxH)), None

  num_experts, batch = x_ExBxLxD.shape[:2]
  zeros_ExBxH = jnp.zeros((num_experts, batch, hidden), xproj_LxExBx4H.dtype)
  (h_ExBxH, _), _ = jax.lax.scan(step, (zeros_ExBxH, zeros_ExBxH), (xproj_LxExBx4H, mask_LxB))
  return h_ExBxH


def conv_max_pool(
  x_ExBxLxD: jax.Array, token_mask_BxL: jax.Array | None, w_ExWxDxH: jax.Array, b_ExH: jax.Array
) -> jax.Array:
  """E 1-D convolutions ('SAME', stride 1), ReLU, max over real positions; [E, B, H].

  'SAME' pads (W - 1) // 2 zeros before and the rest after, as
  `jax.lax.conv_general_dilated` does. Implemented as an einsum over the W
  shifted copies of the input rather than a grouped convolution: E stays the
  leading batch axis of one dot_general (what the 'expert' mesh axis shards,
  with no transpose of E into the channel axis and back), the [E, W, D, H]
  kernel is an ordinary stacked weight, and for the small W of text CNNs the
  W-fold copy of the activations costs little.
  """
  width = w_ExWxDxH.shape[1]
  length = x_ExBxLxD.shape[2]
  x_ExBxLxD = _zero_padding(x_ExBxLxD, token_mask_BxL)
  before = (width - 1) // 2
  padded_ExBxPxD = jnp.pad(x_ExBxLxD, ((0, 0), (0, 0), (before, width - 1 - before), (0, 0)))
  windows_ExBxLxWxD = jnp.stack([padded_ExBxPxD[:, :, w : w + length] for w in range(width)], axis=3)
  conv_ExBxLxH = jnp.einsum("eblwd,ewdh->eblh", windows_ExBxLxWxD, w_ExWxDxH) + b_ExH[:, None, None]
  relu_ExBxLxH = jax.nn.relu(conv_ExBxLxH)
  if token_mask_BxL is None:
    return jnp.max(relu_ExBxLxH, axis=2)
  # ReLU outputs are >= 0, so filling padding with 0 (not -inf) leaves the max over
  # real positions unchanged and gives 0, not -inf, for a row with no real token.
  relu_ExBxLxH = jnp.where(token_mask_BxL[None, :, :, None], relu_ExBxLxH, jnp.zeros((), relu_ExBxLxH.dtype))
  return jnp.max(relu_ExBxLxH, axis=2)


def mean_pool_mlp(
  x_ExBxLxD: jax.Array,
  token_mask_BxL: jax.Array | None,
  w_in_ExDxH: jax.Array,
  b_in_ExH: jax.Array,
  w_out_ExHxH: jax.Array,
  b_out_ExH: jax.Array,
) -> jax.Array:
  """E MLPs D -> H -> H (ReLU between) over the mean of the real tokens; [E, B, H]."""
  mean_ExBxD = masked_sequence_mean(x_ExBxLxD, token_mask_BxL)
  hidden_ExBxH = jax.nn.relu(jnp.einsum("ebd,edh->ebh", mean_ExBxD, w_in_ExDxH) + b_in_ExH[:, None])
  return jnp.einsum("ebh,ehk->ebk", hidden_ExBxH, w_out_ExHxH) + b_out_ExH[:, None]


def _orthogonal_blocks(key: jax.Array, num_experts: int, hidden: int, num_gates: int) -> jax.Array:
  """[E, H, G*H]: an independent orthogonal H x H block per (expert, gate).

  `nnx.initializers.orthogonal` on the whole stacked shape would orthogonalise
  the flattened [E*H, G*H] matrix instead, which leaves each expert's blocks
  neither orthogonal nor independent of the other experts'.
  """
  keys = jax.random.split(key, num_experts * num_gates)
  blocks_NxHxH = jax.vmap(lambda k: nnx.initializers.orthogonal()(k, (hidden, hidden)))(keys)
  blocks_ExGxHxH = blocks_NxHxH.reshape(num_experts, num_gates, hidden, hidden)
  return blocks_ExGxHxH.transpose(0, 2, 1, 3).reshape(num_experts, hidden, num_gates * hidden)


class _SequenceExperts(nnx.Module):
  def _cast(self, param: nnx.Param) -> jax.Array:
    return param[...].astype(self.dtype)


class GruExperts(_SequenceExperts):
  """E single-layer GRUs; see `gru_last_state`. Output width H = hidden_size."""

  def __init__(self, num_experts: int, d_model: int, hidden_size: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    g = 3 * hidden_size
    self.w_input_ExDx3H = nnx.Param(expert_kernel_init()(rngs.params(), (num_experts, d_model, g)))
    # Orthogonal recurrent blocks keep the state's scale from growing or dying
    # over the steps at init (the usual choice, also Flax's GRUCell default).
    self.w_hidden_ExHx3H = nnx.Param(_orthogonal_blocks(rngs.params(), num_experts, hidden_size, 3))
    self.b_input_Ex3H = nnx.Param(jnp.zeros((num_experts, g)))
    self.b_hidden_Ex3H = nnx.Param(jnp.zeros((num_experts, g)))

  def __call__(self, x_ExBxLxD: jax.Array, token_mask_BxL: jax.Array | None = None) -> jax.Array:
    """[E, B, L, D] (+ [B, L] mask) -> [E, B, H], the state after each sequence's last real token."""
    return gru_last_state(
      x_ExBxLxD.astype(self.dtype),
      token_mask_BxL,
      self._cast(self.w_input_ExDx3H),
      self._cast(self.w_hidden_ExHx3H),
      self._cast(self.b_input_Ex3H),
      self._cast(self.b_hidden_Ex3H),
    )


class LstmExperts(_SequenceExperts):
  """E single-layer LSTMs; see `lstm_last_state`. Output width H = hidden_size."""

  def __init__(self, num_experts: int, d_model: int, hidden_size: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    g = 4 * hidden_size
    self.w_input_ExDx4H = nnx.Param(expert_kernel_init()(rngs.params(), (num_experts, d_model, g)))
    self.w_hidden_ExHx4H = nnx.Param(_orthogonal_blocks(rngs.params(), num_experts, hidden_size, 4))
    # Forget-gate bias 1 (Jozefowicz et al. 2015): the cell starts out
    # remembering, so gradients reach early tokens before the gate is learned.
    forget_Ex4H = jnp.zeros((num_experts, 4, hidden_size)).at[:, 1].set(1.0)
    self.b_Ex4H = nnx.Param(forget_Ex4H.reshape(num_experts, g))

  def __call__(self, x_ExBxLxD: jax.Array, token_mask_BxL: jax.Array | None = None) -> jax.Array:
    """[E, B, L, D] (+ [B, L] mask) -> [E, B, H], h after each sequence's last real token."""
    return lstm_last_state(
      x_ExBxLxD.astype(self.dtype),
      token_mask_BxL,
      self._cast(self.w_input_ExDx4H),
      self._cast(self.w_hidden_ExHx4H),
      self._cast(self.b_Ex4H),
    )


class ConvExperts(_SequenceExperts):
  """E 1-D CNNs (kernel width W, ReLU, masked max-pool); see `conv_max_pool`."""

  def __init__(
    self,
    num_experts: int,
    d_model: int,
    hidden_size: int,
    *,
    kernel_width: int = 3,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if kernel_width < 1:
      raise ValueError(f"kernel_width must be >= 1, got {kernel_width}")
    self.dtype = dtype
    # Fan-in is W * D: each output sums over a window of W input vectors.
    init = nnx.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=(1, 2), out_axis=-1, batch_axis=(0,)
    )
    self.w_ExWxDxH = nnx.Param(init(rngs.params(), (num_experts, kernel_width, d_model, hidden_size)))
    self.b_ExH = nnx.Param(jnp.zeros((num_experts, hidden_size)))

  def __call__(self, x_ExBxLxD: jax.Array, token_mask_BxL: jax.Array | None = None) -> jax.Array:
    """[E, B, L, D] (+ [B, L] mask) -> [E, B, H], the max over real positions."""
    return conv_max_pool(
      x_ExBxLxD.astype(self.dtype), token_mask_BxL, self._cast(self.w_ExWxDxH), self._cast(self.b_ExH)
    )


class MeanPoolMlpExperts(_SequenceExperts):
  """E MLPs over the masked mean of the sequence (the "MLP expert"); see `mean_pool_mlp`."""

  def __init__(self, num_experts: int, d_model: int, hidden_size: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    init = expert_kernel_init()
    self.w_in_ExDxH = nnx.Param(init(rngs.params(), (num_experts, d_model, hidden_size)))
    self.b_in_ExH = nnx.Param(jnp.zeros((num_experts, hidden_size)))
    self.w_out_ExHxH = nnx.Param(init(rngs.params(), (num_experts, hidden_size, hidden_size)))
    self.b_out_ExH = nnx.Param(jnp.zeros((num_experts, hidden_size)))

  def __call__(self, x_ExBxLxD: jax.Array, token_mask_BxL: jax.Array | None = None) -> jax.Array:
    """[E, B, L, D] (+ [B, L] mask) -> [E, B, H]."""
    return mean_pool_mlp(
      x_ExBxLxD.astype(self.dtype),
      token_mask_BxL,
      self._cast(self.w_in_ExDxH),
      self._cast(self.b_in_ExH),
      self._cast(self.w_out_ExHxH),
      self._cast(self.b_out_ExH),
    )


# expert_type -> stack class; all take (num_experts, d_model, hidden_size, *, dtype, rngs)
# (ConvExperts also kernel_width) and map [E, B, L, D] (+ [B, L] mask) -> [E, B, H].
SEQUENCE_EXPERT_TYPES = {
  "mlp": MeanPoolMlpExperts,
  "gru": GruExperts,
  "lstm": LstmExperts,
  "cnn": ConvExperts,
}

# expert_type -> its stacked [E, ...] parameter names, for name-based expert
# sharding (cf. `tmoe_jax.moe.experts.EXPERT_PARAMS_BY_TYPE`).
SEQUENCE_EXPERT_PARAMS_BY_TYPE: dict[str, tuple[str, ...]] = {
  "mlp": ("w_in_ExDxH", "b_in_ExH", "w_out_ExHxH", "b_out_ExH"),
  "gru": ("w_input_ExDx3H", "w_hidden_ExHx3H", "b_input_Ex3H", "b_hidden_Ex3H"),
  "lstm": ("w_input_ExDx4H", "w_hidden_ExHx4H", "b_Ex4H"),
  "cnn": ("w_ExWxDxH", "b_ExH"),
}
