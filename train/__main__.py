"""Train an experiment: python -m train [--config configs/NAME.py] [--workdir DIR] [--config.a.b=value].

Without --config the default experiment (configs/tmoe.py) runs; without
--workdir the run goes to runs/<config name>. Bad input (an unknown or
ill-typed config field, a workdir that is a file or was written by another
config) stops with one message and exit code 2.
"""

import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from train.overrides import OVERRIDE_ERRORS, fail, override_error_message, parse_flags

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "tmoe.py"


def _parse_flags(argv):
  from tmoe_jax.errors import ConfigError

  try:
    return parse_flags(flags.FLAGS, argv)
  except ConfigError as error:
    fail(error)


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {argv[1:]}")
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
  except OVERRIDE_ERRORS as error:
    fail(override_error_message(error))
  try:
    # Joins the other processes of a multi-host run (config `distributed` section or the
    # cluster's environment) before anything touches a device; a no-op on one machine.
    distributed.initialize(config.get("distributed"))
    run(config, workdir)
  except TmoeError as error:
    fail(error)


def define_flags() -> None:
  # config_flags applies --config.* overrides while defining the flag, so a typo
  # in a key surfaces here, before app.run parses anything.
  try:
    config_flags.DEFINE_config_file(
      "config", str(DEFAULT_CONFIG), "Experiment config file.", lock_config=True
    )
  except OVERRIDE_ERRORS as error:
    fail(override_error_message(error))
  flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=_parse_flags)
