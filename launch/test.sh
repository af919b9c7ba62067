#!/usr/bin/env bash
# Install chmr_jax with its test extras into .venv (created on first use) and run the test suite.
# Usage: bash launch/test.sh [pytest args]      e.g. bash launch/test.sh -k splits -x
# Tests that need the shared data read $CHMR_DATA_DIR (default ../shared/data) and skip with a
# message when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
export CHMR_DATA_DIR=${CHMR_DATA_DIR:-$(cd .. && pwd)/shared/data}
exec .venv/bin/python -m pytest -q "$@" tests
