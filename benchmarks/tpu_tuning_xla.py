"""Issue 22 §4's tuning rows re-judged with this checkout's cost walk (issue 34): XLA:TPU's own estimate
(`step_s_xla`), the HBM-only and all-memory rooflines and the compiler's peak per chip, for the paper step
(`configs/paper.py:tpu_pod`) compiled for v5e-8 at global batch 3072 by each row's own commit.

Each row's program is compiled by THAT commit's code (a `git worktree` of it), one compile at a time:

    cd <worktree of COMMIT> && CHMR_CACHE_DIR=<dir>/cache WRAP_OUT=<dir>/COMMIT PYTHONPATH=$PWD \\
        python <this checkout>/benchmarks/tpu_compile_recorded.py compile --config configs/paper.py:tpu_pod --topology v5e-8 \\
        --hlo_dump <dir>/COMMIT.hlo --out <dir>/COMMIT.row.json [--config.objective.collapse_stats=False]

where tpu_compile_recorded.py is `chmr-jax` with `jax.stages.Compiled.memory_analysis` wrapped to also write
the compiler's own serialized proto (<dir>/COMMIT.direct.pb) and its memory analysis with the peak
(<dir>/COMMIT.mem.json) — commits before issue 34 write neither. CHMR_CACHE_DIR holds only the reachable
corpus (as `corpus-reachable-<hash>` for the old commits' glob and `corpus-reachable` for this checkout's
lookup), so every row takes its molecule sizes from the same molecules. The HLO text of each dump is also
turned into a proto (benchmarks/hlo_text_proto.py) and walked: both walks are in the row (they should agree).

    python benchmarks/tpu_tuning_xla.py --dir runs/tpu [--out benchmarks/tpu_tuning_xla.json]

Every figure is an ESTIMATE from a deviceless compile; nothing ran on a TPU."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

ROWS = [
    ("713beb9", "before", ""),
    ("fca106e", "context target tables padded to 128 columns", ""),
    ("2664e03", "device-local graph blocks", ""),
    ("55f811a", "collapse diagnostics every 10th step (compiled without them: the steps in between)",
     "--config.objective.collapse_stats=False"),
    ("HEAD", "reference: this checkout (its chmr_jax and configs are main ff39bb8; collapse diagnostics in their "
             "conditional, amortised over k steps)", ""),
]


def walk(serialized: bytes, chips: int, k: int) -> dict:
    """The cost walk of one program, the step's conditional amortised over k steps (as aot/compile.py)."""
    from chmr_jax.training.aot import cost as cost_lib
    heavy = cost_lib.program_cost(serialized, chips, "max")
    light = cost_lib.program_cost(serialized, chips, "min")
    out = {f: light[f] + (heavy[f] - light[f]) / max(k, 1) for f in ("bytes", "hbm_bytes", "cycles", "ici_bytes")}
    out["heavy_branch_cycles"] = heavy["cycles"]
    out["unknown_trip_loops"] = [f"{lp['source']} ({lp['unknown']})" for lp in heavy["unknown_trip_loops"]]
    out["uncosted_executions"] = heavy["uncosted_executions"]
    return out


def row(d: Path, commit: str, change: str, extra: str, chips: int = 8) -> dict:
    from chmr_jax.training import aot
    import hlo_text_proto
    chip = aot.CHIPS["v5e"]
    out = {"commit": commit, "change": change}
    log = d / f"{commit}.log"
    rj = d / f"{commit}.row.json"
    if not rj.exists():
        tail = log.read_text().strip().splitlines()[-3:] if log.exists() else ["no log"]
        return {**out, "error": "no row: the compile failed, was not run or had not finished; its log ends: "
                                + " | ".join(tail)[-400:]}
    r = json.loads(rj.read_text())
    k = int(r.get("conditional_amortised_over_steps") or 1)
    first = next((ln for ln in log.read_text().splitlines() if ln.startswith("shapes from:")), "")
    budget = r.get("budget") or {}
    out["shapes"] = {"shapes_from": first[len("shapes from: "):], "global_batch": r.get("global_batch"),
                     "per_chip_batch": (r.get("global_batch") or 0) / chips,
                     "padded_nodes_per_global_batch": budget.get("n_node"),
                     "padded_edges_per_global_batch": budget.get("n_edge"),
                     "graph_slots_per_global_batch": budget.get("n_graph"), "budget": budget}
    direct = d / f"{commit}.direct.pb"
    text = d / f"{commit}.hlo"
    walks = {}
    if direct.exists():
        walks["compiler_proto"] = walk(direct.read_bytes(), chips, k)
    if text.exists():
        proto = hlo_text_proto.text_to_proto(text.read_text())
        walks["text_to_proto"] = walk(proto, chips, k)
    w = walks.get("compiler_proto") or walks["text_to_proto"]
    flops = float(r.get("flops_per_chip") or 0.0)
    compute_s = flops / chip.peak_flops
    mem = json.loads((d / f"{commit}.mem.json").read_text()) if (d / f"{commit}.mem.json").exists() else {}
    peak = mem.get("peak_memory_in_bytes") or r.get("peak_bytes_per_chip")
    out.update({
        "step_s_xla": w["cycles"] / chip.clock_hz,
        "step_s_hbm_roofline": max(compute_s, w["hbm_bytes"] / chip.hbm_bytes_per_s),
        "step_s_all_memory_roofline": max(compute_s, w["bytes"] / chip.hbm_bytes_per_s),
        "peak_bytes_per_chip": peak, "peak_gib_per_chip": peak / 2 ** 30 if peak else None,
        "peak_source": "compiler memory_analysis().peak_memory_in_bytes" if peak else None,
        "hbm_bytes_per_chip": w["hbm_bytes"], "all_memory_bytes_per_chip": w["bytes"],
        "ici_bytes_per_chip": w["ici_bytes"], "estimated_cycles": w["cycles"], "clock_hz": chip.clock_hz,
        "flops_per_chip": flops, "compute_s": compute_s,
        "flops_source": "that commit's row (its own FLOP count: " +
                        ("utilisation.program_flops)" if commit == "HEAD" else "the old walker's trip-counted dots)"),
        "conditional_amortised_over_steps": k,
        "unreadable_loops": len(w["unknown_trip_loops"]), "unreadable_loops_where": w["unknown_trip_loops"],
        "uncosted_executions": w["uncosted_executions"],
        "walks": {name: {f: v[f] for f in ("cycles", "hbm_bytes", "bytes", "ici_bytes")} for name, v in walks.items()},
        "old_row_figures": {f: r.get(f) for f in ("estimated_step_s", "bytes_accessed_per_chip", "per_chip_bytes",
                                                   "step_s_xla", "compile_s") if f in r},
        "command": (f"git worktree add --detach WT {commit} && cd WT && " if commit != "HEAD" else "") +
                   f"CHMR_CACHE_DIR={d}/cache WRAP_OUT={d}/{commit} PYTHONPATH=$PWD nice -n 5 python "
                   f"{HERE}/tpu_compile_recorded.py compile --config configs/paper.py:tpu_pod --topology v5e-8 "
                   f"--hlo_dump {d}/{commit}.hlo --out {d}/{commit}.row.json {extra}".strip(),
    })
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=str(ROOT / "runs/tpu"))
    parser.add_argument("--out", default=str(HERE / "tpu_tuning_xla.json"))
    args = parser.parse_args(argv)
    import jax
    jax.config.update("jax_platforms", "cpu")
    rows = [row(Path(args.dir).resolve(), c, ch, ex) for c, ch, ex in ROWS]
    prev = None
    for r in rows:          # each tuning row against the one before it (the reference row against 'before')
        base = rows[0] if r["commit"] == "HEAD" else prev
        if "step_s_xla" in r and base is not None and "step_s_xla" in base:
            r["step_s_xla_vs"] = {"commit": base["commit"], "ratio": r["step_s_xla"] / base["step_s_xla"]}
        if r["commit"] != "HEAD":
            prev = r
    Path(args.out).write_text(json.dumps({"note": "estimates from deviceless compiles for v5e-8 at global batch 3072; "
                                                  "nothing ran on a TPU", "rows": rows}, indent=1, default=str))
    ms = lambda x: f"{x * 1e3:.2f}"
    print("commit | change | step ms (XLA) | HBM..all-memory roofline ms | peak GiB/chip | padded nodes | unreadable loops")
    for r in rows:
        if "error" in r:
            print(f"{r['commit']} | error: {r['error'][:200]}")
            continue
        print(f"{r['commit']} | {r['change'][:40]} | {ms(r['step_s_xla'])} | {ms(r['step_s_hbm_roofline'])}.."
              f"{ms(r['step_s_all_memory_roofline'])} | "
              f"{r['peak_gib_per_chip']:.2f} | {r['shapes']['padded_nodes_per_global_batch']} | {r['unreadable_loops']}"
              if r.get("peak_gib_per_chip") else f"{r['commit']} | {ms(r['step_s_xla'])} | no peak")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
