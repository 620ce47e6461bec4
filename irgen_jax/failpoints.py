"""Named points where a test (or a user checking crash safety) can kill the process, deterministically.

  IRGEN_FAILPOINT=retriever.loop_started python -m irgen_jax.main ...
  IRGEN_FAILPOINT=tokenizer.step@3 ...                 # the third time the point is reached

``hit(name)`` is placed at the moments a kill must be survivable (inside a refit, between the files of
a stage, after a checkpoint commit, ...). When ``IRGEN_FAILPOINT`` names the point (``name`` or
``name@n`` for its n-th hit in this process, counted from 1), the process sends itself SIGKILL there:
nothing is flushed, no handler runs, exactly as when the machine dies. Unset, a hit is one dict
lookup. The environment is read once, here; nothing else in the project reads it.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "IRGEN_FAILPOINT"


def _parse(spec: str) -> tuple[str, int] | None:
  spec = spec.strip()
  if not spec:
    return None
  name, _, count = spec.partition("@")
  if count and not count.isdigit():
    raise ValueError(f"{ENV}={spec!r}: expected NAME or NAME@N with N a positive count.")
  return name, int(count or 1)


_ARMED = _parse(os.environ.get(ENV, ""))
_hits: dict[str, int] = {}


def armed(name: str) -> bool:
  """Whether ``IRGEN_FAILPOINT`` names this point (callers may then finish pending writes first)."""
  return _ARMED is not None and _ARMED[0] == name


def hit(name: str) -> None:
  """Kills the process with SIGKILL if ``IRGEN_FAILPOINT`` names this point and hit count."""
  if _ARMED is None or _ARMED[0] != name:
    return
  _hits[name] = _hits.get(name, 0) + 1
  if _hits[name] == _ARMED[1]:
    print(f"failpoint {name}@{_hits[name]}: SIGKILL", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
