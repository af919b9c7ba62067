#!/usr/bin/env bash
# The accelerator check (issue 14 §4): run it whenever the `device` tool lends a machine. In under
# 8 minutes on one GPU it runs
#   1. a tiny pretraining through the CLI (configs/test.py, 20 steps; compile + step time from summary.json),
#   2. the propagation format comparison (benchmarks/propagation.py: BCSR / segment_sum / BCOO / ELL),
#   3. the pretraining step benchmark at batch 256 and 1024 on one device (benchmarks/pretrain_step.py,
#      enumerated molecules, the paper's model and modality widths), with the PyTorch stand-in of the
#      release's step beside it when torch imports, and again in bfloat16 with rematerialisation (each row
#      with the step's FLOPs and their fraction of the device's measured matmul rate),
# and writes one JSON, OUT/accelerator_check.json (plus each part's own JSON and log).
#
#   bash benchmarks/accelerator_check.sh [OUT]          # on the accelerator (default OUT: $OUT or runs/accelerator_check)
#   bash benchmarks/accelerator_check.sh --cpu [OUT]    # the same steps at toy sizes on the CPU: proves the
#                                                       # script works before a machine is lent (minutes)
# Needs the package installed (pip install -e .) or importable (PYTHONPATH=.): on the lent H200 image rdkit,
# ml-collections and tensorflow-datasets are missing and travel as wheels (see the device tool's README).
# No shared data is read. Exit status: non-zero if any part failed (the JSON says which).
set -uo pipefail
cd "$(dirname "$0")/.."
CPU=0
if [[ "${1:-}" == "--cpu" ]]; then CPU=1; shift; fi
OUTDIR=${1:-${OUT:-runs/accelerator_check}}
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" CHMR_CACHE_DIR="$OUTDIR/cache"
if [[ $CPU == 1 ]]; then
  export JAX_PLATFORMS=cpu
  TINY_STEPS=5; PROP_SIZES=2000; PROP_SECONDS=30; STEP_BATCHES=64; STEP_STEPS=2
else
  TINY_STEPS=20; PROP_SIZES=10000,50000,129592; PROP_SECONDS=60; STEP_BATCHES=256,1024; STEP_STEPS=5
fi
TORCH=()
if "$PY" -c "import torch" 2>/dev/null; then TORCH=(--torch "$PY"); fi

status=()
part() {   # part NAME TIMEOUT_S CMD...: runs CMD with its log in OUT/NAME.log, records ok / failed (rc)
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUTDIR/$name.log"
  status+=("$name=$rc:$((SECONDS - t0))")
}

part environment 60 "$PY" -c "import jax, flax, optax, orbax.checkpoint, rdkit, ml_collections, chmr_jax
print('jax', jax.__version__, 'flax', flax.__version__, 'devices', jax.devices())"
part tiny_pretrain 240 "$PY" -m chmr_jax.cli pretrain --config configs/test.py --workdir "$OUTDIR/tiny" \
  --config.train.steps=$TINY_STEPS --config.train.checkpoint_every_steps=$TINY_STEPS --config.train.progress=log
part propagation 180 "$PY" benchmarks/propagation.py --sizes $PROP_SIZES --max_seconds $PROP_SECONDS \
  --out "$OUTDIR/propagation.json"
part pretrain_step 300 "$PY" benchmarks/pretrain_step.py --synthetic --devices 1 --batch_sizes $STEP_BATCHES \
  --steps $STEP_STEPS --warmup 2 "${TORCH[@]}" --out "$OUTDIR/pretrain_step.json"
part pretrain_step_bf16_remat 240 "$PY" benchmarks/pretrain_step.py --synthetic --devices 1 --batch_sizes $STEP_BATCHES \
  --steps $STEP_STEPS --warmup 2 --dtype bfloat16 --remat --out "$OUTDIR/pretrain_step_bf16_remat.json"

"$PY" - "$OUTDIR" "$CPU" "${status[@]}" <<'EOF'
import json, platform, sys
from pathlib import Path
out, cpu, parts = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3:]
result = {"mode": "cpu dry run" if cpu else "accelerator", "machine": platform.node(), "parts": {}}
for item in parts:
    name, rest = item.split("=", 1)
    rc, seconds = rest.split(":")
    result["parts"][name] = {"ok": rc == "0", "exit": int(rc), "seconds": int(seconds)}
for name, path in (("tiny_pretrain", out / "tiny" / "summary.json"), ("propagation", out / "propagation.json"),
                   ("pretrain_step", out / "pretrain_step.json"),
                   ("pretrain_step_bf16_remat", out / "pretrain_step_bf16_remat.json")):
    if path.exists():
        res = json.loads(path.read_text())
        result["parts"].setdefault(name, {})["result"] = res
        if any("error" in row for row in res.get("rows", [])):   # a benchmark row that failed fails the part
            result["parts"][name]["ok"] = False
log = (out / "environment.log").read_text() if (out / "environment.log").exists() else ""
result["environment"] = log.strip().splitlines()[-1:] if log else []
(out / "accelerator_check.json").write_text(json.dumps(result, indent=1))
print(json.dumps({k: {"ok": v.get("ok"), "seconds": v.get("seconds")} for k, v in result["parts"].items()}))
print(f"written to {out / 'accelerator_check.json'}")
sys.exit(0 if all(v.get("ok") for v in result["parts"].values()) else 1)
EOF
