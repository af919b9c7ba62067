#!/usr/bin/env bash
# A real multi-process JAX job on one machine: N CPU processes on 127.0.0.1 (gloo collectives), each
# with its own devices, running the same `chmr-jax pretrain` command, exactly as the hosts of a TPU pod
# or GPU cluster do. It exercises the multi-host code paths (process-0-only writes, cooperative Orbax
# checkpoints, global batches assembled from per-process shards) without a cluster.
#
# Usage: [NUM_PROCESSES=2] [DEVICES_PER_PROCESS=1] [PORT=free] bash launch/two_process.sh WORKDIR [pretrain flags]
#   bash launch/two_process.sh runs/mp --config configs/test.py
# CHMR_COMMAND=embed runs `chmr-jax embed [flags] --coordinator_address ... --num_processes N --process_id i`
# instead (WORKDIR then only holds the logs):
#   CHMR_COMMAND=embed bash launch/two_process.sh runs/emb_logs --pretrained runs/a --input x.csv --out runs/emb
# Each process' log goes to LOG_DIR/process_<i>.log (its pid to process_<i>.pid); the script exits non-zero if any
# process does. LOG_DIR defaults to WORKDIR, or for a gs:// WORKDIR (which the processes write directly) to the
# local folder runs/logs/<bucket>/<path>: never a local `gs:` folder.
# CHMR_MIRROR_DIR containing %i (e.g. /tmp/host%i) gives each process its own local mirror of gs:// folders,
# as separate hosts have (%i becomes the process index).
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${1:?usage: bash launch/two_process.sh WORKDIR [flags]}
shift
N=${NUM_PROCESSES:-2}
PY=${PYTHON:-.venv/bin/python}
PORT=${PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
if [[ "$WORKDIR" =~ ^(gs|s3|az|hf):// ]]; then
  LOG_DIR=${LOG_DIR:-runs/logs/${WORKDIR#*://}}
else
  LOG_DIR=${LOG_DIR:-$WORKDIR}
fi
mkdir -p "$LOG_DIR"
pids=()
for ((i = 0; i < N; i++)); do
  if [[ "${CHMR_COMMAND:-pretrain}" == pretrain ]]; then
    args=(pretrain --workdir "$WORKDIR" "$@" --config.train.coordinator_address="127.0.0.1:$PORT"
          --config.train.num_processes="$N" --config.train.process_id="$i")
  else
    args=("$CHMR_COMMAND" "$@" --coordinator_address="127.0.0.1:$PORT" --num_processes="$N" --process_id="$i")
  fi
  mirror=${CHMR_MIRROR_DIR:-}
  CHMR_MIRROR_DIR=${mirror//%i/$i} JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}" \
    "$PY" -m chmr_jax.cli "${args[@]}" > "$LOG_DIR/process_$i.log" 2>&1 &
  pids+=($!)
  echo $! > "$LOG_DIR/process_$i.pid"
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $LOG_DIR/process_$i.log" >&2
    status=1
  fi
done
exit $status
