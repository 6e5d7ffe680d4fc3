"""Settings of the MoE layers, declared once: `MoEConfig` (top-k and expert-choice layers),
`SMoEConfig` (the single mixture of experts), and the names each setting accepts.

Every model config that has MoE layers holds one of each, built from the flat `model.*`
config keys by `MoEConfig.from_section`; every check raises `ConfigError`
naming the `model.*` field. The device mesh is not a setting: modules receive
it (`check_mesh` says whether a config can run on it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp

from tmoe_jax.moe.dispatch import expert_capacity
from tmoe_jax.moe.experts import EXPERT_REGISTRY
from tmoe_jax.moe.routers import ROUTER_REGISTRY, ROUTERS
from tmoe_jax.moe.smoe import MASK_SCALINGS, SELECTIONS
from tmoe_jax.parallel.mesh import EXPERT_AXIS, check_experts_divisible
from tmoe_jax.validation import require, settings_from_section

ACTIVATIONS = ("relu", "gelu", "silu")
# capacity: fixed-size expert buffers, overflow dropped; dropless: every assignment computed
# (`moe.dropless`: ragged_dot on GPU/TPU, a block loop on CPU), for router top_k and either
# expert type.
DISPATCHES = ("capacity", "dropless")
# mlp, or gated: SwiGLU with activation "silu", GeGLU with "gelu" (`experts.EXPERT_REGISTRY`).
EXPERT_TYPES = tuple(EXPERT_REGISTRY)
SOFTMAX_ORDERS = ("before", "after")
# The router matmul's dtype: always float32, or the model's compute dtype (Hugging Face checkpoints).
ROUTER_DTYPES = ("float32", "model")
# The shared experts' FFN: "mlp" (with biases, `feedforward.FeedForward`) or "gated" (SwiGLU/GeGLU
# without biases, `feedforward.GatedFeedForward`, as Qwen2-MoE's shared expert).
SHARED_EXPERT_TYPES = ("mlp", "gated")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Settings of one sparse MoE feed-forward layer.

  Expert capacity counts all k assignments (GShard/MaxText convention):
  `capacity = ceil(capacity_factor * tokens * top_k / num_experts)`, clipped to
  `tokens` because an expert never receives the same token twice, where
  `tokens` is one routing group's: `sequences_per_group` whole sequences
  (0 = the whole batch is one group), so capacity never depends on the mesh.
  """

  num_experts: int = 4
  top_k: int = 2
  d_model: int = 128  # the layer's shape: given by the model that holds it
  d_ff: int = 256
  capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  normalize_gates: bool = True
  activation: str = "relu"
  router: str = "top_k"
  softmax_order: str = "before"
  router_dtype: str = "float32"
  router_jitter: float = 0.0
  batch_prioritized: bool = False
  expert_bias_rate: float = 0.0
  num_shared_experts: int = 0
  shared_expert_type: str = "mlp"
  shared_expert_d_ff: int = 0
  shared_expert_gate: bool = False
  expert_type: str = "mlp"
  dispatch: str = "capacity"
  sequences_per_group: int = 0
  dtype: Any = jnp.float32

  def __post_init__(self):
    require(
      self.dispatch in DISPATCHES, "model.dispatch", f"must be one of {DISPATCHES}, got {self.dispatch!r}"
    )
    require(self.router in ROUTERS, "model.router", f"must be one of {ROUTERS}, got {self.router!r}")
    require(
      self.dispatch == "capacity" or ROUTER_REGISTRY[self.router].dropless,
      "model.dispatch",
      f"dropless needs a router that computes every assignment, not {self.router!r} (it fixes each "
      "expert's capacity); use router top_k",
    )
    require(
      self.expert_type in EXPERT_TYPES,
      "model.expert_type",
      f"must be one of {EXPERT_TYPES}, got {self.expert_type!r}",
    )
    require(
      self.softmax_order in SOFTMAX_ORDERS,
      "model.softmax_order",
      f"must be one of {SOFTMAX_ORDERS}, got {self.softmax_order!r}",
    )
    require(
      self.router_dtype in ROUTER_DTYPES,
      "model.router_dtype",
      f"must be one of {ROUTER_DTYPES}, got {self.router_dtype!r}",
    )
    require(
      0.0 <= self.router_jitter < 1.0, "model.router_jitter", f"must be in [0, 1), got {self.router_jitter}"
    )
    require(
      self.expert_bias_rate >= 0.0, "model.expert_bias_rate", f"must be >= 0, got {self.expert_bias_rate}"
    )
    require(
      self.num_shared_experts >= 0,
      "model.num_shared_experts",
      f"must be >= 0, got {self.num_shared_experts}",
    )
    require(
      self.shared_expert_type in SHARED_EXPERT_TYPES,
      "model.shared_expert_type",
      f"must be one of {SHARED_EXPERT_TYPES}, got {self.shared_expert_type!r}",
    )
    require(
      self.shared_expert_d_ff >= 0,
      "model.shared_expert_d_ff",
      f"must be >= 0 (0 = num_shared_experts * the experts' width), got {self.shared_expert_d_ff}",
    )
    require(self.num_experts >= 1, "model.num_experts", f"must be >= 1, got {self.num_experts}")
    require(
      self.sequences_per_group >= 0,
      "model.sequences_per_group",
      f"must be >= 0 (0 = the whole batch is one routing group), got {self.sequences_per_group}",
    )
    require(
      1 <= self.top_k <= self.num_experts,
      "model.top_k",
      f"must be in [1, num_experts={self.num_experts}], got {self.top_k}",
    )
    require(self.capacity_factor > 0, "model.capacity_factor", f"must be > 0, got {self.capacity_factor}")
    require(
      self.eval_capacity_factor > 0,
      "model.eval_capacity_factor",
      f"must be > 0, got {self.eval_capacity_factor}",
    )
    require(self.activation in ACTIVATIONS, "model.activation", f"must be one of {ACTIVATIONS}")

  @property
  def shared_width(self) -> int:
    """Hidden units of the shared experts' one FFN (n shared experts of width d_ff are one of n * d_ff)."""
    return self.shared_expert_d_ff or self.d_ff * self.num_shared_experts

  def capacity(self, group_size: int, *, training: bool) -> int:
    """Slots per expert in a routing group of `group_size` tokens (`dispatch.expert_capacity`)."""
    factor = self.capacity_factor if training else self.eval_capacity_factor
    return expert_capacity(group_size, self.num_experts, self.top_k, factor)

  @classmethod
  def from_section(cls, model_section) -> MoEConfig:
    """Every MoE setting from the flat `model` section, type-checked; the model holding it resets the shape."""
    shape = settings_from_section(LayerShape, model_section)
    return settings_from_section(cls, model_section, **dataclasses.asdict(shape))

  @classmethod
  def pop_flat_fields(cls, fields: dict[str, Any], **defaults) -> MoEConfig:
    """Takes the MoE settings out of flat keyword `fields` (as the `model.*` keys are), over `defaults`.

    The shape fields stay in `fields`: they are the model's.
    """
    names = {field.name for field in dataclasses.fields(cls)} - set(MOE_SHAPE_FIELDS)
    return cls(**{**defaults, **{name: fields.pop(name) for name in list(fields) if name in names}})


@dataclasses.dataclass(frozen=True)
class LayerShape:
  """The fields an MoE layer takes from the model that holds it (read first, to build its `MoEConfig`)."""

  d_model: int = 128
  d_ff: int = 256
  activation: str = "relu"
  dtype: Any = jnp.float32


MOE_SHAPE_FIELDS = tuple(field.name for field in dataclasses.fields(LayerShape))


@dataclasses.dataclass(frozen=True)
class SMoEConfig:
  """Settings of the single mixture of experts (`moe.smoe.SingleMixtureOfExperts`).

  Flat keys are `model.smoe_<field>`. Its number of masks is the `MoEConfig`'s
  `num_experts`; its width is the model's to choose. Defaults differ per model
  (each model's `from_flat` says which), so that runs saved before this class
  keep their settings.
  """

  keep_rate: float = 0.5
  selection: str = "gated_top1"
  sample_steps: int = 1000
  mask_scaling: str = "keep_rate"

  KEY_PREFIX = "smoe_"

  def __post_init__(self):
    require(0.0 < self.keep_rate <= 1.0, "model.smoe_keep_rate", f"must be in (0, 1], got {self.keep_rate}")
    require(
      self.selection in SELECTIONS,
      "model.smoe_selection",
      f"must be one of {SELECTIONS}, got {self.selection!r}",
    )
    require(self.sample_steps >= 0, "model.smoe_sample_steps", f"must be >= 0, got {self.sample_steps}")
    require(
      self.mask_scaling in MASK_SCALINGS,
      "model.smoe_mask_scaling",
      f"must be one of {MASK_SCALINGS}, got {self.mask_scaling!r}",
    )

  @classmethod
  def from_section(cls, model_section) -> SMoEConfig:
    return settings_from_section(cls, model_section, key_prefix=cls.KEY_PREFIX)

  @classmethod
  def pop_flat_fields(cls, fields: dict[str, Any], **defaults) -> SMoEConfig:
    """Takes the `smoe_*` settings out of flat keyword `fields`, over `defaults` (by field name)."""
    keys = {cls.KEY_PREFIX + field.name for field in dataclasses.fields(cls)}
    given = {key[len(cls.KEY_PREFIX) :]: fields.pop(key) for key in list(fields) if key in keys}
    return cls(**{**defaults, **given})


class HoldsMoESettings:
  """Builders for a frozen model-settings dataclass that holds `moe: MoEConfig` and `smoe: SMoEConfig`.

  The model's defaults for them (`MOE_DEFAULTS`, `SMOE_DEFAULTS`, by field name)
  apply where flat fields do not say otherwise.
  """

  MOE_DEFAULTS: ClassVar[dict[str, Any]] = {}
  SMOE_DEFAULTS: ClassVar[dict[str, Any]] = {}

  @classmethod
  def from_flat(cls, **fields):
    """Built from flat keyword fields, as the `model.*` config keys are: `num_experts=8, top_k=1, ...`

    Fields of `MoEConfig` (other than its shape) go into `moe`, `smoe_*` into `smoe`; the
    rest are the model's.
    """
    moe = MoEConfig.pop_flat_fields(fields, **cls.MOE_DEFAULTS)
    smoe = SMoEConfig.pop_flat_fields(fields, **cls.SMOE_DEFAULTS)
    return cls(**fields, moe=moe, smoe=smoe)

  @classmethod
  def from_config(cls, model_config, **given):
    """Builds from the `model` section of a ConfigDict, type-checking each field (ConfigError names it).

    `given`: fields the data decides (e.g. `vocab_size`), not read from the section.
    """
    return settings_from_section(
      cls,
      model_config,
      moe=MoEConfig.from_section(model_config),
      smoe=SMoEConfig.from_section(model_config),
      **given,
    )


def check_mesh(config: MoEConfig, mesh) -> None:
  """ConfigError naming the field unless layers of `config` can run on `mesh` (None: one device)."""
  if mesh is None or mesh.shape[EXPERT_AXIS] == 1:
    return
  check_experts_divisible(config.num_experts, mesh)
  require(
    EXPERT_REGISTRY[config.expert_type].expert_parallel,
    "model.expert_type",
    f"{config.expert_type} experts have no expert-parallel path; use mesh.expert=1",
  )
  require(
    ROUTER_REGISTRY[config.router].expert_parallel,
    "model.router",
    f"{config.router} has no expert-parallel path; use top_k, or mesh.expert=1",
  )
  require(
    config.sequences_per_group > 0,
    "model.sequences_per_group",
    "0 makes each batch one routing group, which cannot be split over the expert axis; set it so "
    "that it divides train.batch_size / (mesh.data * mesh.expert)",
  )
