#!/usr/bin/env bash
# Pretraining on a Cloud TPU pod slice: (optionally) create the TPU VM, copy this checkout to every
# worker, install, and run the same `chmr-jax pretrain --config.train.distributed=True` command on all workers at once.
# jax.distributed.initialize() discovers the pod; the global batch is sharded over every chip.
#
# Usage: TPU_NAME=chmr-pod ZONE=us-central2-b [ACCELERATOR=v4-32 CREATE=1] \
#          bash launch/tpu_pod.sh WORKDIR [extra chmr-jax pretrain flags]
#   TPU_NAME=chmr-pod ZONE=us-central2-b CREATE=1 bash launch/tpu_pod.sh /mnt/shared/runs/paper \
#       --config.corpus.path=/mnt/shared/pretrain/raw
# WORKDIR (checkpoints, metrics) must be storage every worker sees at the same path (a gcsfuse-mounted
# bucket or NFS), as Orbax writes one checkpoint cooperatively from all hosts. CHMR_DATA_DIR likewise.
# CONFIG defaults to configs/paper.py:tpu_pod (ring InfoNCE, distributed on).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/paper.py:tpu_pod}
WORKDIR=${1:?usage: bash launch/tpu_pod.sh WORKDIR [flags]}
shift
DATA=${CHMR_DATA_DIR:-/mnt/shared/data}
REMOTE_DIR=chmr_jax
tpu() { gcloud compute tpus tpu-vm "$@" --zone "$ZONE"; }

if [ "${CREATE:-0}" = 1 ]; then
  tpu create "$TPU_NAME" --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
fi
# Ship the working tree (no venv, caches or runs) to every worker.
tar czf /tmp/chmr_jax_src.tgz --exclude=.venv --exclude=runs --exclude=.git .
tpu scp /tmp/chmr_jax_src.tgz "$TPU_NAME":/tmp/ --worker=all
tpu ssh "$TPU_NAME" --worker=all --command "
  set -e; mkdir -p $REMOTE_DIR && tar xzf /tmp/chmr_jax_src.tgz -C $REMOTE_DIR && cd $REMOTE_DIR
  python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . 'jax[tpu]'
"
# The same command on every worker; each logs to its own file, worker 0 also writes metrics and summary.
ARGS=$(printf " %q" "$@")
tpu ssh "$TPU_NAME" --worker=all --command "
  cd $REMOTE_DIR && CHMR_DATA_DIR=$DATA .venv/bin/chmr-jax pretrain --config '$CONFIG' \
    --workdir '$WORKDIR' --config.train.distributed=True $ARGS 2>&1 | tee -a pretrain-\$(hostname).log
"
echo "Results in $WORKDIR (checkpoints/, metrics.jsonl, tensorboard/, summary.json); logs: ~/$REMOTE_DIR/pretrain-*.log on each worker"
