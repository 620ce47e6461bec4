#!/usr/bin/env bash
# Runs irgen_jax on every worker of a Cloud TPU VM slice: creates the slice unless it exists, installs the
# pinned requirements with jax[tpu] on all workers, then starts the same command everywhere.
#
#   TPU_NAME=irgen-v4 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 RUNTIME_VERSION=tpu-ubuntu2204-base \
#   CONFIG=configs/inshop.py WORKDIR=gs://my-bucket/irgen/inshop DATA_DIR=gs://my-bucket/tfds \
#   bash launch/tpu_pod.sh
#
# Optional: PROJECT (gcloud project), SPOT=1 (preemptible capacity; runs resume from their checkpoints),
# EXTRA_ARGS (more flags for irgen_jax.main, e.g. "--config.tokenizer.batch_size=1024").
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME, the name of the TPU VM slice}"
: "${ZONE:?set ZONE, e.g. us-central2-b}"
: "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE, e.g. v4-32 or v5litepod-16}"
: "${RUNTIME_VERSION:?set RUNTIME_VERSION, e.g. tpu-ubuntu2204-base or v2-alpha-tpuv5-lite}"
: "${CONFIG:?set CONFIG, e.g. configs/inshop.py}"
: "${WORKDIR:?set WORKDIR, a gs:// path every worker can write}"
: "${DATA_DIR:?set DATA_DIR, the prepared TFDS data dir (gs:// or a path present on every worker)}"
command -v gcloud >/dev/null || { echo "tpu_pod.sh: gcloud is not installed" >&2; exit 1; }

project_flag=()
[ -n "${PROJECT:-}" ] && project_flag=(--project="$PROJECT")
tpu=(gcloud compute tpus tpu-vm "${project_flag[@]}")

if ! "${tpu[@]}" describe "$TPU_NAME" --zone="$ZONE" >/dev/null 2>&1; then
  spot_flag=()
  [ "${SPOT:-0}" = 1 ] && spot_flag=(--spot)
  echo "Creating $TPU_NAME ($ACCELERATOR_TYPE) in $ZONE"
  "${tpu[@]}" create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "${spot_flag[@]}"
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
archive=$(mktemp -t irgen_jax.XXXXXX.tgz)
tar -C "$repo" --exclude=.venv --exclude=workdirs --exclude=.git -czf "$archive" .
echo "Copying the code to every worker"
"${tpu[@]}" scp "$archive" "$TPU_NAME":~/irgen_jax.tgz --zone="$ZONE" --worker=all
rm -f "$archive"

setup='set -e; mkdir -p ~/irgen_jax && tar -C ~/irgen_jax -xzf ~/irgen_jax.tgz && cd ~/irgen_jax &&
  python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt &&
  .venv/bin/pip install -q -c constraints.txt "jax[tpu]==0.10.2"'
echo "Installing on every worker"
"${tpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$setup"

# IRGEN_DISTRIBUTED=auto: every worker calls jax.distributed.initialize(), which discovers the slice.
run="cd ~/irgen_jax && IRGEN_DISTRIBUTED=auto TFDS_DATA_DIR='$DATA_DIR' .venv/bin/python -m irgen_jax.main \
  --config='$CONFIG' --workdir='$WORKDIR' --config.data.data_dir='$DATA_DIR' ${EXTRA_ARGS:-}"
echo "Starting on every worker: $run"
"${tpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$run"
