"""Counter-based randomness: random numbers as a pure hash of (seed, stream, position).

The input pipeline draws its augmentation parameters and the pair sampler its targets from a hash of
where a record is in the global stream (and which epoch), never from an RNG object's state. So a
restored iterator, another process count or another thread schedule sees exactly the same numbers,
and a whole batch's draws are one vectorized numpy expression.

The mixer is SplitMix64's finalizer (a bijection of 64-bit words with good avalanche); chaining it over
the words of the key gives independent-looking streams for distinct keys.
"""

from __future__ import annotations

import numpy as np

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix(z: int) -> int:
  z = (z + _GOLDEN) & _M64
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
  return z ^ (z >> 31)


def _mix_np(z: np.ndarray) -> np.ndarray:
  with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the point
    z = z + np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash64(*words: int) -> int:
  """A 64-bit hash of a sequence of integers (each taken modulo 2**64)."""
  h = 0
  for w in words:
    h = _mix(h ^ (int(w) & _M64))
  return h


def hash64_np(prefix: tuple[int, ...], last: np.ndarray) -> np.ndarray:
  """``hash64(*prefix, x)`` for every ``x`` of the integer array ``last`` → uint64, same shape."""
  head = np.uint64(hash64(*prefix))
  return _mix_np(head ^ np.asarray(last).astype(np.int64).astype(np.uint64))


def uniforms(prefix: tuple[int, ...], positions: np.ndarray, num: int) -> np.ndarray:
  """``float64 [len(positions), num]`` in [0, 1): ``num`` independent draws per position."""
  base = hash64_np(prefix, positions)[:, None]
  with np.errstate(over="ignore"):
    words = _mix_np(base + np.arange(1, num + 1, dtype=np.uint64)[None, :] * np.uint64(_GOLDEN))
  return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
