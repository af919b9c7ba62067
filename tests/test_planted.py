"""The planted-signal check, small version (issue 12): on a corpus whose cellular profiles are a noisy
function of hidden structural factors that also decide the downstream labels, pretraining with the
cellular modalities must beat both the untrained encoder and structure-only pretraining (same head,
splits and seeds). The full version is benchmarks/planted_signal.py (RESULTS.md)."""
from pathlib import Path

import numpy as np

from chmr_jax.data import synthetic
from chmr_jax.downstream import planted

ROOT = Path(__file__).resolve().parents[1]


def test_hidden_factors_are_a_deterministic_function_of_structure():
    smiles = synthetic.synthetic_smiles(50)
    h = planted.hidden_factors(smiles, k=4, seed=1)
    assert h.shape == (50, 4)
    np.testing.assert_allclose(h.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(h.std(0), 1, rtol=1e-4)
    np.testing.assert_array_equal(h, planted.hidden_factors(smiles, k=4, seed=1))
    assert np.abs(h - planted.hidden_factors(smiles, k=4, seed=2)).max() > 0.1


def test_cellular_pretraining_beats_untrained_and_structure_only(tmp_path):
    res = planted.run(tmp_path, synthetic.synthetic_smiles(3000), str(ROOT / "configs" / "test.py"), steps=300,
                      seeds=(0, 1, 2), pretrain_overrides={"batch.batch_size": 64, "model.latent": 32},
                      finetune_overrides={"head.hidden": 64, "optim.epochs": 60, "head.parts": "fingerprint,graph"},
                      log=lambda *a, **k: None, labelled=1500, tasks=8)
    assert res["molecules"] == 3000 and res["labelled"] == 1500
    # Same molecular encoder at initialisation in both runs: one untrained control.
    assert res["results"]["structure"]["methods"]["untrained"]["test_mean"] == res["untrained"]
    assert res["cellular"] > res["untrained"], res
    assert res["cellular"] > res["structure"], res
    assert res["lift_cellular"]["mean"] > 0
