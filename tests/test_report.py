"""`chmr-jax report` on the tiny run: every PNG is written and the numbers behind them are right."""
import json

import numpy as np
import pytest

from chmr_jax import cli
from chmr_jax.downstream import report, stress


def test_report_command_writes_its_pngs(tiny_run, data_dir, cache_dir, tmp_path):
    out = tmp_path / "report"
    assert cli.main(["report", "--pretrained", str(tiny_run), "--out", str(out), "--benchmark", "bace",
                     "--cache_dir", str(cache_dir)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["files"] == ["loss_curves.png", "collapse.png", "code_usage.png", "embedding_map.png",
                            "enrichment_bace.png"]
    assert set(rep["collapse"]) == {"anchor", "fingerprint", "graph"}
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert rep["collapse"]["anchor"]["last_effective_rank"] == rows[-1]["collapse/anchor/effective_rank"]
    assert 1.0 <= rep["collapse"]["graph"]["first_effective_rank"] <= 16      # latent width of configs/test.py
    for name in rep["files"]:
        w, h = stress.read_png_size(out / name)
        assert w > 300 and h > 150, name
    assert rep["loss_terms"] == ["loss", "loss/cpr", "loss/sca", "loss/vq"]
    usage = rep["code_usage"]
    assert [len(usage[f"level_{h}"]["counts"]) for h in (1, 2, 3)] == [2, 4, 8]
    # every sampled molecule (the whole 96-molecule corpus) sits on exactly one code per level
    assert all(sum(usage[f"level_{h}"]["counts"]) == 96 for h in (1, 2, 3))
    assert set(rep["perplexity_over_training"]) == {"fingerprint", "graph", "cell", "gene", "expression"}
    assert len(rep["perplexity_over_training"]["cell"]) == 10            # one row per logged step
    assert rep["embedding_map"]["points"]["fingerprint"] == 96 and "cell" in rep["embedding_map"]["points"]
    assert rep["enrichment"]["level"] == 3 and len(rep["enrichment"]["log2_enrichment"][0]) == 8


def test_enrichment_and_perplexity_closed_forms():
    codes = np.array([[2, 4], [2, 5], [3, 6], [3, 7]])
    labels = np.array([[1.0], [1.0], [0.0], [np.nan]])
    table = report.enrichment(codes, labels, 1)
    # positives all in branch 0 (code 2): 2/2 of positives vs 2/3 of labelled -> log2(1.5); branch 1 has none
    np.testing.assert_allclose(table[0], [np.log2(1.5), np.log2(1e-3)])
    assert [c.tolist() for c in report.code_usage(codes)] == [[2, 2], [1, 1, 1, 1]]
    assert report.perplexity(np.array([5, 5])) == pytest.approx(2.0)
    assert report.perplexity(np.array([7, 0, 0])) == 1.0
