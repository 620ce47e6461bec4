"""Test-wide settings: CPU only, and no network (a download would stall for minutes, then fail)."""

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
