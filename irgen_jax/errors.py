"""The one kind of error a command reports without a traceback: a mistake in what the user gave.

``UserError`` (a ``ValueError``) covers a bad config value or flag, an unreadable image, a corrupted or
foreign index file, a workdir that lacks a stage's outputs: the entry points print its message as one
line, ``error: <message>``, and exit with status 2, before compute starts where that is possible. The
message names the value and what was expected, and when it gives advice, the advice works when followed.
Every other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
  """A mistake in the user's input; printed as one line, exit status 2."""


class ConfigError(UserError):
  """A config field with a value that cannot work (``config_lib.validate``)."""


class MissingFileError(UserError, FileNotFoundError):
  """A file a command needs is missing: a stage's output in the workdir (or one no longer valid), a
  dataset that is not prepared, a download that is not where the config says."""
