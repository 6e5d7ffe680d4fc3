"""Errors that the command line turns into one message and exit code 2."""


class TmoeError(Exception):
  """Base class of the user-facing errors: bad config, bad data, bad workdir."""


class ConfigError(TmoeError, ValueError):
  """A config field is missing, of the wrong type or out of range."""


class DataError(TmoeError, ValueError):
  """Input data is missing, truncated or in the wrong format."""


class WorkdirError(TmoeError):
  """The workdir cannot be used: it is a file, or was written by an incompatible config."""


class CheckpointFormatError(TmoeError, ValueError):
  """A Hugging Face checkpoint directory cannot be used: an unknown architecture, a setting this
  library does not implement, or a tensor that is missing, unexpected or mis-shaped."""
