# Sourced by the launch scripts (not run on its own): creates .venv and installs chmr_jax into it on
# first use, and points CHMR_DATA_DIR at ../shared/data when that exists and the variable is unset.
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/chmr-jax ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e .
fi
if [ -z "${CHMR_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export CHMR_DATA_DIR=$(cd ../shared/data && pwd)
fi
