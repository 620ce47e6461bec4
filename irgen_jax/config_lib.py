"""Helpers shared by the files in configs/: argument parsing in the big_vision style.

A config file is ``get_config(arg=None)``; ``arg`` is what follows the colon on the command line,
``--config=configs/fashion_mnist.py:runlocal,seed=3``: comma-separated flags (``runlocal``) and
``key=value`` pairs whose types follow the defaults.
"""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"a,b=2,c=x"`` into a ConfigDict over ``defaults``; a bare name sets a bool to True.

  Unknown names are an error naming the name and the known ones, so typos never pass silently.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; known: {sorted(defaults)}.")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"Config argument {key!r} needs a value ({key}=...).")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"Config argument {key}={value!r}: expected true or false.")
      out[key] = value.lower() in ("true", "1")
    elif isinstance(default, int):
      out[key] = int(value)
    elif isinstance(default, float):
      out[key] = float(value)
    else:
      out[key] = value
  return out
