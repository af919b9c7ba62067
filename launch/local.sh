#!/usr/bin/env bash
# The main job on one machine (CPU or one GPU): set up .venv if needed, build the pretraining corpus
# from the data directory, pretrain CHMR with the default config, and print where the results are.
#
# Usage: [CONFIG=file.py[:variant]] bash launch/local.sh [WORKDIR] [extra chmr-jax pretrain flags]
#   bash launch/local.sh                                    # short run (200 steps) into runs/local
#   bash launch/local.sh runs/full --config.train.steps=0   # the full schedule (config.train.epochs)
#   CONFIG=configs/paper.py bash launch/local.sh runs/paper --config.corpus.path=/data/pretrain/raw
# Re-running the same command continues from the newest checkpoint in WORKDIR.
# Data: $CHMR_DATA_DIR (default ../shared/data if present, else ~/.cache/chmr_jax).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_setup.sh   # .venv on first use, CHMR_DATA_DIR default
WORKDIR=${1:-runs/local}
shift || true
CONFIG=${CONFIG:-configs/pretrain.py}
# The corpus is built on first use and cached (a second run skips featurization); a short run by
# default: later flags override earlier ones.
# JAX's persistent compilation cache (COMPILATION_CACHE='' turns it off): a rerun or resume skips XLA compilation.
COMPILATION_CACHE=${COMPILATION_CACHE-$HOME/.cache/chmr_jax/compilation_cache}
.venv/bin/chmr-jax pretrain --config "$CONFIG" --workdir "$WORKDIR" --config.train.steps=200 \
  --config.train.checkpoint_every_steps=50 --config.train.compilation_cache_dir="$COMPILATION_CACHE" "$@"
echo "Results in $WORKDIR: checkpoints/ (Orbax), metrics.jsonl, tensorboard/ (tensorboard --logdir $WORKDIR/tensorboard), summary.json"
