#!/usr/bin/env bash
# Issue 32: what pretraining buys without the benchmark test molecules in the corpus, over pretraining
# seeds, against each run's own untrained initialisation and a structure-only arm.
#   bash benchmarks/lift_noleak.sh pretrain ARM SEED EPOCHS   # one pretraining run -> $RUNS/<ARM>_s<SEED>_e<EPOCHS>
#   bash benchmarks/lift_noleak.sh finetune ARM SEED EPOCHS   # the 9 benchmarks, head seeds 0-4, its untrained control
#   bash benchmarks/lift_noleak.sh all EPOCHS [SEEDS]         # both arms, SEEDS (default 0,1,2): pretrain then finetune
#   python benchmarks/lift_noleak.py --runs $RUNS --epochs EPOCHS --out benchmarks/lift_noleak.json   # JSON + table
# ARM: cellular (configs/pretrain.py, the validation-chosen objective) or structure_only (the same
# schedule with no cellular modality: SCA and VICReg off, context walks over molecule nodes only).
# Every run: corpus.exclude=all (the nine benchmarks' test parts, under the split each is evaluated
# with: their default protocol, the one `benchmark` scores), train.seed=SEED (initialisation and data order).
set -euo pipefail
cd "$(dirname "$0")/.."
export CHMR_DATA_DIR=${CHMR_DATA_DIR:-$(cd .. && pwd)/shared/data}
# (python -m: the process is not named `chmr-jax pretrain`, which launch/tpu_pod.sh's stop pattern matches)
CLI=${CLI:-.venv/bin/python -m chmr_jax.cli}
RUNS=${RUNS:-runs/noleak}
arm_flags() {
  case "$1" in
    cellular)       echo "" ;;
    structure_only) echo "--config.pretrain_data.modalities=none" ;;
    *) echo "unknown arm $1 (cellular | structure_only)" >&2; exit 2 ;;
  esac
}
pretrain() {   # ARM SEED EPOCHS
  local dir="$RUNS/$1_s$2_e$3"
  # shellcheck disable=SC2046
  $CLI pretrain --config configs/pretrain.py --workdir "$dir" --config.corpus.exclude=all \
    --config.train.seed="$2" --config.train.epochs="$3" --config.train.checkpoint_every_steps=100 \
    --config.train.progress=log $(arm_flags "$1")
  # A run stopped by a signal exits 0 after its checkpoint: never fine-tune a partial encoder.
  .venv/bin/python -c "import json,sys; s=json.load(open('$dir/summary.json')); sys.exit(s['steps'] != s['total_steps'])" ||
    { echo "$dir stopped before its last step: run the same command again to continue" >&2; exit 1; }
}
finetune() {   # ARM SEED EPOCHS
  local dir="$RUNS/$1_s$2_e$3"
  $CLI benchmark --datasets "${DATASETS:-all}" --config.seeds=0,1,2,3,4 --pretrained "$dir" \
    --workdir "$dir/eval" --config.baselines=
}
case "${1:-}" in
  pretrain) pretrain "$2" "$3" "$4" ;;
  finetune) finetune "$2" "$3" "$4" ;;
  all)
    # Arms outer, seeds inner: the pretrained-vs-own-init comparison over every seed comes first.
    epochs=$2; seeds=${3:-0,1,2}
    for arm in ${ARMS:-cellular structure_only}; do
      for seed in ${seeds//,/ }; do
        pretrain "$arm" "$seed" "$epochs"
        finetune "$arm" "$seed" "$epochs"
      done
    done ;;
  *) echo "usage: $0 pretrain|finetune ARM SEED EPOCHS | all EPOCHS [SEEDS]"; exit 2 ;;
esac
