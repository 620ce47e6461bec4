"""Writing files so that a crash never leaves one that reads as valid but is not, and fingerprints of files.

Every file a run writes goes through ``write_atomic``: the bytes go to a temporary file in the same
directory, are flushed and fsynced, and the temporary file is renamed over the destination (atomic on
POSIX); then the directory is fsynced so the rename itself survives a power cut. A reader therefore
sees the old file or the new one, never a part of either. The temporary name carries the process id,
so two processes writing the same path never share a temporary file; leftovers of a killed writer
(``*.tmp<pid>``) are ignored by readers and removed by ``remove_temporaries``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any, Callable, IO

import numpy as np

TMP_MARK = ".tmp"


def fsync_dir(directory: str) -> None:
  """Makes a rename or a new file in ``directory`` durable (POSIX; skipped where not possible)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], Any] | bytes) -> None:
  """Writes ``path`` atomically: ``write(f)`` (or the given bytes) into a temporary file, then rename."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f"{path}{TMP_MARK}{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      if isinstance(write, (bytes, bytearray, memoryview)):
        f.write(write)
      else:
        write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  fsync_dir(directory)


def write_text(path: str | os.PathLike, text: str) -> None:
  write_atomic(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, **kw: Any) -> None:
  write_text(path, json.dumps(obj, indent=1, **kw))


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
  write_atomic(path, lambda f: np.save(f, array))


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
  write_atomic(path, lambda f: np.savez(f, **arrays))


def read_json(path: str | os.PathLike) -> Any:
  with open(path) as f:
    return json.load(f)


def read_jsonl(path: str | os.PathLike) -> list[Any]:
  """The records of a JSON-lines file (a training log), blank lines skipped."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def remove_temporaries(directory: str) -> None:
  """Removes what killed writers left in ``directory`` (files with ``.tmp<pid>`` in their name)."""
  if not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if TMP_MARK in name and os.path.isfile(os.path.join(directory, name)):
      with contextlib.suppress(OSError):
        os.unlink(os.path.join(directory, name))


def stat_key(path: str | os.PathLike) -> tuple:
  """What identifies a version of a file: every write here replaces the file (a new inode), so a file
  with the same key has the same content (used to check each file once per process)."""
  st = os.stat(path)
  return (os.path.abspath(path), st.st_ino, st.st_mtime_ns, st.st_size)


_DIGESTS: dict[tuple, str] = {}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
  key = stat_key(path)
  if key not in _DIGESTS:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(chunk), b""):
        digest.update(block)
    _DIGESTS[key] = digest.hexdigest()
  return _DIGESTS[key]


# Files larger than this are fingerprinted by name and size only: hashing a multi-gigabyte feature
# array on every command start would cost seconds; a kill cannot change a file's content without
# changing its size (every write is atomic), so the size catches a truncated or replaced one.
HASH_MAX_BYTES = 256 << 20


def fingerprint(path: str | os.PathLike) -> dict[str, Any] | None:
  """What a file or directory holds, to check later that it is still what was written (None: absent).

  A file: its size and (up to ``HASH_MAX_BYTES``) SHA-256. A directory: the same for every file under
  it, by relative path (an orbax checkpoint, a TensorBoard directory).
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    size = os.path.getsize(path)
    out: dict[str, Any] = {"bytes": size}
    if size <= HASH_MAX_BYTES:
      out["sha256"] = sha256_file(path)
    return out
  if os.path.isdir(path):
    files = {}
    for dirpath, dirnames, filenames in os.walk(path):
      dirnames.sort()
      for name in sorted(filenames):
        full = os.path.join(dirpath, name)
        files[os.path.relpath(full, path)] = fingerprint(full)
    return {"files": files}
  return None
