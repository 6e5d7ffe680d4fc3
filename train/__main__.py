"""Train an experiment: python -m train [--config configs/NAME.py] [--workdir DIR] [--config.a.b=value].

Without --config the default experiment (configs/tmoe.py) runs; without
--workdir the run goes to runs/<config name>. Bad input (an unknown or
ill-typed config field, a workdir that is a file or was written by another
config) stops with one message and exit code 2.
"""

import ast
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "tmoe.py"
USAGE_ERROR = 2
# What ml_collections raises for an unknown key or a value of the wrong type.
_CONFIG_OVERRIDE_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError)


def _fail(message) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(USAGE_ERROR)


def _override_error_message(error: Exception) -> str:
  detail = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
  if detail[:1] in "'\"":  # ConfigDict wraps a KeyError's repr inside its AttributeError
    try:
      detail = ast.literal_eval(detail)
    except (ValueError, SyntaxError):
      pass
  return f"bad --config override or config file: {detail}"


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except _CONFIG_OVERRIDE_ERRORS as error:
    _fail(_override_error_message(error))


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {argv[1:]}")
  from tmoe_jax.errors import TmoeError  # imported late so flag errors come fast
  from tmoe_jax.parallel import distributed
  from tmoe_jax.tasks.runner import run

  # Orbax logs every save step at INFO; keep the terminal for the progress bar.
  logging.set_verbosity(logging.WARNING)
  config_path = pathlib.Path(flags.FLAGS["config"].config_filename)
  workdir = flags.FLAGS.workdir or str(pathlib.Path("runs") / config_path.stem)
  try:
    config = flags.FLAGS.config
    config.keys()  # a config file that failed to load raises only when first used
  except _CONFIG_OVERRIDE_ERRORS as error:
    _fail(_override_error_message(error))
  try:
    # Joins the other processes of a multi-host run (config `distributed` section or the
    # cluster's environment) before anything touches a device; a no-op on one machine.
    distributed.initialize(config.get("distributed"))
    run(config, workdir)
  except TmoeError as error:
    _fail(error)


def define_flags() -> None:
  # config_flags applies --config.* overrides while defining the flag, so a typo
  # in a key surfaces here, before app.run parses anything.
  try:
    config_flags.DEFINE_config_file(
      "config", str(DEFAULT_CONFIG), "Experiment config file.", lock_config=True
    )
  except _CONFIG_OVERRIDE_ERRORS as error:
    _fail(_override_error_message(error))
  flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=_parse_flags)
