#!/usr/bin/env bash
# Pretraining on a Cloud TPU pod slice, detached from this ssh session.
#
#   start WORKDIR [flags]  (optionally) create the TPU VM with autocheckpoint, copy this checkout to
#                          every worker, install it with jax[tpu] pinned to setup.py's JAX_PIN, kill
#                          stale processes holding the TPU, then start the same `chmr-jax pretrain
#                          --config.train.distributed=True` on every worker under setsid + nohup: a
#                          dropped connection (SIGHUP) no longer kills the job. Returns at once.
#                          Refused while a job runs there (stop it first; FORCE=1 kills it).
#   status                 on every worker: is the job running, the last lines of its log
#   logs [N]               the last N (default 50) lines of worker ${WORKER:-0}'s log (FOLLOW=1: tail -f)
#   stop                   SIGTERM on every worker: the processes agree on one step, checkpoint it and
#                          exit 0 (as on a maintenance event); `start` again resumes from the workdir
#
# Usage: TPU_NAME=chmr-pod ZONE=us-central2-b [ACCELERATOR=v4-32 CREATE=1] \
#          bash launch/tpu_pod.sh start gs://BUCKET/runs/paper [extra chmr-jax pretrain flags]
#   (`bash launch/tpu_pod.sh WORKDIR ...` without a subcommand is `start`.)
# WORKDIR (checkpoints, metrics) must be storage every worker sees at the same path: a gs:// URL (Orbax
# writes it directly) or a mount every worker shares; the job checks that all workers see the same
# workdir before it trains. CHMR_DATA_DIR (default /mnt/shared/data) likewise.
# CONFIG defaults to configs/paper.py:tpu_pod (ring InfoNCE, distributed on). COMPILATION_CACHE
# (default WORKDIR/compilation_cache) is JAX's persistent compilation cache, shared by every worker
# and every restart, so a resumed job does not recompile. Each worker logs to LOG_DIR/pretrain-<host>.log
# (default ~/chmr_jax/logs) and records its pid in LOG_DIR/pretrain.pid.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/paper.py:tpu_pod}
DATA=${CHMR_DATA_DIR:-/mnt/shared/data}
REMOTE_DIR=chmr_jax
LOG_DIR=${LOG_DIR:-\$HOME/$REMOTE_DIR/logs}
# The jax the test suite runs with (setup.py's JAX_PIN): a pod must not pick up whatever jax[tpu] is newest.
JAX_VERSION=${JAX_VERSION:-$(sed -n 's/^JAX_PIN = "\(.*\)".*/\1/p' setup.py)}
: "${JAX_VERSION:?setup.py has no JAX_PIN line}"
# What identifies our job in the process table (the stop / status / cleanup patterns).
# The bracket keeps the pattern from matching the remote shell that runs pkill / pgrep with it.
JOB_PATTERN='chmr-jax[ ]pretrain'

tpu() { gcloud compute tpus tpu-vm "$@" --zone "$ZONE"; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command "$1"; }

cmd=start
case "${1:-}" in
  start|status|logs|stop) cmd=$1; shift ;;
  "") echo "usage: bash launch/tpu_pod.sh {start WORKDIR [flags] | status | logs [N] | stop}" >&2; exit 2 ;;
esac

case "$cmd" in
status)
  on_all "if pgrep -f '$JOB_PATTERN' >/dev/null; then echo \"\$(hostname): running\"; else echo \"\$(hostname): not running\"; fi; tail -n 3 $LOG_DIR/pretrain-\$(hostname).log 2>/dev/null || true"
  exit 0 ;;
logs)
  lines=${1:-50}
  follow=""; [ "${FOLLOW:-0}" = 1 ] && follow="-f"
  tpu ssh "$TPU_NAME" --worker="${WORKER:-0}" --command "tail -n $lines $follow $LOG_DIR/pretrain-\$(hostname).log"
  exit 0 ;;
stop)
  # SIGTERM, not SIGKILL: the processes agree on a stop step, checkpoint it and exit 0.
  on_all "pkill -TERM -f '$JOB_PATTERN' || true; for i in \$(seq 120); do pgrep -f '$JOB_PATTERN' >/dev/null || exit 0; sleep 1; done; echo \"\$(hostname): still running after 120 s\" >&2; exit 1"
  exit 0 ;;
esac

WORKDIR=${1:?usage: bash launch/tpu_pod.sh start WORKDIR [flags]}
shift
COMPILATION_CACHE=${COMPILATION_CACHE:-${WORKDIR%/}/compilation_cache}

if [ "${CREATE:-0}" != 1 ] && [ "${FORCE:-0}" != 1 ]; then
  # A running job would be SIGKILLed by the cleanup below, losing the work since its last checkpoint.
  on_all "if pgrep -f '$JOB_PATTERN' >/dev/null; then echo \"\$(hostname): the job is still running; run 'bash launch/tpu_pod.sh stop' first (or FORCE=1)\" >&2; exit 1; fi"
fi
if [ "${CREATE:-0}" = 1 ]; then
  # --autocheckpoint-enabled: on a maintenance event the TPU runtime sends SIGTERM first, which our
  # job turns into one agreed checkpoint (alpha track: the flag is not in the GA command yet).
  gcloud alpha compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" \
    --version "$RUNTIME" --autocheckpoint-enabled
fi
# Ship the working tree (no venv, caches or runs) to every worker.
tar czf /tmp/chmr_jax_src.tgz --exclude=.venv --exclude=runs --exclude=.git .
tpu scp /tmp/chmr_jax_src.tgz "$TPU_NAME":/tmp/ --worker=all
on_all "set -e; mkdir -p $REMOTE_DIR && tar xzf /tmp/chmr_jax_src.tgz -C $REMOTE_DIR && cd $REMOTE_DIR
  python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . 'jax[tpu]==$JAX_VERSION'"
# A previous (crashed or orphaned) job still holding the TPU makes the new one fail to open it: stop ours,
# then whatever holds the accelerator device files, and the lockfile libtpu leaves behind.
on_all "pkill -KILL -f '$JOB_PATTERN' || true; sudo fuser -k -KILL /dev/accel* /dev/vfio/* 2>/dev/null || true; sudo rm -f /tmp/libtpu_lockfile; sleep 2"
# The same command on every worker, detached (setsid + nohup, stdin closed): it outlives this ssh session.
ARGS=""
[ $# -gt 0 ] && ARGS=$(printf " %q" "$@")
on_all "set -e; cd $REMOTE_DIR; mkdir -p $LOG_DIR; CHMR_DATA_DIR=$DATA setsid nohup .venv/bin/chmr-jax pretrain \
  --config '$CONFIG' --workdir '$WORKDIR' --config.train.distributed=True \
  --config.train.compilation_cache_dir='$COMPILATION_CACHE' $ARGS \
  > $LOG_DIR/pretrain-\$(hostname).log 2>&1 < /dev/null & echo \$! > $LOG_DIR/pretrain.pid; echo \"\$(hostname): started \$(cat $LOG_DIR/pretrain.pid)\""
echo "Started on every worker of $TPU_NAME. Results in $WORKDIR (checkpoints/, metrics.jsonl, summary.json)."
echo "Watch: bash launch/tpu_pod.sh status | logs [N] (FOLLOW=1) ; stop (checkpoint and exit): bash launch/tpu_pod.sh stop"
