"""Import of release checkpoints: a state_dict with the release's exact key names and shapes (written
in torch's zip format by a minimal writer below, no torch needed) converts, and chmr_jax's forward
(projections, anchor, Tree-VQ codes) equals a numpy re-implementation of the release's forward
(OGB GNN_node_Virtualnode in eval mode, sum pooling, modal_projectors, tree descent) on the same weights.

Release keys and shapes (D = GNN width, L = latent, depth levels):
  graph_encoder.atom_encoder.atom_embedding_list.{0..8}.weight [vocab_i, D]   vocab 119,5,12,12,10,6,6,2,2
  graph_encoder.bond_encoder.bond_embedding_list.{0..2}.weight [vocab_i, D]   vocab 5,6,2 (unused)
  graph_encoder.virtualnode_embedding.weight [1, D]
  graph_encoder.convs.{l}.eps [1]; .mlp.0.weight [2D, D], .mlp.0.bias [2D]; .mlp.1.{weight,bias,
      running_mean,running_var} [2D], .mlp.1.num_batches_tracked []; .mlp.3.weight [D, 2D], .mlp.3.bias [D]
  graph_encoder.convs.{l}.bond_encoder.bond_embedding_list.{0..2}.weight [vocab_i, D]
  graph_encoder.batch_norms.{l}.{weight,bias,running_mean,running_var} [D], .num_batches_tracked []
  graph_encoder.mlp_virtualnode_list.{l}.0 Linear(D, 2D), .1 BatchNorm(2D), .3 Linear(2D, D), .4 BatchNorm(D)
  modal_projectors.{k}.0.{weight,bias} [d_k]; .1.weight [L, d_k], .1.bias [L]
      d = [1D fingerprint (morgan + 167), 2D graph (D), 3D, gene, cell, expression]
  modal_decoders.{j}.net.0.{weight,bias} [L]; .net.1.weight [4L, L]; .net.4.weight [d_j, 4L]
      d_j = [molecule target, gene, cell, expression]
  hierarchical_vq.tree_node_embedding_network.{i}.weight [2^(i+1), L]
"""
import json
import pickle
import sys
import types
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

import chmr_jax
from chmr_jax import cli
from chmr_jax.data import featurize
from chmr_jax.downstream import convert
from chmr_jax.training import pretrain

D, LAT, DEPTH, LAYERS, MORGAN = 32, 16, 3, 2, 256
ATOM, BOND = (119, 5, 12, 12, 10, 6, 6, 2, 2), (5, 6, 2)
PROJ_IN = [MORGAN + 167, D, 24, 10, 12, 9]
DEC_OUT = [64, 10, 12, 9]


def release_state_dict(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *shape, scale=0.3: (scale * rng.normal(size=shape)).astype(np.float32)
    sd = OrderedDict()

    def bn(key, n):
        sd[f"{key}.weight"] = 1 + f(n, scale=0.1)
        sd[f"{key}.bias"] = f(n, scale=0.1)
        sd[f"{key}.running_mean"] = f(n, scale=0.5)
        sd[f"{key}.running_var"] = (0.5 + rng.random(n)).astype(np.float32)
        sd[f"{key}.num_batches_tracked"] = np.array(1234, np.int64)

    def linear(key, n_in, n_out):
        sd[f"{key}.weight"] = f(n_out, n_in, scale=1 / np.sqrt(n_in))
        sd[f"{key}.bias"] = f(n_out, scale=0.1)

    g = "graph_encoder"
    for i, v in enumerate(ATOM):
        sd[f"{g}.atom_encoder.atom_embedding_list.{i}.weight"] = f(v, D)
    for i, v in enumerate(BOND):
        sd[f"{g}.bond_encoder.bond_embedding_list.{i}.weight"] = f(v, D)
    sd[f"{g}.virtualnode_embedding.weight"] = f(1, D, scale=0.2)
    for l in range(LAYERS):
        c = f"{g}.convs.{l}"
        sd[f"{c}.eps"] = f(1, scale=0.1)
        linear(f"{c}.mlp.0", D, 2 * D)
        bn(f"{c}.mlp.1", 2 * D)
        linear(f"{c}.mlp.3", 2 * D, D)
        for i, v in enumerate(BOND):
            sd[f"{c}.bond_encoder.bond_embedding_list.{i}.weight"] = f(v, D)
        bn(f"{g}.batch_norms.{l}", D)
    for l in range(LAYERS - 1):
        v = f"{g}.mlp_virtualnode_list.{l}"
        linear(f"{v}.0", D, 2 * D)
        bn(f"{v}.1", 2 * D)
        linear(f"{v}.3", 2 * D, D)
        bn(f"{v}.4", D)
    for k, d in enumerate(PROJ_IN):
        sd[f"modal_projectors.{k}.0.weight"] = 1 + f(d, scale=0.1)
        sd[f"modal_projectors.{k}.0.bias"] = f(d, scale=0.1)
        linear(f"modal_projectors.{k}.1", d, LAT)
    for j, d in enumerate(DEC_OUT):
        sd[f"modal_decoders.{j}.net.0.weight"] = 1 + f(LAT, scale=0.1)
        sd[f"modal_decoders.{j}.net.0.bias"] = f(LAT, scale=0.1)
        linear(f"modal_decoders.{j}.net.1", LAT, 4 * LAT)
        linear(f"modal_decoders.{j}.net.4", 4 * LAT, d)
    for i in range(DEPTH):
        sd[f"hierarchical_vq.tree_node_embedding_network.{i}.weight"] = f(2 ** (i + 1), LAT, scale=1.0)
    return sd


# ---- a minimal writer of torch's zip format (torch.save since 1.6) without torch ------------------------

def _fake_torch():
    """Modules named like torch's so pickle records the same globals torch.save records."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only for pickling")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    storages = {}
    for name in ("FloatStorage", "LongStorage"):
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch, name, cls)
        storages[name] = cls
    return torch, utils, storages


def write_torch_zip(path, sd, transpose_first=False):
    torch, utils, storages = _fake_torch()
    blobs = {}

    class Tensor:
        def __init__(self, arr, key):
            self.arr, self.key = arr, key

        def __reduce__(self):
            arr = self.arr
            size, stride = list(arr.shape), [s // arr.itemsize for s in arr.strides]
            return utils._rebuild_tensor_v2, (Storage(self.key, arr), 0, tuple(size), tuple(stride), False,
                                              OrderedDict())

    class Storage:
        def __init__(self, key, arr):
            self.key, self.arr = key, arr

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                kind = storages["LongStorage" if obj.arr.dtype == np.int64 else "FloatStorage"]
                return ("storage", kind, obj.key, "cpu", obj.arr.size)
            return None

    obj = OrderedDict()
    for i, (k, v) in enumerate(sd.items()):
        arr = np.asarray(v)
        if transpose_first and i == 0:
            # a non-contiguous tensor: storage holds the transpose, strides describe the view
            base = np.ascontiguousarray(arr.T)
            blobs[str(i)] = base.tobytes()
            arr = base.T
        else:
            arr = arr.copy(order="C")   # (ascontiguousarray would make a 0-d tensor 1-d)
            blobs[str(i)] = arr.tobytes()
        obj[k] = Tensor(arr, str(i))
    saved = {m: sys.modules.get(m) for m in ("torch", "torch._utils")}
    sys.modules["torch"], sys.modules["torch._utils"] = torch, utils
    try:
        import io
        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(obj)
    finally:
        for m, old in saved.items():
            if old is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = old
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("release/data.pkl", buf.getvalue())
        zf.writestr("release/byteorder", "little")
        zf.writestr("release/version", "3\n")
        for key, blob in blobs.items():
            zf.writestr(f"release/data/{key}", blob)


# ---- a numpy re-implementation of the release's forward (eval mode) -------------------------------------

def _emb(tables, x, max_norm=1.0):
    out = 0
    for i, t in enumerate(tables):
        e = t[x[:, i]]
        norm = np.linalg.norm(e, axis=1, keepdims=True)
        out = out + np.where(norm > max_norm, e * max_norm / (norm + 1e-7), e)   # torch's max_norm renorm
    return out


def _bn(sd, key, x):
    return (x - sd[f"{key}.running_mean"]) / np.sqrt(sd[f"{key}.running_var"] + 1e-5) * sd[f"{key}.weight"] \
        + sd[f"{key}.bias"]


def _lin(sd, key, x):
    return x @ sd[f"{key}.weight"].T + sd[f"{key}.bias"]


def _ln(sd, key, x):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * sd[f"{key}.weight"] + sd[f"{key}.bias"]


def reference_graph_readout(sd, nodes, edge_index, edge_feats):
    g = "graph_encoder"
    relu = lambda x: np.maximum(x, 0)
    atom = [sd[f"{g}.atom_encoder.atom_embedding_list.{i}.weight"] for i in range(len(ATOM))]
    h = _emb(atom, nodes).astype(np.float64)
    vn = sd[f"{g}.virtualnode_embedding.weight"][0].astype(np.float64)
    for l in range(LAYERS):
        c = f"{g}.convs.{l}"
        h_in = h + vn
        bond = _emb([sd[f"{c}.bond_encoder.bond_embedding_list.{i}.weight"] for i in range(len(BOND))], edge_feats)
        agg = np.zeros_like(h_in)
        np.add.at(agg, edge_index[:, 1], relu(h_in[edge_index[:, 0]] + bond))
        z = (1 + sd[f"{c}.eps"][0]) * h_in + agg
        z = _lin(sd, f"{c}.mlp.3", relu(_bn(sd, f"{c}.mlp.1", _lin(sd, f"{c}.mlp.0", z))))
        out = _bn(sd, f"{g}.batch_norms.{l}", z)
        if l < LAYERS - 1:
            out = relu(out)
        h_next = out + h_in
        if l < LAYERS - 1:
            v = f"{g}.mlp_virtualnode_list.{l}"
            t = h_in.sum(0) + vn
            t = relu(_bn(sd, f"{v}.4", _lin(sd, f"{v}.3", relu(_bn(sd, f"{v}.1", _lin(sd, f"{v}.0", t[None]))))))[0]
            vn = vn + t
        h = h_next
    return h.sum(0)


def reference_projection(sd, k, x):
    z = _lin(sd, f"modal_projectors.{k}.1", _ln(sd, f"modal_projectors.{k}.0", x))
    return z / (1 + np.exp(-z))


def reference_tree_codes(sd, anchor):
    a = anchor / np.linalg.norm(anchor)
    code, out = 0, []
    for i in range(DEPTH):
        table = sd[f"hierarchical_vq.tree_node_embedding_network.{i}.weight"]
        unit = table / np.linalg.norm(table, axis=1, keepdims=True)
        left = 2 * code
        code = left + int(a @ unit[left + 1] > a @ unit[left])     # the children of the previous code
        out.append(2 ** (i + 1) + code)
    return out


# ---- tests -------------------------------------------------------------------------------------------

def test_reader_reads_torch_zip_format_without_torch(tmp_path):
    sd = release_state_dict()
    path = tmp_path / "ckpt.pt"
    write_torch_zip(path, sd, transpose_first=True)
    back = convert.read_torch_state_dict(path)
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="zip format"):
        convert.read_torch_state_dict(tmp_path / "junk.pt")


def test_reader_matches_real_torch_when_installed(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed (optional: the reader needs no torch)")
    sd = release_state_dict()
    path = tmp_path / "real.pt"
    torch.save(OrderedDict((k, torch.from_numpy(v)) for k, v in sd.items()), path)
    back = convert.read_torch_state_dict(path)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


SMILES = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "OC(=O)c1ccccc1OC(C)=O", "C1CCNCC1"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert")
    sd = release_state_dict(seed=3)
    write_torch_zip(tmp / "release.pt", sd)
    out = tmp / "converted"
    assert cli.main(["convert", "--torch", str(tmp / "release.pt"), "--out", str(out), "--drop_geometry"]) == 0
    return sd, out


def test_converted_forward_equals_the_release_forward(converted):
    sd, out = converted
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["max_norm"] == 1.0 and config["featurize"]["morgan_size"] == MORGAN
    assert (config["model"]["gnn_layers"], config["model"]["gnn_width"], config["model"]["latent"],
            config["model"]["tree_depth"]) == (LAYERS, D, LAT, DEPTH)
    encoder = chmr_jax.load_encoder(out)
    feats = featurize.featurize_smiles(SMILES, encoder.settings, None, show_progress=False, verbose=False)
    (group, batch), = list(encoder.batches(feats, batch_size=8))
    got = {k: np.asarray(v) for k, v in encoder.apply(encoder.params, batch).items()}
    fp = feats.fingerprints()
    for i in range(len(SMILES)):
        n0, n1 = feats.node_offsets[i], feats.node_offsets[i + 1]
        e0, e1 = feats.edge_offsets[i], feats.edge_offsets[i + 1]
        readout = reference_graph_readout(sd, feats.nodes[n0:n1].astype(int), feats.edge_index[e0:e1].astype(int),
                                          feats.edge_feats[e0:e1].astype(int))
        p_fp = reference_projection(sd, 0, fp[i].astype(np.float64))
        p_graph = reference_projection(sd, 1, readout)
        np.testing.assert_allclose(got["fingerprint"][i], p_fp, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(got["graph"][i], p_graph, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(got["anchor"][i], p_fp + p_graph, rtol=2e-4, atol=2e-5)
        assert list(got["tree_codes"][i]) == reference_tree_codes(sd, p_fp + p_graph)


def test_converted_checkpoint_keeps_every_weight(converted):
    sd, out = converted
    model, _, meta = pretrain.load_pretrained(out)
    assert meta["step"] == 0 and meta["converted_from"].endswith("release.pt")
    np.testing.assert_array_equal(np.asarray(model.gnn.norms[1].var[...]), sd["graph_encoder.batch_norms.1.running_var"])
    np.testing.assert_array_equal(np.asarray(model.gnn.convs[0].mlp.lin1.kernel[...]),
                                  sd["graph_encoder.convs.0.mlp.0.weight"].T)
    np.testing.assert_array_equal(np.asarray(model.decoders["cell"].out.bias[...]), sd["modal_decoders.2.net.4.bias"])
    np.testing.assert_array_equal(np.asarray(model.codebook[...])[4:8],
                                  sd["hierarchical_vq.tree_node_embedding_network.1.weight"])
    assert "geometry" not in model.projectors and set(model.cell_names) == {"gene", "cell", "expression"}


def test_geometry_projector_and_errors(tmp_path):
    sd = release_state_dict(seed=1)
    config, dims, model = convert.convert_state_dict(sd)
    assert dims["mol_dims"] == {"fingerprint": MORGAN + 167, "graph": D, "geometry": 24}
    x = np.random.default_rng(0).normal(size=(3, 24)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(model.projectors["geometry"](x)), reference_projection(sd, 2, x.astype(np.float64)),
                               rtol=2e-4, atol=2e-5)
    broken = dict(sd)
    del broken["graph_encoder.convs.1.eps"]
    with pytest.raises(ValueError, match="graph_encoder.convs.1.eps"):
        convert.convert_state_dict(broken)
    bad_shape = dict(sd, **{"modal_projectors.3.1.weight": np.zeros((LAT + 1, 10), np.float32)})
    with pytest.raises(ValueError, match="modal_projectors"):
        convert.convert_state_dict(bad_shape)
    assert cli.main(["convert", "--torch", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")]) == 2


def test_convert_of_a_file_that_is_not_a_torch_checkpoint_says_so(tmp_path, capsys):
    import pickle
    not_torch = tmp_path / "notes.pt"
    not_torch.write_text("smiles,y\nCCO,1\n")
    assert cli.main(["convert", "--torch", str(not_torch), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"chmr-jax convert: {not_torch} is not a torch checkpoint (neither torch's zip format nor its "
                   "legacy format); give the .pt file that torch.save wrote (the release's GNN state_dict)")
    assert not (tmp_path / "o").exists()
    # torch's legacy format (it opens with torch's magic number) is the case that needs torch
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2) + pickle.dumps({}, protocol=2))
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="legacy torch.save file"):
            convert.read_torch_state_dict(legacy)


def test_convert_checks_the_destination_before_reading_the_checkpoint(converted, tmp_path, capsys, monkeypatch):
    """Issue 36: into an existing workdir, convert refused after the whole conversion (11 s)."""
    _, out = converted
    monkeypatch.setattr(convert, "read_torch_state_dict", lambda *a: pytest.fail("the checkpoint was read first"))
    assert cli.main(["convert", "--torch", str(tmp_path / "release.pt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"chmr-jax convert: --out {out} already holds checkpoints; convert into a new directory"


def test_a_converted_encoder_with_geometry_points_at_drop_geometry(tmp_path, capsys):
    sd = release_state_dict(seed=2)
    write_torch_zip(tmp_path / "release.pt", sd)
    out = tmp_path / "with_geometry"
    assert cli.main(["convert", "--torch", str(tmp_path / "release.pt"), "--out", str(out)]) == 0
    assert "convert again with --drop_geometry" in capsys.readouterr().out.strip().splitlines()[-1]
    assert cli.main(["embed", "--pretrained", str(out), "--input", str(tmp_path / "x.csv"), "--out",
                     str(tmp_path / "emb")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "chmr-jax convert --drop_geometry" in err and "config.model" not in err.split(
        " or ")[0]
