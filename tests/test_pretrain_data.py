"""The pretraining input pipeline: imputation modes, SCA masks, context graph, fixed-shape batches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_corpus, tiny_data_config, tiny_model

from chmr_jax.mechanisms import objective
from chmr_jax.training import pretrain_data as PD


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
        # VICReg's two views differ: observed rows as measured, the column mean elsewhere vs propagated.
        m = corpus.modalities["cell"]
        obs = m.available[idx]
        view1 = batch["view1"]["cell"][real]
        np.testing.assert_array_equal(view1[obs], m.values[idx][obs])
        np.testing.assert_allclose(view1[~obs], np.broadcast_to(m.values[m.available].mean(0), view1[~obs].shape),
                                   rtol=1e-6)
        # The second view: propagated on unmeasured rows, the held-out estimate on measured ones.
        np.testing.assert_array_equal(batch["aug"]["cell"][real][~obs], data.aug["cell"][idx][~obs])
        held = data.held_out["cell"][np.searchsorted(np.flatnonzero(m.available), idx[obs])]
        np.testing.assert_array_equal(batch["aug"]["cell"][real][obs], held)
        assert (batch["view1"]["cell"][~real] == 0).all() and (batch["aug"]["cell"][~real] == 0).all()
    assert len(shapes) == 1 and seen == order.tolist()
    # The context graph: one node per molecule, one per observed profile, then the expression
    # modality's genes (its columns).
    n_profiles = sum(int(m.available.sum()) for m in corpus.modalities.values())
    n_genes = corpus.modalities["expression"].dim
    assert data.context.n_nodes == len(corpus) + n_profiles + n_genes


@pytest.mark.parametrize("sca_mask", PD.SCA_MASKS)
def test_vicreg_views_differ_on_every_row_vicreg_uses(corpus, sca_mask):
    """Propagation is clamped to the measurement on measured rows, so the propagated copy there equals
    the first view: with it as the second view, VICReg's invariance was identically 0 under
    sca_mask='observed' (issue 21). Every row VICReg uses must have two different views."""
    data = PD.prepare(corpus, small_cfg(sca_mask=sca_mask))
    used = 0
    for batch in PD.batches(data, np.arange(len(data))):
        for name in data.aug:
            rows = batch["vicreg_mask"][name] & batch["graph"].graph_mask
            assert not (rows & ~batch["mask"][name]).any()          # a subset of the SCA rows
            differ = (batch["view1"][name] != batch["aug"][name]).any(axis=1)
            assert differ[rows].all(), (name, sca_mask, np.flatnonzero(rows & ~differ))
            used += int(rows.sum())
    assert used > 0
    # The old second view (the clamped copy) is still there to reproduce earlier runs: it equals the
    # first view on every measured row.
    old = PD.prepare(corpus, small_cfg(sca_mask=sca_mask, vicreg_second_view="propagated"))
    batch = next(PD.batches(old, np.arange(len(old))))
    obs = batch["graph"].graph_mask & corpus.modalities["cell"].available[batch["node"]]
    assert obs.any() and (batch["view1"]["cell"][obs] == batch["aug"]["cell"][obs]).all()
    with pytest.raises(ValueError, match="vicreg_first_view='main' with imputation='propagate'"):
        PD.prepare(corpus, small_cfg(vicreg_first_view="main"))


def test_held_out_view_of_a_measured_row_ignores_its_own_measurement(corpus):
    """The second view of a measured row is propagation's estimate from the *other* measured rows:
    changing the row's measurement leaves it unchanged (while the clamped copy follows it), and with
    one fold per measured row it is exactly propagation run with that row unmeasured (leave-one-out)."""
    m = corpus.modalities["cell"]
    knn = PD.propagation.tanimoto_knn(corpus.features.morgan, k=5, n_bits=corpus.features.settings.morgan_size)
    graph = PD.propagation.build_graph(*knn)
    obs = np.flatnonzero(m.available)
    values = m.values.astype(np.float32)
    held = PD.held_out_propagation(graph, values, m.available, steps=5, folds=len(obs))
    moved = values.copy()
    moved[obs[0]] += 10.0
    held_moved = PD.held_out_propagation(graph, moved, m.available, steps=5, folds=len(obs))
    np.testing.assert_array_equal(held_moved[0], held[0])
    assert np.abs(held_moved[1:] - held[1:]).max() > 0      # the row still informs the others' estimates
    for i in (0, len(obs) // 2, len(obs) - 1):
        keep = m.available.copy()
        keep[obs[i]] = False
        direct = np.asarray(PD.propagation.propagate(graph, values, keep, steps=5).x)[obs[i]]
        np.testing.assert_array_equal(held[i], direct)
    assert not np.allclose(held, values[obs])


@pytest.mark.parametrize("hosts", [2, 3, 4])
def test_per_host_rows_concatenate_to_the_whole_batch(corpus, hosts):
    # Each host of a multi-process run packs only its devices' rows (graphs.Rows); the pieces, in host
    # order, must be the whole batch exactly, including molecules whose nodes or edges a cut splits.
    data = PD.prepare(corpus, small_cfg(graph_multiple=4))
    b = data.budget
    cut = lambda n, k: (n * k // hosts, n * (k + 1) // hosts)
    for group in PD.graphs.partition(corpus.features, np.random.default_rng(1).permutation(len(data)), b)[:3]:
        whole = PD.batch_of(data, group)
        parts = [PD.batch_of(data, group, PD.graphs.Rows(cut(b.n_node, k), cut(b.n_edge, k), cut(b.n_graph, k)))
                 for k in range(hosts)]
        joined = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *parts)
        jax.tree_util.tree_map(np.testing.assert_array_equal, joined, whole)
        # A host whose rows hold no molecule still returns its (padding) rows.
        tail = PD.batch_of(data, group, PD.graphs.Rows((b.n_node - 1, b.n_node), (b.n_edge, b.n_edge),
                                                       (b.n_graph - 1, b.n_graph)))
        assert tail["graph"].node_graph.tolist() == [b.n_graph - 1] and tail["graph"].senders.shape == (0,)


def test_gene_nodes_from_the_top_percent_of_expression(corpus):
    """Molecule-gene edges through the pipeline: each observed expression signature links to its top
    1% of genes by |z| (here 10 columns: round(0.1) -> at least 1, the largest |z| of the row), weight
    |z| / the row's largest |z| (so exactly 1 for that gene); unobserved molecules link to no gene."""
    m = corpus.modalities["expression"]
    obs = np.flatnonzero(m.available)
    z = np.abs(m.values.astype(np.float64))
    expected = {(int(r), int(np.argmax(z[r]))): 1.0 for r in obs}
    data = PD.prepare(corpus, small_cfg())
    ctx = data.context
    gene_type = ctx.type_names.index("gene_node")
    first_gene = int(np.flatnonzero(ctx.node_type == gene_type)[0])
    got = {}
    for mol in range(len(corpus)):
        nbr, w = ctx.neighbours(mol)
        for v, wt in zip(nbr, w):
            if ctx.node_type[v] == gene_type:
                got[(mol, int(v) - first_gene)] = float(wt)
    assert got.keys() == expected.keys() and len(got) == len(obs) > 0
    np.testing.assert_allclose([got[k] for k in expected], 1.0, rtol=1e-6)
    # No gene nodes when asked for none.
    assert "gene_node" not in PD.prepare(corpus, small_cfg(gene_modality="")).context.type_names


def test_gene_network_file(corpus, tmp_path):
    genes = [str(g) for g in corpus.modalities["expression"].feature_names]
    sif = tmp_path / "hetionet-v1.0-edges.sif"
    sif.write_text("source\tmetaedge\ttarget\n"
                   f"Gene::{genes[0]}\tGiG\tGene::{genes[1]}\n"
                   f"Compound::DB00001\tCbG\tGene::{genes[2]}\n"      # not gene-gene: ignored
                   "Gene::99999999\tGcG\tGene::88888888\n")           # genes outside L1000: new nodes
    data = PD.prepare(corpus, small_cfg(gene_network=str(sif)))
    ctx = data.context
    gene_type = ctx.type_names.index("gene_node")
    gene_nodes = np.flatnonzero(ctx.node_type == gene_type)
    assert len(gene_nodes) == len(genes) + 2
    first = int(gene_nodes[0])
    nbr, w = ctx.neighbours(first)
    assert first + 1 in nbr.tolist() and w[nbr.tolist().index(first + 1)] == 1.0
    nbr, _ = ctx.neighbours(first + len(genes))
    assert nbr.tolist() == [first + len(genes) + 1]


def test_objective_runs_on_pipeline_batches(corpus):
    data = PD.prepare(corpus, small_cfg())
    ctx = objective.context_arrays(data.context)
    model = tiny_model(data)
    batch = jax.tree_util.tree_map(jnp.asarray, next(PD.batches(data, np.arange(len(data)))))
    total, metrics = objective.objective(model, batch, ctx, jax.random.key(0), objective.ObjectiveConfig(infonce_block=8))
    assert np.isfinite(float(total)) and float(metrics["sca/cell/rows"]) > 0


def test_prepare_computes_knn_and_propagation_sharded_over_every_device(corpus, monkeypatch):
    """With 8 devices the pipeline's kNN and every propagation (main and held-out folds) run on all 8:
    each device result fetched to the host is a global array over the 8 devices, row-sharded (kNN
    lists, propagated columns, reached) or replicated (the energy, a psum). The inputs equal those of the
    1-device mesh: the kNN exactly (the same context graph and propagation graph), the propagated values
    within the float32 bound of tests/test_propagation_sharded.py."""
    assert jax.device_count() == 8
    fetched, knn_meshes = [], []
    fetch, knn = PD.propagation._fetch, PD.propagation.tanimoto_knn
    monkeypatch.setattr(PD.propagation, "_fetch", lambda x: (fetched.append(x.sharding), fetch(x))[1])
    monkeypatch.setattr(PD.propagation, "tanimoto_knn",
                        lambda *a, **kw: (knn_meshes.append(kw["mesh"]), knn(*a, **kw))[1])
    cfg = small_cfg()
    data = PD.prepare(corpus, cfg)
    monkeypatch.undo()
    assert [m.size for m in knn_meshes] == [8]
    assert fetched and all(len(s.device_set) == 8 for s in fetched)
    # kNN: indices and similarities; per modality 1 + holdout_folds propagations of one column chunk,
    # each fetching x and reached (row-sharded) and the energy (replicated).
    runs = sum(1 + min(cfg.holdout_folds, int(m.available.sum())) for m in corpus.modalities.values())
    assert sum(not s.is_fully_replicated for s in fetched) == 2 + 2 * runs
    assert sum(s.is_fully_replicated for s in fetched) == runs

    single = PD.prepare(corpus, cfg, mesh=PD.propagation.local_mesh())
    np.testing.assert_array_equal(data.context.indices, single.context.indices)
    graph = PD.propagation.build_graph(*knn(corpus.features.morgan, k=cfg.knn_k,
                                            n_bits=corpus.features.settings.morgan_size))
    k_max = int(np.max(np.diff(np.asarray(graph.indptr))))
    eps = np.finfo(np.float32).eps
    for name, m in corpus.modalities.items():
        atol = 2 * max(cfg.propagation_steps * (k_max + 1), int(m.available.sum())) * eps * np.abs(m.values).max()
        np.testing.assert_allclose(data.aug[name], single.aug[name], rtol=0, atol=atol)
        np.testing.assert_allclose(data.held_out[name], single.held_out[name], rtol=0, atol=atol)
        np.testing.assert_array_equal(data.reached[name], single.reached[name])
