"""Config checks at the boundary: each raises `ConfigError` naming the offending field."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from tmoe_jax.errors import ConfigError

# model.dtype names -> compute dtypes.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# (field, type, condition on the value, what the condition says)
FieldRule = tuple[str, Any, Any, str]


def require(condition: bool, field: str, message: str) -> None:
  """Raises ConfigError('<field>: <message>') unless `condition` holds."""
  if not condition:
    raise ConfigError(f"{field}: {message}")


def require_type(value: Any, types: type | tuple[type, ...], field: str) -> None:
  # bool is an int subclass; a flag written `=True` where a count is expected is a typo.
  ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in _as_tuple(types))
  if not ok:
    names = " or ".join(t.__name__ for t in _as_tuple(types))
    raise ConfigError(f"{field}: expected {names}, got {value!r} ({type(value).__name__})")


def _as_tuple(types):
  return types if isinstance(types, tuple) else (types,)


def _lookup(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if part not in node:
      raise ConfigError(f"{dotted}: missing from the config")
    node = node[part]
  return node


def validate_fields(config, rules: tuple[FieldRule, ...], *, section: str = "") -> None:
  """Checks each (field, type, condition, description) rule; ConfigError names the first bad field.

  `section`: the name of `config` inside the run config (e.g. "data"), prefixed to field names in errors.
  """
  for field, types, condition, description in rules:
    name = f"{section}.{field}" if section else field
    try:
      value = _lookup(config, field)
    except ConfigError:
      raise ConfigError(f"{name}: missing from the config") from None
    require_type(value, types, name)
    require(condition(value), name, f"must be {description}, got {value!r}")


def settings_from_section(cls, section, *, prefix: str = "model", key_prefix: str = "", **given):
  """The frozen settings dataclass `cls`, each field not `given` read from `section` by its own name.

  `key_prefix` is put before each field name to make its key (`smoe_` + `keep_rate`), for
  settings whose flat keys share a prefix.

  The one typed builder every model config uses. A field's type is its default's:
  ints are accepted where a float is expected, lists where a tuple is, and a
  `dtype` field takes a name from `DTYPES`. A missing key or a wrong type raises
  ConfigError naming `<prefix>.<field>`; range checks are the dataclass's own.
  """
  values = dict(given)
  for field in dataclasses.fields(cls):
    if field.name in given:
      continue
    key = key_prefix + field.name
    name = f"{prefix}.{key}"
    require(key in section, name, "missing from the config")
    value = section[key]
    if field.name == "dtype":
      require(value in DTYPES, name, f"must be one of {tuple(DTYPES)}, got {value!r}")
      value = DTYPES[value]
    elif isinstance(field.default, float):
      require_type(value, (int, float), name)
      value = float(value)
    elif isinstance(field.default, tuple):
      require_type(value, (tuple, list), name)
      value = tuple(value)
    else:
      require_type(value, type(field.default), name)
    values[field.name] = value
  return cls(**values)
