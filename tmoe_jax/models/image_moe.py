"""The image mixture-of-experts classifier of the original MNIST project, in pure functions wired by nnx modules.

Shapes: B batch, H x W image, P = H * W pixels, E experts, K experts chosen per
image, C classes, I / O a layer's input / output width, F hidden width,
S x S convolution kernel, Ci / Co input / output channels, Q = the flattened
feature width after the convolutions.

A gating network reads the flattened image and gives a softmax over E experts,
its logits divided by a learnable temperature T; every expert is a complete
classifier (an MLP P-256-128-C, or a small CNN). All E experts run on every
image, their weights stacked on a leading E axis: the dense layers as batched
einsums, the convolutions unrolled over E (see `cnn_expert_logits`). With
`top_k` > 0 only the K most probable experts keep a non-zero gate
(renormalised over the K; for K = 1 that gate is always 1, so the gate learns
only from the auxiliary losses), which sparsifies the mixture, not the
compute: for five small experts, gathering each expert's images costs more
than the E/K-fold FLOPs it would save.

Combining the experts (`COMBINES`):
  "logits": softmax(sum_e g_e(x) * logits_e(x)), the gate-weighted sum of the
    experts' logits. The experts cooperate like one wider network: every
    expert gets every example's gradient (scaled by its gate), so for a fixed
    budget it learns fastest (configs/mnist_moe.py: 98.8 % test accuracy in
    6000 steps, against 98.3 % for "probabilities"); the gate tends to stay soft.
  "probabilities": the mixture of Jacobs et al. (1991),
    p(y | x) = sum_e g_e(x) p_e(y | x), computed in log space (logsumexp of
    log g_e + log_softmax(expert logits)). Its likelihood makes the experts
    compete: each learns mostly from the examples whose gate it wins, and the
    gate becomes a posterior over which expert explains the image (sharper
    and more specialised, slower to train). With a one-hot gate it is exactly
    the chosen expert's cross-entropy, and it is the principled way to mix
    guided experts that each only know their own labels.

Guided routing (`owner_expert_B`): the gate logits are masked to the owner
expert of each image's label (`moe.guided.guided_route`: the owner alone for
dense gating or K = 1, the owner plus the router's best K - 1 others for K > 1),
so in training each expert only learns its own labels; the gate then learns only
from `moe.guided.guided_gate_loss`, added by the task. At evaluation no owner is
given and the learned gate decides.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from tmoe_jax.moe.experts import expert_kernel_init
from tmoe_jax.moe.guided import guided_route
from tmoe_jax.moe.routing import top_k_route
from tmoe_jax.moe.statistics import MoEAux, undropped_routing_aux
from tmoe_jax.validation import require, settings_from_section

EXPERT_TYPES = ("mlp", "cnn")
COMBINES = ("probabilities", "logits")
# How a CNN expert's conv stage halves the resolution: stride-1 conv + 2x2 max pool, or a stride-2 conv.
DOWNSAMPLES = ("max_pool", "stride")


@dataclasses.dataclass(frozen=True)
class ImageMoEConfig:
  """Settings of `ImageMoE`; `from_config` builds them from the run config's `model` section."""

  image_height: int
  image_width: int
  num_classes: int
  num_experts: int = 5
  expert_type: str = "mlp"
  hidden_dims: tuple[int, ...] = (256, 128)  # MLP experts: P -> 256 -> 128 -> C
  cnn_channels: tuple[int, ...] = (16, 32)  # CNN experts: each conv stage halves H and W
  cnn_kernel_size: int = 3
  cnn_downsample: str = "max_pool"  # or "stride": stride-2 convolutions instead of pooling
  cnn_dense_dim: int = 128  # CNN experts: the dense layer after the convolutions
  gate_hidden_dim: int = 0  # 0 = a linear gate over the pixels, as in the original
  gate_temperature: float = 1.0  # initial T of softmax(gate logits / T)
  learn_temperature: bool = True
  top_k: int = 0  # 0 = dense: every expert's gate is its softmax probability
  combine: str = "logits"
  dropout_rate: float = 0.0

  def __post_init__(self):
    for name in ("image_height", "image_width", "num_classes", "num_experts", "cnn_kernel_size"):
      require(getattr(self, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
    require(
      self.expert_type in EXPERT_TYPES,
      "model.expert_type",
      f"must be one of {EXPERT_TYPES}, got {self.expert_type!r}",
    )
    require(
      self.cnn_downsample in DOWNSAMPLES,
      "model.cnn_downsample",
      f"must be one of {DOWNSAMPLES}, got {self.cnn_downsample!r}",
    )
    require(self.combine in COMBINES, "model.combine", f"must be one of {COMBINES}, got {self.combine!r}")
    for name in ("hidden_dims", "cnn_channels"):
      widths = getattr(self, name)
      require(
        all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths),
        f"model.{name}",
        f"must be a tuple of ints >= 1, got {widths!r}",
      )
    require(len(self.cnn_channels) >= 1, "model.cnn_channels", "must name at least one convolution")
    require(self.cnn_dense_dim >= 1, "model.cnn_dense_dim", f"must be >= 1, got {self.cnn_dense_dim}")
    require(self.gate_hidden_dim >= 0, "model.gate_hidden_dim", f"must be >= 0, got {self.gate_hidden_dim}")
    require(self.gate_temperature > 0, "model.gate_temperature", f"must be > 0, got {self.gate_temperature}")
    require(
      0 <= self.top_k <= self.num_experts,
      "model.top_k",
      f"must be in [0, num_experts={self.num_experts}] (0 = dense gating), got {self.top_k}",
    )
    require(
      0.0 <= self.dropout_rate < 1.0, "model.dropout_rate", f"must be in [0, 1), got {self.dropout_rate}"
    )
    if self.expert_type == "cnn":
      require(
        self.cnn_flat_dim >= 1,
        "model.cnn_channels",
        f"{len(self.cnn_channels)} conv + 2x2 pool stages shrink a "
        f"{self.image_height}x{self.image_width} image to nothing; use fewer",
      )

  @property
  def num_pixels(self) -> int:
    return self.image_height * self.image_width

  @property
  def cnn_flat_dim(self) -> int:
    """Q: the features one CNN expert flattens after its conv + pool stages."""
    height, width = self.image_height, self.image_width
    for _ in self.cnn_channels:
      # A 2x2 pool floors odd sizes, a stride-2 'SAME' convolution rounds them up.
      height, width = (
        (height // 2, width // 2) if self.cnn_downsample == "max_pool" else (-(-height // 2), -(-width // 2))
      )
    return height * width * self.cnn_channels[-1]

  @classmethod
  def from_config(cls, model_config, *, image_height: int, image_width: int, num_classes: int):
    """Type-checks every field of `model_config` this dataclass has and builds it."""
    return settings_from_section(
      cls, model_config, image_height=image_height, image_width=image_width, num_classes=num_classes
    )


# ----------------------------------------------------------------------------- pure functions


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity when `key` is None (evaluation) or `rate` is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def gate_log_weights(router_logits_BxE: jax.Array, selected_BxE: jax.Array | None = None) -> jax.Array:
  """float32 [B, E]: log of each expert's gate, softmax over the selected experts (all if None).

  Unselected experts get log-gate -inf (gate exactly 0). Computed in log space so
  that a gate rounding to 0 never produces 0 * inf in the gradient.
  """
  logits_BxE = router_logits_BxE.astype(jnp.float32)
  if selected_BxE is not None:
    logits_BxE = jnp.where(selected_BxE, logits_BxE, -jnp.inf)
  return jax.nn.log_softmax(logits_BxE, axis=-1)


def selection_mask(expert_indices_BxK: jax.Array, num_experts: int) -> jax.Array:
  """bool [B, E]: True where the expert is among the row's K chosen ones."""
  return jnp.any(jax.nn.one_hot(expert_indices_BxK, num_experts, dtype=bool), axis=1)


def combine_experts(expert_logits_ExBxC: jax.Array, log_gates_BxE: jax.Array, combine: str) -> jax.Array:
  """float32 [B, C]: class log-probabilities of the mixture (see the module docstring for `combine`)."""
  expert_logits_ExBxC = expert_logits_ExBxC.astype(jnp.float32)
  if combine == "probabilities":
    expert_log_probs_ExBxC = jax.nn.log_softmax(expert_logits_ExBxC, axis=-1)
    return jax.nn.logsumexp(log_gates_BxE.T[:, :, None] + expert_log_probs_ExBxC, axis=0)
  if combine == "logits":
    mixed_BxC = jnp.einsum("ebc,be->bc", expert_logits_ExBxC, jnp.exp(log_gates_BxE))
    return jax.nn.log_softmax(mixed_BxC, axis=-1)
  raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")


def mlp_expert_logits(
  layers: Sequence[tuple[jax.Array, jax.Array]],
  x_BxP: jax.Array,
  *,
  dropout_rate: float = 0.0,
  dropout_key: jax.Array | None = None,
) -> jax.Array:
  """E MLPs on the same flattened images: [E, B, C].

  layers: (w_ExIxO, b_ExO) per layer, the first with I = P, the last with O = C;
  ReLU and dropout after every layer but the last.
  """
  (w_ExPxO, b_ExO), *rest = layers
  h_ExBxO = jnp.einsum("bp,epo->ebo", x_BxP, w_ExPxO) + b_ExO[:, None]
  keys = [None] * len(rest) if dropout_key is None else list(jax.random.split(dropout_key, len(rest)))
  for (w_ExIxO, b_ExO), key in zip(rest, keys):
    h_ExBxI = dropout(jax.nn.relu(h_ExBxO), dropout_rate, key)
    h_ExBxO = jnp.einsum("ebi,eio->ebo", h_ExBxI, w_ExIxO) + b_ExO[:, None]
  return h_ExBxO


def max_pool_2x2(x_BxHxWxC: jax.Array) -> jax.Array:
  """2x2 max pool, stride 2: [B, H // 2, W // 2, C]; an odd last row / column is dropped, as
  torch.nn.MaxPool2d(2) does. A reshape and a max, whose gradient is elementwise: XLA:CPU's
  `reduce_window` gradient (select-and-scatter) is many times slower."""
  batch, height, width, channels = x_BxHxWxC.shape
  x = x_BxHxWxC[:, : height // 2 * 2, : width // 2 * 2]
  return jnp.max(x.reshape(batch, height // 2, 2, width // 2, 2, channels), axis=(2, 4))


def conv2d_same(
  x_BxHxWxCi: jax.Array, kernel_SxSxCixCo: jax.Array, bias_Co: jax.Array, *, stride: int = 1
) -> jax.Array:
  """'SAME' 2-D convolution (cross-correlation, as every framework's conv): [B, ceil(H / stride),
  ceil(W / stride), Co]. 'SAME' pads (total - total // 2) after, as XLA and TensorFlow do."""
  out = jax.lax.conv_general_dilated(
    x_BxHxWxCi, kernel_SxSxCixCo, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return out + bias_Co


def cnn_features(
  convs: Sequence[tuple[jax.Array, jax.Array]], images_BxHxW: jax.Array, *, downsample: str = "max_pool"
) -> jax.Array:
  """One CNN expert's convolutional part: [B, Q].

  Each (kernel_SxSxCixCo, bias_Co) of `convs` is a 'SAME' convolution and ReLU
  that halves the resolution (`DOWNSAMPLES`: "max_pool" = stride 1 then a 2x2
  max pool, "stride" = stride 2); the result is flattened (row, column, channel).
  """
  h = images_BxHxW[..., None]
  for kernel_SxSxCixCo, bias_Co in convs:
    if downsample == "max_pool":
      h = max_pool_2x2(jax.nn.relu(conv2d_same(h, kernel_SxSxCixCo, bias_Co)))
    elif downsample == "stride":
      h = jax.nn.relu(conv2d_same(h, kernel_SxSxCixCo, bias_Co, stride=2))
    else:
      raise ValueError(f"downsample must be one of {DOWNSAMPLES}, got {downsample!r}")
  return h.reshape(h.shape[0], -1)


def cnn_expert_logits(
  convs: Sequence[tuple[jax.Array, jax.Array]],
  dense: tuple[jax.Array, jax.Array],
  output: tuple[jax.Array, jax.Array],
  images_BxHxW: jax.Array,
  *,
  downsample: str = "max_pool",
  dropout_rate: float = 0.0,
  dropout_key: jax.Array | None = None,
) -> jax.Array:
  """E CNN experts on the same images: [E, B, C]; every weight carries a leading E axis.

  convs: (kernel_ExSxSxCixCo, bias_ExCo) per conv stage (`cnn_features`);
  dense: (w_ExQxF, b_ExF), ReLU and dropout; output: (w_ExFxC, b_ExC).

  The convolutions are unrolled over the (few, static) experts: vmapped, XLA:CPU
  lowers batched-kernel convolutions to grouped convolutions some 10x slower
  (the backward pass especially), and even as batched im2col matmuls they are
  1.5-2x slower than E plain convolutions. The dense layers run as one batched
  einsum over E.
  """
  num_experts = output[0].shape[0]
  features_ExBxQ = jnp.stack(
    [
      cnn_features([(kernel[e], bias[e]) for kernel, bias in convs], images_BxHxW, downsample=downsample)
      for e in range(num_experts)
    ]
  )
  w_ExQxF, b_ExF = dense
  hidden_ExBxF = jax.nn.relu(jnp.einsum("ebq,eqf->ebf", features_ExBxQ, w_ExQxF) + b_ExF[:, None])
  hidden_ExBxF = dropout(hidden_ExBxF, dropout_rate, dropout_key)
  w_ExFxC, b_ExC = output
  return jnp.einsum("ebf,efc->ebc", hidden_ExBxF, w_ExFxC) + b_ExC[:, None]


@struct.dataclass
class ImageMoEOutput:
  """What one forward pass of `ImageMoE` returns.

  log_probs_BxC: float32, the mixture's class log-probabilities (the model's output logits).
  expert_logits_ExBxC: each expert's own class logits.
  gates_BxE: float32, the weights the mixture used (teacher-forced in guided training).
  router_probs_BxE: float32, the learned gate: softmax(router logits) over all E experts.
  router_logits_BxE: float32, the gate logits already divided by the temperature.
  expert_indices_BxK: int32, the experts the learned gate picks, best first (K = top_k, or 1 when dense).
  """

  log_probs_BxC: jax.Array
  expert_logits_ExBxC: jax.Array
  gates_BxE: jax.Array
  router_probs_BxE: jax.Array
  router_logits_BxE: jax.Array
  expert_indices_BxK: jax.Array


def routing_aux(output: ImageMoEOutput) -> MoEAux:
  """Statistics of the learned gate (not of teacher-forced routes): Switch balancing loss and expert
  load over its K picks (its argmax when dense), z-loss of the scaled logits, mean entropy."""
  # Every expert sees every image: nothing is ever dropped.
  return undropped_routing_aux(output.router_logits_BxE, output.router_probs_BxE, output.expert_indices_BxK)


# ----------------------------------------------------------------------------- modules


class StackedDense(nnx.Module):
  """E dense layers I -> O: w_ExIxO (fan-in init per expert), b_ExO."""

  def __init__(self, num_experts: int, in_dim: int, out_dim: int, *, rngs: nnx.Rngs):
    self.w_ExIxO = nnx.Param(expert_kernel_init()(rngs.params(), (num_experts, in_dim, out_dim)))
    self.b_ExO = nnx.Param(jnp.zeros((num_experts, out_dim)))

  @property
  def weights(self) -> tuple[jax.Array, jax.Array]:
    return self.w_ExIxO[...], self.b_ExO[...]


class StackedConv(nnx.Module):
  """E S x S convolutions Ci -> Co: kernel_ExSxSxCixCo (fan-in = S * S * Ci per expert), bias_ExCo."""

  def __init__(self, num_experts: int, size: int, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
    shape = (num_experts, size, size, in_channels, out_channels)
    self.kernel_ExSxSxCixCo = nnx.Param(expert_kernel_init()(rngs.params(), shape))
    self.bias_ExCo = nnx.Param(jnp.zeros((num_experts, out_channels)))

  @property
  def weights(self) -> tuple[jax.Array, jax.Array]:
    return self.kernel_ExSxSxCixCo[...], self.bias_ExCo[...]


class MlpImageExperts(nnx.Module):
  """E MLP classifiers P -> hidden_dims... -> C: images [B, H, W] -> logits [E, B, C]."""

  def __init__(self, config: ImageMoEConfig, *, rngs: nnx.Rngs):
    widths = (config.num_pixels, *config.hidden_dims, config.num_classes)
    self.dropout_rate = config.dropout_rate
    self.layers = nnx.List(
      [StackedDense(config.num_experts, i, o, rngs=rngs) for i, o in itertools.pairwise(widths)]
    )

  def __call__(self, images_BxHxW: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    x_BxP = images_BxHxW.reshape(images_BxHxW.shape[0], -1)
    return mlp_expert_logits(
      [layer.weights for layer in self.layers], x_BxP, dropout_rate=self.dropout_rate, dropout_key=dropout_key
    )


class CnnImageExperts(nnx.Module):
  """E small CNN classifiers (conv-ReLU-pool per `cnn_channels`, dense, output): [B, H, W] -> [E, B, C]."""

  def __init__(self, config: ImageMoEConfig, *, rngs: nnx.Rngs):
    channels = (1, *config.cnn_channels)
    num_experts = config.num_experts
    self.dropout_rate = config.dropout_rate
    self.downsample = config.cnn_downsample
    self.convs = nnx.List(
      [
        StackedConv(num_experts, config.cnn_kernel_size, ci, co, rngs=rngs)
        for ci, co in itertools.pairwise(channels)
      ]
    )
    self.dense = StackedDense(num_experts, config.cnn_flat_dim, config.cnn_dense_dim, rngs=rngs)
    self.output = StackedDense(num_experts, config.cnn_dense_dim, config.num_classes, rngs=rngs)

  def __call__(self, images_BxHxW: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    return cnn_expert_logits(
      [conv.weights for conv in self.convs],
      self.dense.weights,
      self.output.weights,
      images_BxHxW,
      downsample=self.downsample,
      dropout_rate=self.dropout_rate,
      dropout_key=dropout_key,
    )


class ImageGate(nnx.Module):
  """The gating network: flattened image -> (linear, or ReLU hidden layer then linear) -> logits / T.

  T = exp(log_temperature) stays positive; a trainable Param when
  `learn_temperature`, else a fixed constant.
  """

  def __init__(self, config: ImageMoEConfig, *, rngs: nnx.Rngs):
    hidden = config.gate_hidden_dim
    # Assigned once, Linear or None, so nnx sees one kind of attribute.
    self.hidden = nnx.Linear(config.num_pixels, hidden, rngs=rngs) if hidden else None
    self.logits = nnx.Linear(hidden or config.num_pixels, config.num_experts, rngs=rngs)
    log_temperature = jnp.asarray(math.log(config.gate_temperature), jnp.float32)
    self.log_temperature = (
      nnx.Param(log_temperature) if config.learn_temperature else nnx.Variable(log_temperature)
    )

  @property
  def temperature(self) -> jax.Array:
    return jnp.exp(self.log_temperature[...])

  def __call__(self, images_BxHxW: jax.Array) -> jax.Array:
    """float32 [B, E]: the gate logits divided by the temperature."""
    x_BxP = images_BxHxW.reshape(images_BxHxW.shape[0], -1).astype(jnp.float32)
    if self.hidden is not None:
      x_BxP = jax.nn.relu(self.hidden(x_BxP))
    return self.logits(x_BxP) / self.temperature


# config.expert_type -> the module holding the stacked experts.
EXPERT_MODULES = {"mlp": MlpImageExperts, "cnn": CnnImageExperts}


class ImageMoE(nnx.Module):
  """Gate + E expert classifiers: images [B, H, W] (normalised floats) -> `ImageMoEOutput`."""

  def __init__(self, config: ImageMoEConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.gate = ImageGate(config, rngs=rngs)
    self.experts = EXPERT_MODULES[config.expert_type](config, rngs=rngs)

  def __call__(
    self,
    images_BxHxW: jax.Array,
    *,
    owner_expert_B: jax.Array | None = None,
    dropout_key: jax.Array | None = None,
  ) -> ImageMoEOutput:
    """Args:
    images_BxHxW: float images.
    owner_expert_B: int [B], guided training only: route each image to its label's owner
      (`moe.guided.guided_route`); None: the learned gate decides.
    dropout_key: PRNG key for dropout (training); None turns dropout off.
    """
    config = self.config
    router_logits_BxE = self.gate(images_BxHxW)
    # K = 1 for dense gating: its statistics count each image's argmax expert.
    route = top_k_route(router_logits_BxE, max(config.top_k, 1))
    if owner_expert_B is not None:
      forced = guided_route(
        owner_expert_B, route.router_probs_TxE, max(config.top_k, 1), router_logits_TxE=router_logits_BxE
      )
      selected_BxE = selection_mask(forced.expert_indices_TxK, config.num_experts)
    elif config.top_k:
      selected_BxE = selection_mask(route.expert_indices_TxK, config.num_experts)
    else:
      selected_BxE = None
    log_gates_BxE = gate_log_weights(router_logits_BxE, selected_BxE)
    expert_logits_ExBxC = self.experts(images_BxHxW, dropout_key=dropout_key)
    return ImageMoEOutput(
      log_probs_BxC=combine_experts(expert_logits_ExBxC, log_gates_BxE, config.combine),
      expert_logits_ExBxC=expert_logits_ExBxC,
      gates_BxE=jnp.exp(log_gates_BxE),
      router_probs_BxE=route.router_probs_TxE,
      router_logits_BxE=route.router_logits_TxE,
      expert_indices_BxK=route.expert_indices_TxK,
    )
