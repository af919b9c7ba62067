#!/usr/bin/env bash
# Run by launch/tpu_pod.sh on each pod worker, detached beside the job: copies the job's log LOG to DEST (a
# gs:// object or a path on a shared mount) every EVERY seconds while a process matching PATTERN (pgrep -f)
# runs, and once more after it ended, so every worker's log outlives the worker's disk.
#   bash launch/_copy_log.sh LOG DEST EVERY PATTERN        (PYTHON: default .venv/bin/python, with fsspec/gcsfs)
LOG=$1 DEST=$2 EVERY=$3 PATTERN=$4
PY=${PYTHON:-.venv/bin/python}
copy() {
  "$PY" -c 'import sys, fsspec
fs, path = fsspec.core.url_to_fs(sys.argv[2])
fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
fs.put_file(sys.argv[1], path)' "$LOG" "$DEST" || echo "$(date -u +%FT%TZ) copying $LOG to $DEST failed" >&2
}
sleep 2   # (the job's process has replaced its launching shell by then)
while pgrep -f "$PATTERN" > /dev/null; do
  copy
  sleep "$EVERY"
done
copy
