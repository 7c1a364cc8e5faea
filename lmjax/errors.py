"""The base of lmjax's own errors: bad input, reported to the user as one line.

Every error class lmjax raises for input it cannot use (ConfigError, DataError, HFError,
CheckpointError, LoraError, ShardingError, TokenizerError, TrainingError, NotFoundError,
ExistsError) subclasses `UserError` and keeps its builtin base (ValueError, RuntimeError,
FileNotFoundError, FileExistsError): `except ValueError` still catches a ConfigError. Each
message names the field, file or setting at fault and says what to do. The command-line
programs (`python -m lmjax.train`, tools/*.py) print these as `error: <message>` and exit
with code 2 (lmjax.cli); any other exception is a bug and keeps its traceback.

No imports beyond the standard library: a tool can catch these before jax starts.
"""


class UserError(Exception):
  """Input lmjax cannot use (a config field, a file, an argument); the message names it."""


class NotFoundError(UserError, FileNotFoundError):
  """A file or directory that the config or a command names does not exist; the message
  names the path and the setting it came from."""


class ExistsError(UserError, FileExistsError):
  """An output that would overwrite files already there; the message names the path and
  the option that allows it."""
