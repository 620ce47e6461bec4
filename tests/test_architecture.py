"""The dependency rules (``.importlinter``): layers, serving without the trainers, pure models.

import-linter checks what the modules import statically; the fresh-process checks below see what
importing a serving module really loads (transitively, third-party packages included).
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_linter_contracts_are_kept():
  lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
  proc = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert "0 broken" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize("module", ["irgen_jax.search", "irgen_jax.insert", "irgen_jax.evaluate",
                                    "irgen_jax.workdir", "irgen_jax.decoding.program"])
def test_serving_loads_neither_the_trainers_nor_optax(module):
  code = (f"import sys, {module}\n"
          "bad = sorted(m for m in sys.modules if m == 'optax' or m.startswith('irgen_jax.trainers'))\n"
          "assert not bad, bad\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
