"""`--config.a.b=value` overrides, parsed by ml_collections' config flag for every command.

`python -m train` defines its config flag on absl's global flags (`train/__main__.py`);
`python -m train.evaluate` and `python -m train.translate` parse their overrides against
the run's saved config (`typed_overrides`). Both go through `parse_flags`, so a value
means the same everywhere (`--config.eval.beam_size 4`, `--config.x=true`, `--noconfig.x`,
tuples as `'(1, 2)'`) and a bad one gives the same message.
"""

from __future__ import annotations

import ast
import copy
import re
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags
from ml_collections import config_flags

USAGE_ERROR = 2
CONFIG_FLAG = "config"
# What ml_collections raises for an unknown key or a value of the wrong type.
OVERRIDE_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError)
# An override argument, as ml_collections recognises one: -config.a.b, --config.a.b=v, --noconfig.a.b.
_OVERRIDE = re.compile(rf"^--?(no)?{CONFIG_FLAG}\.")


def fail(message) -> None:
  """Prints `error: message` to stderr and exits with the usage-error code 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(USAGE_ERROR)


def override_error_message(error: Exception) -> str:
  detail = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
  if detail[:1] in "'\"":  # ConfigDict wraps a KeyError's repr inside its AttributeError
    try:
      detail = ast.literal_eval(detail)
    except (ValueError, SyntaxError):
      pass
  return f"bad --config override or config file: {detail}"


def parse_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> list[str]:
  """flag_values(argv): the arguments left over; a bad override raises ConfigError with its message."""
  from tmoe_jax.errors import ConfigError

  try:
    return flag_values(list(argv))
  except OVERRIDE_ERRORS as error:
    raise ConfigError(override_error_message(error)) from None


def split_config_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(the `--config.*` arguments of argv, the others), the value of `--config.a.b v` kept with it.

  Done before argparse so that an override's value is never mistaken for a positional
  argument; everything after `--` is left alone.
  """
  overrides, rest = [], []
  argv = list(argv)
  index = 0
  while index < len(argv):
    arg = argv[index]
    if arg == "--":
      rest.extend(argv[index:])
      break
    match = _OVERRIDE.match(arg)
    if not match:
      rest.append(arg)
    else:
      overrides.append(arg)
      # `--config.a.b v`: v is the value (as absl reads a non-boolean flag), unless it is an option.
      next_is_value = index + 1 < len(argv) and not argv[index + 1].startswith("--")
      if "=" not in arg and not match.group(1) and next_is_value:
        index += 1
        overrides.append(argv[index])
    index += 1
  return overrides, rest


def typed_overrides(config, overrides: Sequence[str]) -> dict[str, Any]:
  """{"a.b": value} of the `--config.a.b=v` arguments, each value parsed to its field's type as
  `python -m train` parses it. `config` (e.g. a run's saved config) is not changed.

  Raises ConfigError naming a field `config` does not have, a value of the wrong type, or
  an argument that belongs to no override.
  """
  from tmoe_jax.errors import ConfigError

  for arg in overrides:
    if not _OVERRIDE.match(arg):
      continue
    path = _OVERRIDE.sub("", arg).partition("=")[0]
    section, _, name = path.partition(".")
    node = config.get(section)
    if not hasattr(node, "keys") or name.partition(".")[0] not in node:
      fields = sorted(node.keys()) if hasattr(node, "keys") else sorted(config.keys())
      where = section if hasattr(node, "keys") else "the config"
      raise ConfigError(f"{path}: no such field; {where} has {fields}")
  flag_values = flags.FlagValues()
  argv = ["", *overrides]
  try:
    config_flags.DEFINE_config_dict(
      CONFIG_FLAG, copy.deepcopy(config), flag_values=flag_values, sys_argv=argv
    )
  except OVERRIDE_ERRORS as error:
    raise ConfigError(override_error_message(error)) from None
  left_over = parse_flags(flag_values, argv)[1:]
  if left_over:
    raise ConfigError(f"unexpected arguments after the --config overrides: {left_over}")
  return dict(flag_values[CONFIG_FLAG].override_values)
