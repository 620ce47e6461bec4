"""Test-wide settings: CPU only with LLVM's optimizations off, no network (a download would stall for
minutes, then fail), one persistent XLA compilation cache for the whole test session, and the order in
which the slow modules start."""

import contextlib
import fcntl
import os
import socket

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("NO_GCE_CHECK", "true")
# LLVM's optimization passes off for every CPU program of the session (its subprocesses inherit it).
# The suite's programs are tiny and most of their time is compiling: the shared runlocal job ran in
# 32 s against 45 s cold here, at the same metrics. The HLO, and so what a test checks about our
# code, is the same at either level; within the session every run, reference and restart compiles
# alike, so byte comparisons hold. Benchmarks and users run at XLA's default level.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()

import pytest  # noqa: E402

_real_connect = socket.socket.connect


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
  """Every process of the session (the pytest-xdist workers and the jobs tests start as subprocesses,
  which inherit the environment) shares one persistent compilation cache under the session's base
  temp directory. Most of a small job's time on a CPU is XLA compiling, and the suite runs the same
  tiny programs many times: the shared runlocal job, every kill point's reference and restart, the
  sweep's points, the config end-to-end runs. A cached executable is the compiled program itself, so
  results are the same bytes as without the cache. The size limit turns on jax's file lock, so two
  workers never read an entry while the other writes it. (A cache dir already set is kept.)

  Only programs that took at least 0.1 s to compile are written: with the size limit, every write
  lists and reads the whole cache to pick what to evict (jax's LRU cache), so each costs time linear
  in the entries, under the lock that both workers wait on. With every program written (eager ops of
  tests included) the suite's cache reached ~2,500 entries and a write took ~0.2-0.3 s; the tiny
  programs left out recompile in less than that."""
  base = config._tmp_path_factory.getbasetemp()  # pylint: disable=protected-access
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "xla_cache"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))


# Modules whose tests take most of the suite's time, collected first in this order (the rest keep
# pytest's order after them). pytest-xdist hands each worker a run of consecutive tests at the start
# and the rest in small batches as workers finish, so the long tests start early and the many short
# ones even the two workers out at the end: in collection order the two longest (8 devices, two
# processes) came last and one worker ran them alone for ~90 s. The first three need no trained
# workdir, so one worker runs them while the other builds the shared one (fashion_runlocal_workdir).
RUN_FIRST = ("test_trainers.py", "test_loop.py", "test_beam_search.py", "test_kill_resume.py",
             "test_rqvae.py", "test_sweep.py", "test_main.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(RUN_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(RUN_FIRST)))  # stable: order kept within


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
