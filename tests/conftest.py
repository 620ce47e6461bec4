"""Test-wide settings: CPU only, and no network (a download would stall for minutes, then fail)."""

import contextlib
import fcntl
import os
import socket

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("NO_GCE_CHECK", "true")

import pytest  # noqa: E402

_real_connect = socket.socket.connect


def _loopback_only(self, address):
  host = address[0] if isinstance(address, tuple) else address
  if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1", "") \
      and self.family in (socket.AF_INET, socket.AF_INET6):
    raise OSError(f"Tests must not touch the network (tried to connect to {address!r}).")
  return _real_connect(self, address)


@pytest.fixture(autouse=True, scope="session")
def _no_network():
  socket.socket.connect = _loopback_only
  yield
  socket.socket.connect = _real_connect


@contextlib.contextmanager
def _locked(path):
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def shared_tmp(tmp_path_factory, name):
  """A directory every pytest-xdist worker of this session sees (the session's own without xdist)."""
  base = tmp_path_factory.getbasetemp()
  root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
  root.mkdir(parents=True, exist_ok=True)
  return root


@pytest.fixture(scope="session")
def fashion_runlocal_workdir(tmp_path_factory):
  """One finished runlocal job on the embedded Fashion-MNIST (all four stages), shared by the tests
  that need a trained workdir (main job, search, fresh-data insertion, kills). Runs once per test
  session (once for all xdist workers: the first builds it, the others wait) in a subprocess, as a
  user would run it; returns (workdir, data_dir). Tests copy it before changing anything."""
  import subprocess
  import sys
  root = shared_tmp(tmp_path_factory, "fashion_runlocal")
  workdir, data_dir = root / "workdir", root / "tfds"
  with _locked(root / ".lock"):
    if not (workdir / "evaluate" / "done.json").exists():
      cmd = [sys.executable, "-m", "irgen_jax.main", "--config=configs/fashion_mnist.py:runlocal",
             f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"]
      proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            capture_output=True, text=True, timeout=1200)
      if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return workdir, data_dir
