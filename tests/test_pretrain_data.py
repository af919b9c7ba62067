"""The pretraining input pipeline: imputation modes, SCA masks, context graph, fixed-shape batches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_corpus, tiny_data_config, tiny_model

from chmr_jax import objective, pretrain_data as PD


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("raw"), n_molecules=60, seed=3, observed={"CP-Bray": 0.4, "GE": 0.1})


def small_cfg(**kw):
    return tiny_data_config(**kw)


@pytest.mark.parametrize("imputation", PD.IMPUTATIONS)
def test_imputation_modes(corpus, imputation):
    data = PD.prepare(corpus, small_cfg(imputation=imputation))
    for name, m in corpus.modalities.items():
        x, obs = data.inputs[name], m.available
        np.testing.assert_array_equal(x[obs], m.values[obs])           # measurements are never changed
        np.testing.assert_array_equal(data.aug[name][obs], m.values[obs])
        if imputation == "zero":
            assert (x[~obs] == 0).all()
        elif imputation == "mean":
            np.testing.assert_allclose(x[~obs], np.broadcast_to(m.values[obs].mean(0), x[~obs].shape), rtol=1e-5)
        else:
            np.testing.assert_array_equal(x, data.aug[name])
        assert (np.diff(data.energy[name]) <= 1e-4 * max(data.energy[name][0], 1)).all()


def test_sca_masks(corpus):
    default = PD.prepare(corpus, small_cfg())
    release = PD.prepare(corpus, small_cfg(sca_mask="all"))
    for name, m in corpus.modalities.items():
        np.testing.assert_array_equal(default.sca_mask[name], default.reached[name])
        assert default.sca_mask[name][m.available].all()
        assert release.sca_mask[name].all()
    with pytest.raises(ValueError, match="imputation"):
        PD.prepare(corpus, small_cfg(imputation="knn"))


def test_batches_fixed_shapes_and_rows(corpus):
    data = PD.prepare(corpus, small_cfg())
    order = np.random.default_rng(0).permutation(len(data))
    seen, shapes = [], set()
    for batch in PD.batches(data, order):
        shapes.add(tuple(x.shape for x in jax.tree_util.tree_leaves(batch)))
        real = batch["graph"].graph_mask
        idx = batch["graph"].index[real]
        seen += idx.tolist()
        np.testing.assert_array_equal(batch["inputs"]["fingerprint"][real], data.inputs["fingerprint"][idx])
        np.testing.assert_array_equal(batch["mask"]["cell"][real], data.sca_mask["cell"][idx])
        assert (batch["inputs"]["cell"][~real] == 0).all() and not batch["mask"]["cell"][~real].any()
        np.testing.assert_array_equal(batch["node"][real], idx)
    assert len(shapes) == 1 and seen == order.tolist()
    # The context graph: one node per molecule, then one per observed profile.
    n_profiles = sum(int(m.available.sum()) for m in corpus.modalities.values())
    assert data.context.n_nodes == len(corpus) + n_profiles


def test_objective_runs_on_pipeline_batches(corpus):
    data = PD.prepare(corpus, small_cfg())
    ctx = objective.context_arrays(data.context)
    model = tiny_model(data)
    batch = jax.tree_util.tree_map(jnp.asarray, next(PD.batches(data, np.arange(len(data)))))
    total, metrics = objective.objective(model, batch, ctx, jax.random.key(0), objective.ObjectiveConfig(infonce_block=8))
    assert np.isfinite(float(total)) and float(metrics["sca/cell/rows"]) > 0
