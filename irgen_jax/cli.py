"""How every command treats its flags and its errors: absl's ``app.run`` with the project's contract.

- ``--config=FILE[:ARG]`` with ``--config.FIELD=VALUE`` overrides (ml_collections' config flags): a
  missing config file, an argument the file rejects, a field the config does not have or a value of the
  wrong type is one line naming it, exit status 2, before the command starts.
- Any other flag error (a missing required flag, a value out of bounds): one line, exit 2.
- A ``UserError`` raised by the command (``irgen_jax.errors``): one line, exit 2.
Everything else is a bug and keeps its traceback. The libraries' INFO chatter stays out of the log.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, NoReturn, Sequence

from absl import app, flags
from absl import logging as absl_logging

from irgen_jax import config_lib
from irgen_jax.errors import UserError


def fail(message: str) -> NoReturn:
  """Prints ``error: <message>`` as one line to stderr and exits with status 2."""
  print("error: " + " ".join(str(message).split("\n")), file=sys.stderr, flush=True)
  sys.exit(2)


def _config_argument(argv: Sequence[str], name: str) -> str | None:
  """The value of ``--NAME=V`` or ``--NAME V`` in argv (the last one wins, as absl's)."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _value_problem(config, field: str, text: str) -> str | None:
  """Why the flag text ``text`` is no value for ``field`` of a number or bool type (None when it is,
  or when the field has another type: ml_collections parses those)."""
  node = config
  for part in field.split("."):
    node = node[part]
  kind = type(node)
  if kind is bool:
    ok = text.lower() in ("true", "false", "1", "0")
  elif kind in (int, float):
    try:
      kind(text)
      ok = True
    except ValueError:
      ok = False
  else:
    return None
  name = {bool: "a bool (true or false)", int: "an int", float: "a float"}[kind]
  return None if ok else f"expected {name}, the field's type (its default: {node!r})"


def check_config_flags(argv: Sequence[str], name: str = "config") -> None:
  """Loads the ``--config`` file and checks every ``--config.FIELD`` override names a field."""
  value = _config_argument(argv, name)
  overrides = [arg for arg in argv if arg.startswith(f"--{name}.")]
  if value is None:
    if overrides:
      fail(f"{overrides[0]}: an override needs the config it overrides (--{name}=FILE).")
    return  # absl reports a missing required flag itself
  try:
    config = config_lib.load(value)
  except UserError as e:
    fail(f"--{name}={value}: {e}")
  for arg in overrides:
    field, _, text = arg[len(name) + 3:].partition("=")
    problem = config_lib.field_problem(config, field) or (_value_problem(config, field, text)
                                                          if text else None)
    if problem:
      fail(f"{arg}: {problem}")


class _QuietLibraries(logging.Filter):
  """Keeps the libraries' INFO chatter (orbax logs every save step by step, TFDS every dataset it
  opens) out of a command's log; their warnings stay."""
  _NOISY = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/jax/_src/")

  def filter(self, record):
    return record.levelno >= logging.WARNING or not any(p in record.pathname for p in self._NOISY)


def run(main: Callable[[list[str]], None], *, config_flag: str | None = None) -> None:
  """``app.run(main)`` with one-line user errors (module docstring); ``config_flag`` names a config flag."""

  def parse(argv):
    if config_flag:
      check_config_flags(argv, config_flag)
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(str(e))

  def guarded(argv):
    absl_logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
      main(argv)
    except UserError as e:
      fail(str(e))

  app.run(guarded, flags_parser=parse)
