#!/usr/bin/env bash
# Runs irgen_jax on the local GPUs (all of them, data parallel in one process), or as one node of a
# multi-node job when COORDINATOR is given.
#
# Single host:  CONFIG=configs/cub200.py WORKDIR=workdirs/cub200 bash launch/gpu.sh
# Multi-node:   on every node, with the same COORDINATOR (host:port of node 0) and NUM_NODES,
#               and NODE_RANK 0..NUM_NODES-1:
#               COORDINATOR=10.0.0.1:12345 NUM_NODES=2 NODE_RANK=0 CONFIG=... WORKDIR=... bash launch/gpu.sh
#
# Set INSTALL=1 to (re)install the pinned requirements with jax[cuda12] first. EXTRA_ARGS adds flags.
set -euo pipefail
: "${CONFIG:?set CONFIG, e.g. configs/cub200.py}"
: "${WORKDIR:?set WORKDIR, a directory shared by all nodes in multi-node runs}"
cd "$(dirname "$0")/.."

if [ "${INSTALL:-0}" = 1 ] || [ ! -x .venv/bin/python ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt
  .venv/bin/pip install -q -c constraints.txt "jax[cuda12]==0.10.2"
fi
command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "gpu.sh: warning: nvidia-smi not found" >&2

if [ -n "${COORDINATOR:-}" ]; then
  : "${NUM_NODES:?set NUM_NODES with COORDINATOR}"
  : "${NODE_RANK:?set NODE_RANK (0..NUM_NODES-1) with COORDINATOR}"
  export IRGEN_COORDINATOR_ADDRESS="$COORDINATOR" IRGEN_NUM_PROCESSES="$NUM_NODES" \
    IRGEN_PROCESS_ID="$NODE_RANK"
fi
# TensorFlow, if installed for data preparation and imported by TFDS, must not grab GPU memory.
export TF_FORCE_GPU_ALLOW_GROWTH=true
exec .venv/bin/python -m irgen_jax.main --config="$CONFIG" --workdir="$WORKDIR" ${EXTRA_ARGS:-}
