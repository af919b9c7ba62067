#!/usr/bin/env bash
# Pretraining on the GPUs of one machine: every visible GPU joins the 'data' mesh (parameters
# replicated, each global batch split over the GPUs; InfoNCE as a ring with objective.infonce_impl=ring).
#
# Usage: [CONFIG=file.py[:variant]] bash launch/gpu.sh WORKDIR [extra chmr-jax pretrain flags]
#   bash launch/gpu.sh runs/gpu                                        # default config, all GPUs
#   CUDA_VISIBLE_DEVICES=0,1 bash launch/gpu.sh runs/gpu2 --config.objective.infonce_impl=ring
#   CONFIG=configs/paper.py bash launch/gpu.sh runs/paper --config.corpus.path=/data/pretrain/raw
# Needs a CUDA build of jax. With INSTALL_CUDA=1 the script installs "jax[cuda12]" into .venv when
# no GPU is visible to jax. Multi-node GPU clusters: run this on every node with --config.train.distributed=True
# (jax.distributed.initialize() reads the coordinator from SLURM / the JAX_COORDINATOR_* variables).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_setup.sh   # .venv on first use, CHMR_DATA_DIR default
if ! .venv/bin/python -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" 2>/dev/null; then
  if [ "${INSTALL_CUDA:-0}" = 1 ]; then
    .venv/bin/python -m pip install -q -U "jax[cuda12]"
  else
    echo "jax sees no GPU. Install a CUDA build (INSTALL_CUDA=1 bash launch/gpu.sh ...) or use launch/local.sh" >&2
    exit 1
  fi
fi
WORKDIR=${1:?usage: bash launch/gpu.sh WORKDIR [flags]}
shift
# The latency-hiding scheduler overlaps the ring's ppermutes with the block computations.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
# JAX's persistent compilation cache (COMPILATION_CACHE='' turns it off): a rerun or resume skips XLA compilation.
COMPILATION_CACHE=${COMPILATION_CACHE-$HOME/.cache/chmr_jax/compilation_cache}
exec .venv/bin/chmr-jax pretrain --config "${CONFIG:-configs/pretrain.py}" --workdir "$WORKDIR" \
  --config.train.compilation_cache_dir="$COMPILATION_CACHE" "$@"
