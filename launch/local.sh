#!/usr/bin/env bash
# The main job on one machine: set up .venv if needed, then featurize and split the 9 benchmarks.
# Usage: bash launch/local.sh [extra chmr-jax prepare flags]    e.g. bash launch/local.sh --geometry rdkit3d
# Data: $CHMR_DATA_DIR (default ../shared/data if present, else ~/.cache/chmr_jax).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/chmr-jax ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e .
fi
if [ -z "${CHMR_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export CHMR_DATA_DIR=$(cd ../shared/data && pwd)
fi
.venv/bin/chmr-jax prepare --dataset all "$@"
echo "Features, rejects and splits are in ${CHMR_CACHE_DIR:-$HOME/.cache/chmr_jax/features}"
