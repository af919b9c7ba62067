"""RESULTS.md's lift tables are generated from the committed JSON (issue 32 §5), and lift_noleak.py's
nesting of head seeds inside pretraining seeds against a hand computation."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_results_md_tables_equal_what_their_json_generates():
    proc = subprocess.run([sys.executable, "benchmarks/results_tables.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _results(path: Path, metric: str, chmr: dict, untrained: dict | None = None):
    runs = lambda scores: [{"seed": s, "valid": {metric: v + 0.01}, "test": {metric: v}} for s, v in scores.items()]
    methods = {"chmr": {"runs": runs(chmr)}}
    if untrained is not None:
        methods["untrained"] = {"runs": runs(untrained)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metric": metric, "methods": methods}))


def test_lift_noleak_nests_head_seeds_inside_pretraining_seeds(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import lift_noleak
    finally:
        sys.path.pop(0)
    # Two pretraining seeds x three head seeds; an MAE set, where lower is better (lift sign flipped).
    p = {0: {0: 0.50, 1: 0.52, 2: 0.54}, 1: {0: 0.40, 1: 0.41, 2: 0.45}}
    u = {0: {0: 0.60, 1: 0.60, 2: 0.63}, 1: {0: 0.55, 1: 0.50, 2: 0.52}}
    s = {0: {0: 0.58, 1: 0.57, 2: 0.56}, 1: {0: 0.47, 1: 0.49, 2: 0.52}}
    for seed in (0, 1):
        _results(tmp_path / f"cellular_s{seed}_e1" / "eval" / "biogenadme" / "results.json", "mae", p[seed], u[seed])
        _results(tmp_path / f"structure_only_s{seed}_e1" / "eval" / "biogenadme" / "results.json", "mae", s[seed])
    report = lift_noleak.collect(tmp_path, 1, [0, 1, 2], ["biogenadme", "bace"])
    assert report["pretraining_seeds"] == [0, 1] and report["head_seeds"] == [0, 1, 2]
    assert list(report["datasets"]) == ["biogenadme"]                # bace has no run: left out
    d = report["datasets"]["biogenadme"]
    assert d["higher_is_better"] is False
    seed_means = [statistics.fmean(p[k].values()) for k in (0, 1)]
    assert d["pretrained"]["per_seed"] == [list(p[k].values()) for k in (0, 1)]
    assert d["pretrained"]["mean"] == pytest.approx(statistics.fmean(seed_means))
    assert d["pretrained"]["std"] == pytest.approx(statistics.stdev(seed_means))     # ddof=1 over pretraining seeds
    lifts = [statistics.fmean(u[k][h] - p[k][h] for h in range(3)) for k in (0, 1)]   # MAE: untrained - pretrained
    assert d["lift"]["mean"] == pytest.approx(statistics.fmean(lifts)) and d["lift"]["mean"] > 0
    assert d["lift"]["std"] == pytest.approx(statistics.stdev(lifts))
    over = [statistics.fmean(s[k][h] - p[k][h] for h in range(3)) for k in (0, 1)]
    assert d["lift_over_structure"]["mean"] == pytest.approx(statistics.fmean(over))
    assert d["valid"]["lift"]["mean"] == pytest.approx(d["lift"]["mean"])          # valid = test + 0.01 on both arms
    table = lift_noleak.table(report)
    assert "| biogenadme | mae |" in table and "2 pretraining seed(s)" in table
