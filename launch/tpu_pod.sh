#!/usr/bin/env bash
# Pretraining on a Cloud TPU pod slice, detached from this ssh session.
#
#   start WORKDIR [flags]  (optionally) create the TPU VM with autocheckpoint, copy this checkout to
#                          every worker, install it (below), kill stale processes holding the TPU, then
#                          start the same `chmr-jax pretrain --config.train.distributed=True` on every
#                          worker under setsid + nohup: a dropped connection (SIGHUP) no longer kills the
#                          job. Returns at once. Refused while a job runs there (stop it first; FORCE=1
#                          kills it). Records its settings for `resume`.
#   resume                 `start` again with the settings the last `start` recorded for $TPU_NAME (after a
#                          maintenance event or `stop`): reinstalls what a recreated worker lacks, and the
#                          job resumes from the workdir's newest good checkpoint. A PREEMPTED (or TERMINATED)
#                          TPU is deleted and created again when the recorded start had CREATE=1 (same
#                          ACCELERATOR and RUNTIME); otherwise resume says so and stops (exit 2).
#   status                 on every worker: is the job running, the last lines of its log
#   logs [N]               the last N (default 50) lines of worker ${WORKER:-0}'s log (FOLLOW=1: tail -f)
#   stop                   SIGTERM on every worker: the processes agree on one step, checkpoint it and
#                          exit 0 (as on a maintenance event); `resume` continues from the workdir
#
# Usage: TPU_NAME=chmr-pod ZONE=us-central2-b [ACCELERATOR=v4-32 CREATE=1] \
#          bash launch/tpu_pod.sh start gs://BUCKET/runs/paper [extra chmr-jax pretrain flags]
#   (`bash launch/tpu_pod.sh WORKDIR ...` without a subcommand is `start`.)
# WORKDIR (checkpoints, metrics) must be storage every worker sees at the same path: a gs:// URL (Orbax
# writes it directly) or a mount every worker shares; the job checks that all workers see the same
# workdir before it trains. CHMR_DATA_DIR (default /mnt/shared/data) likewise.
# Install: the default image (RUNTIME=tpu-ubuntu2204-base) ships Python 3.10, and chmr_jax, jax 0.10, libtpu
# and orbax need >= 3.11, so every worker provisions Python $PYTHON_VERSION (default 3.11, what the tests run)
# itself with uv (pip-installed for the user, pinned UV_VERSION; uv downloads a standalone CPython: no PPA, no
# image change), into ~/chmr_jax/.venv, with constraints/pod.txt as pip constraints: every package at the
# version the test suite ran with (jax[tpu]==setup.py's JAX_PIN, libtpu, flax, orbax-checkpoint, tensorstore,
# numpy, gcsfs, ...), so the checkpoint format and the numerics are the tested ones. A worker that already has
# that venv keeps it (a re-run only re-syncs the packages).
# CONFIG defaults to configs/paper.py:tpu_pod (ring InfoNCE, distributed on). COMPILATION_CACHE
# (default WORKDIR/compilation_cache) is JAX's persistent compilation cache, and CACHE_DIR (the feature cache,
# CHMR_CACHE_DIR; default gs://BUCKET/chmr_jax_cache for a gs:// WORKDIR, else WORKDIR/cache) the corpus cache,
# both shared by every worker and every restart: a resumed job neither rebuilds nor recompiles. Each worker
# logs to LOG_DIR/pretrain-<host>.log (default ~/chmr_jax/logs; its pid in LOG_DIR/pretrain.pid), copied to
# WORKDIR/logs/pretrain-<host>-<start time>.log every LOG_COPY_EVERY_S (60) seconds and when the job ends: one
# log per start or resume, so a resume never overwrites the log of the run that a maintenance event ended
# (LOG_DIR/pretrain-<host>.log links to the newest, for `status` and `logs`).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
UV_VERSION=${UV_VERSION:-0.13.9}
CONSTRAINTS=constraints/pod.txt
REMOTE_DIR=chmr_jax
LOG_DIR=${LOG_DIR:-\$HOME/$REMOTE_DIR/logs}
LOG_COPY_EVERY_S=${LOG_COPY_EVERY_S:-60}
# Where `start` records its settings for `resume` (on this machine).
STATE_DIR=${STATE_DIR:-$HOME/.cache/chmr_jax/pods}
# The jax the test suite runs with (setup.py's JAX_PIN): a pod must not pick up whatever jax[tpu] is newest.
JAX_VERSION=${JAX_VERSION:-$(sed -n 's/^JAX_PIN = "\(.*\)".*/\1/p' setup.py)}
: "${JAX_VERSION:?setup.py has no JAX_PIN line}"
if ! grep -qx "jax==$JAX_VERSION" "$CONSTRAINTS"; then
  echo "$CONSTRAINTS does not pin jax==$JAX_VERSION (setup.py's JAX_PIN): regenerate it from the tested venv" >&2
  exit 2
fi
# What identifies our job in the process table (the stop / status / cleanup patterns).
# The bracket keeps the pattern from matching the remote shell that runs pkill / pgrep with it. Anchored on
# this install's own path (expanded on the worker, where the job is started by it): a bare 'chmr-jax pretrain'
# would also stop any other user's or checkout's pretraining on the machine (the test suite runs these
# commands on the developer's machine).
JOB_PATTERN="\$HOME/$REMOTE_DIR/[.]venv/bin/chmr-jax pretrain"

tpu() { gcloud compute tpus tpu-vm "$@" --zone "$ZONE"; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command "$1"; }

cmd=start
case "${1:-}" in
  start|resume|status|logs|stop) cmd=$1; shift ;;
  "") echo "usage: bash launch/tpu_pod.sh {start WORKDIR [flags] | resume | status | logs [N] | stop}" >&2; exit 2 ;;
esac

case "$cmd" in
status)
  on_all "if pgrep -f \"$JOB_PATTERN\" >/dev/null; then echo \"\$(hostname): running\"; else echo \"\$(hostname): not running\"; fi; tail -n 3 $LOG_DIR/pretrain-\$(hostname).log 2>/dev/null || true"
  exit 0 ;;
logs)
  lines=${1:-50}
  follow=""; [ "${FOLLOW:-0}" = 1 ] && follow="-f"
  tpu ssh "$TPU_NAME" --worker="${WORKER:-0}" --command "tail -n $lines $follow $LOG_DIR/pretrain-\$(hostname).log"
  exit 0 ;;
stop)
  # SIGTERM, not SIGKILL: the processes agree on a stop step, checkpoint it and exit 0.
  on_all "pkill -TERM -f \"$JOB_PATTERN\" || true; for i in \$(seq 120); do pgrep -f \"$JOB_PATTERN\" >/dev/null || exit 0; sleep 1; done; echo \"\$(hostname): still running after 120 s\" >&2; exit 1"
  exit 0 ;;
resume)
  recorded="$STATE_DIR/$TPU_NAME.sh"
  if [ ! -f "$recorded" ]; then
    echo "no recorded start for TPU $TPU_NAME ($recorded): run 'bash launch/tpu_pod.sh start WORKDIR [flags]' first" >&2
    exit 2
  fi
  # shellcheck source=/dev/null
  source "$recorded"   # CONFIG, CHMR_DATA_DIR, CACHE_DIR, COMPILATION_CACHE and `set -- WORKDIR flags...`
  ;;
esac

CONFIG=${CONFIG:-configs/paper.py:tpu_pod}
DATA=${CHMR_DATA_DIR:-/mnt/shared/data}
WORKDIR=${1:?usage: bash launch/tpu_pod.sh start WORKDIR [flags]}
shift
COMPILATION_CACHE=${COMPILATION_CACHE:-${WORKDIR%/}/compilation_cache}
if [[ "$WORKDIR" == gs://* ]]; then
  bucket=${WORKDIR#gs://}
  CACHE_DIR=${CACHE_DIR:-gs://${bucket%%/*}/chmr_jax_cache}
else
  CACHE_DIR=${CACHE_DIR:-${WORKDIR%/}/cache}
fi
mkdir -p "$STATE_DIR"
{
  printf 'CONFIG=%q\nCHMR_DATA_DIR=%q\nCACHE_DIR=%q\nCOMPILATION_CACHE=%q\n' "$CONFIG" "$DATA" "$CACHE_DIR" \
    "$COMPILATION_CACHE"
  printf 'CREATE=%q\nACCELERATOR=%q\nRUNTIME=%q\n' "${CREATE:-0}" "$ACCELERATOR" "$RUNTIME"
  printf 'set --'; printf ' %q' "$WORKDIR" "$@"; printf '\n'
} > "$STATE_DIR/$TPU_NAME.sh"

exists=1
# A preempted (or terminated) TPU still exists, so `describe` succeeds, but its workers cannot be reached:
# it has to be created again (its disks are gone; the workdir and the cache are in the bucket).
state=$(tpu describe "$TPU_NAME" --format='value(state)' 2>/dev/null || true)
if [ "$state" = PREEMPTED ] || [ "$state" = TERMINATED ]; then
  if [ "${CREATE:-0}" != 1 ]; then
    echo "TPU $TPU_NAME is $state: create it again (CREATE=1 ACCELERATOR=... bash launch/tpu_pod.sh resume deletes" \
         "and recreates it), then the job resumes from $WORKDIR" >&2
    exit 2
  fi
  tpu delete "$TPU_NAME" --quiet
  deleted=1
fi
if [ "${CREATE:-0}" = 1 ] && { [ "${deleted:-0}" = 1 ] || ! tpu describe "$TPU_NAME" > /dev/null 2>&1; }; then
  # --autocheckpoint-enabled: on a maintenance event the TPU runtime sends SIGTERM first, which our
  # job turns into one agreed checkpoint (alpha track: the flag is not in the GA command yet).
  gcloud alpha compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" \
    --version "$RUNTIME" --autocheckpoint-enabled
  exists=0
fi
if [ "$exists" = 1 ] && [ "${FORCE:-0}" != 1 ]; then
  # A running job would be SIGKILLed by the cleanup below, losing the work since its last checkpoint.
  on_all "if pgrep -f \"$JOB_PATTERN\" >/dev/null; then echo \"\$(hostname): the job is still running; run 'bash launch/tpu_pod.sh stop' first (or FORCE=1)\" >&2; exit 1; fi"
fi
# Ship the working tree (no venv, caches, runs or stray local `gs:` folders) to every worker.
tar czf /tmp/chmr_jax_src.tgz --exclude=.venv --exclude=runs --exclude=.git --exclude='./gs:' .
tpu scp /tmp/chmr_jax_src.tgz "$TPU_NAME":/tmp/ --worker=all
# Python $PYTHON_VERSION from uv (the image's is 3.10); the venv is made again only when it is not that Python.
on_all "set -e; mkdir -p $REMOTE_DIR && tar xzf /tmp/chmr_jax_src.tgz -C $REMOTE_DIR && cd $REMOTE_DIR
  export PATH=\$HOME/.local/bin:\$PATH
  command -v uv >/dev/null || python3 -m pip install -q --user 'uv==$UV_VERSION'
  if [ ! -x .venv/bin/python$PYTHON_VERSION ]; then rm -rf .venv; uv venv -q --python $PYTHON_VERSION .venv; fi
  uv pip install -q --python .venv/bin/python -c $CONSTRAINTS -e . 'jax[tpu]==$JAX_VERSION'"
# A previous (crashed or orphaned) job still holding the TPU makes the new one fail to open it: stop ours,
# then whatever holds the accelerator device files, and the lockfile libtpu leaves behind.
on_all "pkill -KILL -f \"$JOB_PATTERN\" || true; kill \$(cat $LOG_DIR/copy_log.pid 2>/dev/null) 2>/dev/null || true; sudo fuser -k -KILL /dev/accel* /dev/vfio/* 2>/dev/null || true; sudo rm -f /tmp/libtpu_lockfile; sleep 2"
# The same command on every worker, detached (setsid + nohup, stdin closed): it outlives this ssh session.
# Beside it, detached too, launch/_copy_log.sh copies the worker's log to WORKDIR/logs/ until the job ends.
ARGS=""
[ $# -gt 0 ] && ARGS=$(printf " %q" "$@")
STAMP=$(date -u +%Y%m%dT%H%M%SZ)   # one log per start / resume (the same name on every worker)
on_all "set -e; cd $REMOTE_DIR; mkdir -p $LOG_DIR; log=$LOG_DIR/pretrain-\$(hostname)-$STAMP.log
  ln -sfn \$log $LOG_DIR/pretrain-\$(hostname).log
  CHMR_DATA_DIR='$DATA' CHMR_CACHE_DIR='$CACHE_DIR' setsid nohup \$HOME/$REMOTE_DIR/.venv/bin/chmr-jax pretrain \
  --config '$CONFIG' --workdir '$WORKDIR' --config.train.distributed=True \
  --config.train.compilation_cache_dir='$COMPILATION_CACHE' $ARGS \
  > \$log 2>&1 < /dev/null & echo \$! > $LOG_DIR/pretrain.pid
  setsid nohup bash launch/_copy_log.sh \$log '${WORKDIR%/}/logs/'pretrain-\$(hostname)-$STAMP.log $LOG_COPY_EVERY_S \"$JOB_PATTERN\" \
  > $LOG_DIR/copy_log.err 2>&1 < /dev/null & echo \$! > $LOG_DIR/copy_log.pid
  echo \"\$(hostname): started \$(cat $LOG_DIR/pretrain.pid)\""
echo "Started on every worker of $TPU_NAME. Results in $WORKDIR (checkpoints/, metrics.jsonl, summary.json, logs/)."
echo "Watch: bash launch/tpu_pod.sh status | logs [N] (FOLLOW=1) ; stop (checkpoint and exit): bash launch/tpu_pod.sh stop"
echo "After a maintenance event or a stop: bash launch/tpu_pod.sh resume"
