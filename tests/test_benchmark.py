"""The benchmark table: its paper columns say where the paper has no number."""
from chmr_jax.downstream import benchmark


def _result(dataset: str, metric: str = "roc_auc") -> dict:
    run = {"runs": [{"seed": 0}, {"seed": 1}], "test_mean": 0.7, "test_std": 0.01}
    return {"dataset": dataset, "metric": metric, "methods": {"chmr": run}, **run}


def test_paper_columns_without_a_number_have_a_footnote():
    table = benchmark.benchmark_table([_result("chembl2k"), _result("bace"), _result("sider")])
    rows = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert rows["| bace"].endswith("| - | - | - | - |") and "84.7 +- 0.2" in rows["| chembl2k"]
    notes = [line for line in table.splitlines() if line.startswith("paper columns:")]
    assert len(notes) == 1 and "(bace, sider)" in notes[0] and "no number" in notes[0]
    # Every dataset the paper reports: no '-' in its columns, no footnote.
    assert "paper columns:" not in benchmark.benchmark_table([_result("chembl2k"), _result("biogenadme", "mae")])
