"""The full pretraining objective on a tiny generated corpus: finite, differentiable, and it decreases."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import tiny_corpus, tiny_data_config, tiny_model

from chmr_jax.mechanisms import objective
from chmr_jax.training import pretrain_data as PD


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    corpus = tiny_corpus(tmp_path_factory.mktemp("raw"), n_molecules=48, seed=0, observed={"CP-Bray": 0.5, "GE": 0.3})
    data = PD.prepare(corpus, tiny_data_config())
    batch = jax.tree_util.tree_map(jnp.asarray, next(PD.batches(data, np.arange(16))))
    return tiny_model(data), batch, objective.context_arrays(data.context)


def test_objective_is_finite_and_reports_every_term(setup):
    model, batch, ctx = setup
    cfg = objective.ObjectiveConfig(infonce_block=8)
    total, metrics = objective.objective(model, batch, ctx, jax.random.key(0), cfg)
    assert np.isfinite(float(total))
    for key in ("loss/cpr", "loss/sca", "loss/vq", "sca/cell/infonce", "sca/expression/vicreg",
                "vq/graph/perplexity", "cpr/molecule", "cpr/cell"):
        assert key in metrics and np.all(np.isfinite(np.asarray(metrics[key])))
    expected = metrics["loss/cpr"] + 10.0 * metrics["loss/sca"] + 1.0 * metrics["loss/vq"]
    np.testing.assert_allclose(total, expected, rtol=1e-5)


def test_a_few_steps_reduce_the_loss(setup):
    model, batch, ctx = setup
    cfg = objective.ObjectiveConfig(infonce_block=8)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(3e-3)
    opt = tx.init(params)
    key = jax.random.key(1)

    @jax.jit
    def step(params, rest, opt):
        def f(p, r):
            m = nnx.merge(graphdef, p, r, copy=True)  # fresh Variables at this trace level (flax#5050)
            loss, _ = objective.objective(m, batch, ctx, key, cfg)
            return loss, nnx.state(m, nnx.Not(nnx.Param))
        (loss, rest_new), grads = jax.value_and_grad(f, has_aux=True)(params, rest)
        updates, opt_new = tx.update(grads, opt, params)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(grads)]))
        return optax.apply_updates(params, updates), rest_new, opt_new, loss, finite

    losses = []
    for _ in range(15):
        params, rest, opt, loss, finite = step(params, rest, opt)
        assert bool(finite) and np.isfinite(float(loss))
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def _eval_terms(model, batch, ctx, **kw):
    model.eval()          # no dropout: the comparison below is deterministic
    try:
        _, metrics = objective.objective(model, batch, ctx, jax.random.key(0),
                                         objective.ObjectiveConfig(infonce_block=8, **kw))
    finally:
        model.train()
    return metrics


def test_cellular_targets_are_decoded_from_the_modality_projection(setup):
    """cpr_source='modality' (the release): the cell node type's target comes from p_cell, so changing
    the cell input changes cpr/cell; the molecule target always comes from the anchor."""
    model, batch, ctx = setup
    # (A constant shift would be invisible: the projector starts with a LayerNorm.)
    noise = jax.random.normal(jax.random.key(3), batch["inputs"]["cell"].shape)
    changed = dict(batch, inputs={**batch["inputs"], "cell": batch["inputs"]["cell"] + noise})
    for source, cell_moves in (("modality", True), ("anchor", False)):
        a = _eval_terms(model, batch, ctx, cpr_source=source)
        b = _eval_terms(model, changed, ctx, cpr_source=source)
        assert float(a["cpr/molecule"]) == float(b["cpr/molecule"])
        assert (float(a["cpr/cell"]) != float(b["cpr/cell"])) == cell_moves, source
    with pytest.raises(ValueError, match="cpr_source"):
        objective.ObjectiveConfig(cpr_source="graph")


def test_vicreg_views_differ_and_zero_weights_skip_terms(setup):
    model, batch, ctx = setup
    m = _eval_terms(model, batch, ctx)
    # The first view is observed-or-mean, the second propagated: the invariance term is not 0.
    assert float(m["sca/cell/invariance"]) > 0
    same = dict(batch, view1=batch["aug"])
    assert float(_eval_terms(model, same, ctx)["sca/cell/invariance"]) == 0.0
    off = _eval_terms(model, batch, ctx, lambda_sca=0.0, lambda_cpr=0.0, lambda_vq=0.0)
    assert float(off["loss"]) == 0.0 and "sca/cell/infonce" not in off and "cpr/molecule" not in off
    assert float(off["collapse/anchor/effective_rank"]) > 1


def test_context_tables_are_padded_to_tpu_lanes_and_masked(tmp_path):
    """The targets / masks on the device have a multiple of 128 columns (TPU's default layout would
    otherwise store them column-major and copy them whole every step); the padding is never a target,
    and the real columns are the context graph's."""
    corpus = tiny_corpus(tmp_path, n_molecules=24, seed=1, observed={"CP-Bray": 0.5, "GE": 0.3})
    graph = PD.prepare(corpus, tiny_data_config()).context
    ctx = objective.context_arrays(graph)
    assert set(ctx["targets"]) == set(graph.targets)
    for name, host in graph.targets.items():
        table, mask = np.asarray(ctx["targets"][name]), np.asarray(ctx["target_mask"][name])
        d = host.shape[1]
        assert table.shape[1] % 128 == 0 and table.shape[1] - d < 128 and mask.shape == table.shape
        np.testing.assert_array_equal(table[:len(host), :d], host)
        np.testing.assert_array_equal(mask[:len(host), :d], graph.target_mask[name])
        assert not mask[:, d:].any() and not table[:, d:].any()


def test_collapse_stats_every_kth_step_only(setup):
    """collapse_every=3: the statistics are computed on steps whose count after the update is a multiple
    of 3 (then equal to the every-step values) and are NaN on the others; the loss is unaffected."""
    model, batch, ctx = setup
    model.eval()          # no dropout: the calls below see the same function
    try:
        every = objective.ObjectiveConfig(infonce_block=8, collapse_every=3)
        always = objective.ObjectiveConfig(infonce_block=8)
        key = jax.random.key(0)
        ref_loss, ref = objective.objective(model, batch, ctx, key, always)
        names = [k for k in ref if k.startswith("collapse/")]
        assert names
        for step, computed in ((0, False), (1, False), (2, True), (5, True)):
            loss, m = jax.jit(lambda s: objective.objective(model, batch, ctx, key, every, step=s))(jnp.int32(step))
            np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
            for k in names:
                if computed:
                    np.testing.assert_allclose(m[k], ref[k], rtol=1e-5)
                else:
                    assert np.isnan(m[k]), (step, k)
    finally:
        model.train()
