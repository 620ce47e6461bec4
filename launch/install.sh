#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian/Ubuntu machine (CPU):
#   - the Debian package dataset-fashion-mnist (the embedded default dataset), and
#   - a virtual environment .venv/ with the pinned runtime and test requirements.
# Accelerators: set JAX_EXTRA="jax[cuda12]==0.10.2" (GPU) or JAX_EXTRA="jax[tpu]==0.10.2" (TPU).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "install.sh: need root or sudo for apt-get" >&2; exit 1; }
  SUDO=sudo
fi

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  $SUDO apt-get update -qq || true   # a stale package list is fine when the package is already known
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q -r requirements-test.txt
# The TPU compiler for ahead-of-time compilation (python -m irgen_jax.aot and its tests), kept out of
# site-packages so CPU-only processes never load it (see requirements-tpu.txt).
if [ ! -f .venv/tpu-compiler/libtpu/libtpu.so ]; then
  .venv/bin/python -m pip install -q --target .venv/tpu-compiler -c constraints.txt -r requirements-tpu.txt
fi
if [ -n "${JAX_EXTRA:-}" ]; then
  .venv/bin/python -m pip install -q -c constraints.txt "$JAX_EXTRA"
fi
echo "install.sh: ready (.venv)"
