"""Import of the authors' PyTorch checkpoints (the release's `GNN` model state_dict).

  read_torch_state_dict(path)   {key: numpy array} from a torch.save file, without torch: the zip
                                format (data.pkl + data/<storage>) is unpickled with stand-ins for
                                torch's tensor rebuild functions and storages read as raw bytes
  convert_state_dict(sd)        (config, model dims, CHMR model) with every release weight in place
  convert(path, out)            a chmr_jax workdir (config.json, model_dims.json, checkpoints/0) that
                                `load_encoder`, `chmr-jax embed`, `finetune` and `benchmark` accept

Release layout (keys; W are torch Linear weights [out, in], transposed here):
  graph_encoder.atom_encoder.atom_embedding_list.{i}.weight              AtomEncoder, 9 tables
  graph_encoder.virtualnode_embedding.weight [1, D]                      initial virtual node
  graph_encoder.convs.{l}.eps [1]; .mlp.{0,3} Linear; .mlp.1 BatchNorm1d GIN layer l
  graph_encoder.convs.{l}.bond_encoder.bond_embedding_list.{i}.weight     its BondEncoder, 3 tables
  graph_encoder.batch_norms.{l}                                          BatchNorm1d after layer l
  graph_encoder.mlp_virtualnode_list.{l}.{0,3} Linear; .{1,4} BatchNorm1d virtual-node MLPs
  graph_encoder.bond_encoder.*                                           unused by the forward: skipped
  modal_projectors.{k}.0 LayerNorm; .1 Linear   k over [1D fingerprint, 2D graph, 3D, gene, cell, expression]
  modal_decoders.{j}.net.0 LayerNorm; .net.1, .net.4 Linear   j over [molecule target, gene, cell, expression]
  hierarchical_vq.tree_node_embedding_network.{i}.weight [2^(i+1), D]    tree level i + 1
BatchNorm keys: weight, bias, running_mean, running_var (num_batches_tracked is ignored).
The release embeds atoms and bonds with max_norm=1, so the converted config sets model.max_norm=1.
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from chmr_jax.data import paths
from chmr_jax.mechanisms import tree_vq

RELEASE_MOLECULAR = ("fingerprint", "graph", "geometry")     # modal_projectors 0..2
RELEASE_CELLULAR = ("gene", "cell", "expression")            # modal_projectors 3..5
RELEASE_TARGETS = ("molecule", "gene", "cell", "expression")  # modal_decoders 0..3
MACCS_BITS = 167

_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                   "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
                   "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _StorageType:
    def __init__(self, name):
        if name == "BFloat16Storage":
            import ml_dtypes
            self.dtype = np.dtype(ml_dtypes.bfloat16)
        elif name in _STORAGE_DTYPES:
            self.dtype = np.dtype(_STORAGE_DTYPES[name])
        else:
            raise ValueError(f"unsupported torch storage type {name}")


def _rebuild_tensor(storage, offset, size, stride, *unused):
    item = storage.dtype.itemsize
    if not size:
        return storage[offset:offset + 1].reshape(()).copy()
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * item for s in stride))
    return np.array(view)


def _rebuild_parameter(data, *unused):
    return data


class _TorchUnpickler(pickle.Unpickler):
    """Resolves the few torch globals a state_dict pickle references to numpy stand-ins."""

    def __init__(self, file, read_storage):
        super().__init__(file)
        self._read_storage = read_storage

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module.startswith("torch"):
            raise pickle.UnpicklingError(f"unsupported object {module}.{name} in the checkpoint")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid[:5]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        return self._read_storage(key, storage_type.dtype, numel)


# torch.save's legacy (pre-zip) format opens with this number pickled (torch/serialization.py).
_LEGACY_TORCH_MAGIC = 0x1950a86a20f9469cfc6c


def _is_legacy_torch_file(path: Path) -> bool:
    """Whether `path` opens with torch's legacy magic number; the first pickled object is read with
    no class allowed (an int needs none), so an arbitrary file runs no code and just answers False."""
    class NoClasses(pickle.Unpickler):
        def find_class(self, module, name):
            raise pickle.UnpicklingError(f"{module}.{name}")

    try:
        with open(path, "rb") as fh:
            return NoClasses(fh).load() == _LEGACY_TORCH_MAGIC
    except Exception:  # noqa: BLE001  (anything unreadable as that first object is not a legacy torch file)
        return False


def read_torch_state_dict(path) -> dict:
    """{key: numpy array} from a torch.save(state_dict) file (the zip format of torch >= 1.6).

    A checkpoint dict holding the state_dict under 'model', 'state_dict' or 'model_state_dict' is
    unwrapped. The legacy (pre-zip) format needs torch: install it (`pip install torch`) and it is used.
    """
    if paths.is_remote(path):   # a gs:// checkpoint: its verified local copy (named by its URL in errors)
        path = paths.local_file(path, "--torch")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        if not _is_legacy_torch_file(path):
            raise ValueError(f"{path} is not a torch checkpoint (neither torch's zip format nor its legacy "
                             "format); give the .pt file that torch.save wrote (the release's GNN state_dict)")
        try:
            import torch
        except ImportError:
            raise ValueError(f"{path} is not in torch's zip format (a legacy torch.save file?); reading it "
                             "needs torch: `pip install torch`, or re-save it with a recent torch") from None
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return _unwrap({k: v.numpy() for k, v in obj.items()} if hasattr(obj, "items") else obj, path)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl")]
        if not pkl:
            raise ValueError(f"{path}: a zip file without data.pkl is not a torch checkpoint")
        prefix = pkl[0][:-len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode().strip()

        def read_storage(key, dtype, numel):
            raw = zf.read(f"{prefix}data/{key}")
            arr = np.frombuffer(raw, dtype=dtype.newbyteorder("<" if byteorder == "little" else ">"), count=numel)
            return arr.astype(dtype, copy=False)

        with zf.open(pkl[0]) as f:
            obj = _TorchUnpickler(f, read_storage).load()
    return _unwrap(obj, path)


def _unwrap(obj, path) -> dict:
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors)")
    return dict(obj)


# ---- mapping ---------------------------------------------------------------------------------------

def _count(sd, pattern) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd for m in [rx.match(k)] if m})


def infer_dims(sd: dict, drop_geometry: bool = False) -> tuple[dict, dict]:
    """(model settings, model dims) read off the state_dict's shapes."""
    need = ["graph_encoder.atom_encoder.atom_embedding_list.0.weight", "modal_projectors.0.1.weight",
            "hierarchical_vq.tree_node_embedding_network.0.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"not a CHMR release state_dict: missing {missing} (found e.g. {sorted(sd)[:5]})")
    n_proj = _count(sd, r"modal_projectors\.(\d+)\.")
    n_dec = _count(sd, r"modal_decoders\.(\d+)\.")
    if n_proj != 6 or n_dec != 4:
        raise ValueError(f"expected 6 modal projectors and 4 decoders as in the release, found {n_proj} / {n_dec}")
    proj_in = [int(sd[f"modal_projectors.{k}.1.weight"].shape[1]) for k in range(6)]
    dec_out = [int(sd[f"modal_decoders.{j}.net.4.weight"].shape[0]) for j in range(4)]
    settings = {"latent": int(sd["modal_projectors.0.1.weight"].shape[0]),
                "gnn_width": int(sd["graph_encoder.atom_encoder.atom_embedding_list.0.weight"].shape[1]),
                "gnn_layers": _count(sd, r"graph_encoder\.convs\.(\d+)\."),
                "tree_depth": _count(sd, r"hierarchical_vq\.tree_node_embedding_network\.(\d+)\.")}
    molecular = RELEASE_MOLECULAR[:2] if drop_geometry else RELEASE_MOLECULAR
    dims = {"mol_dims": {n: proj_in[k] for k, n in enumerate(RELEASE_MOLECULAR) if n in molecular},
            "cell_dims": {n: proj_in[3 + k] for k, n in enumerate(RELEASE_CELLULAR)},
            "target_dims": dict(zip(RELEASE_TARGETS, dec_out))}
    return settings, dims


def _set(variable, value, key):
    value = np.asarray(value, np.float32)
    if tuple(variable.shape) != value.shape:
        raise ValueError(f"{key}: shape {value.shape} does not fit chmr_jax's {tuple(variable.shape)}")
    variable[...] = value


def _linear(layer, sd, key, used):
    _set(layer.kernel, sd[f"{key}.weight"].T, f"{key}.weight")
    _set(layer.bias, sd[f"{key}.bias"], f"{key}.bias")
    used.update({f"{key}.weight", f"{key}.bias"})


def _norm(layer, sd, key, used, batch: bool):
    _set(layer.scale, sd[f"{key}.weight"], f"{key}.weight")
    _set(layer.bias, sd[f"{key}.bias"], f"{key}.bias")
    used.update({f"{key}.weight", f"{key}.bias"})
    if batch:
        _set(layer.mean, sd[f"{key}.running_mean"], f"{key}.running_mean")
        _set(layer.var, sd[f"{key}.running_var"], f"{key}.running_var")
        used.update({f"{key}.running_mean", f"{key}.running_var", f"{key}.num_batches_tracked"})


def _tables(encoder, sd, key, used):
    for i, table in enumerate(encoder.tables):
        _set(table.embedding, sd[f"{key}.{i}.weight"], f"{key}.{i}.weight")
        used.add(f"{key}.{i}.weight")


def load_into(model, sd: dict) -> list[str]:
    """Copies the release weights into a CHMR model built with matching dims; returns the unused keys
    (only ones the forward never reads are allowed)."""
    used: set = set()
    g, p = model.gnn, "graph_encoder"
    _tables(g.atom, sd, f"{p}.atom_encoder.atom_embedding_list", used)
    _set(g.virtual_node, sd[f"{p}.virtualnode_embedding.weight"][0], f"{p}.virtualnode_embedding.weight")
    used.add(f"{p}.virtualnode_embedding.weight")
    for l, conv in enumerate(g.convs):
        c = f"{p}.convs.{l}"
        _set(conv.eps, sd[f"{c}.eps"].reshape(()), f"{c}.eps")
        used.add(f"{c}.eps")
        _tables(conv.bond, sd, f"{c}.bond_encoder.bond_embedding_list", used)
        _linear(conv.mlp.lin1, sd, f"{c}.mlp.0", used)
        _norm(conv.mlp.bn1, sd, f"{c}.mlp.1", used, batch=True)
        _linear(conv.mlp.lin2, sd, f"{c}.mlp.3", used)
        _norm(g.norms[l], sd, f"{p}.batch_norms.{l}", used, batch=True)
    for l, mlp in enumerate(g.vn_mlps):
        v = f"{p}.mlp_virtualnode_list.{l}"
        _linear(mlp.lin1, sd, f"{v}.0", used)
        _norm(mlp.bn1, sd, f"{v}.1", used, batch=True)
        _linear(mlp.lin2, sd, f"{v}.3", used)
        _norm(mlp.bn2, sd, f"{v}.4", used, batch=True)
    for k, name in enumerate(RELEASE_MOLECULAR + RELEASE_CELLULAR):
        if name not in model.projectors:
            continue
        _norm(model.projectors[name].norm, sd, f"modal_projectors.{k}.0", used, batch=False)
        _linear(model.projectors[name].linear, sd, f"modal_projectors.{k}.1", used)
    for j, name in enumerate(RELEASE_TARGETS):
        d = model.decoders[name]
        _norm(d.norm, sd, f"modal_decoders.{j}.net.0", used, batch=False)
        _linear(d.hidden, sd, f"modal_decoders.{j}.net.1", used)
        _linear(d.out, sd, f"modal_decoders.{j}.net.4", used)
    table = np.array(model.codebook[...])
    for i in range(tree_vq.depth_of(table)):
        key = f"hierarchical_vq.tree_node_embedding_network.{i}.weight"
        rows = np.asarray(sd[key], np.float32)
        if rows.shape != (2 ** (i + 1), table.shape[1]):
            raise ValueError(f"{key}: shape {rows.shape}, expected {(2 ** (i + 1), table.shape[1])}")
        table[2 ** (i + 1):2 ** (i + 2)] = rows       # level i + 1 of the heap-ordered table
        used.add(key)
    model.codebook[...] = table
    return sorted(k for k in sd if k not in used)


def convert_state_dict(sd: dict, base_config=None, drop_geometry: bool = False, morgan_radius: int = 4):
    """(config, dims, model) for a release state_dict. base_config: a chmr_jax config (default
    configs/paper.py) whose model/featurize sections are set from the checkpoint."""
    from chmr_jax import config_util
    from chmr_jax.training import pretrain

    settings, dims = infer_dims(sd, drop_geometry)
    config = (base_config or config_util.load_config(str(config_util.CONFIG_DIR / "paper.py")))
    config = config.copy_and_resolve_references()
    config.model.update(settings)
    config.model.molecular = ",".join(dims["mol_dims"])
    config.model.max_norm = 1.0                 # the release's embeddings use max_norm=1
    fp = dims["mol_dims"]["fingerprint"]
    config.featurize.morgan_size = fp - MACCS_BITS   # 1D input = Morgan bits then MACCS (1024 + 167)
    config.featurize.morgan_radius = morgan_radius
    config.featurize.target_size = dims["target_dims"]["molecule"]
    if "geometry" in dims["mol_dims"] and config.geometry == "none":
        config.geometry = "external"            # the release's 3D input is an external (e.g. Uni-Mol) matrix
    model = pretrain.build_model(config, dims)
    try:
        unused = load_into(model, sd)
    except KeyError as e:
        raise ValueError(f"the state_dict lacks {e.args[0]!r}, which the release's model has; is this a CHMR "
                         "release checkpoint?") from None
    # The top-level bond encoder is never used by the release's forward; a dropped 3D projector is by request.
    skip = ("graph_encoder.bond_encoder.",) + (("modal_projectors.2.",) if drop_geometry else ())
    skippable = [k for k in unused if k.startswith(skip)]
    if len(skippable) != len(unused):
        raise ValueError(f"state_dict keys chmr_jax does not know: {[k for k in unused if k not in skippable][:8]}")
    return config, dims, model


def convert(torch_path, out, base_config=None, drop_geometry: bool = False, morgan_radius: int = 4,
            log=print) -> Path:
    """Writes a chmr_jax workdir at `out` holding the converted release checkpoint (as step 0)."""
    from chmr_jax.data import files, paths
    from chmr_jax.training import checkpoint as checkpoint_lib, train

    out = paths.as_path(out)   # a gs:// workdir too (files.py and Orbax write objects)
    paths.check_reachable(out, "--out")
    # The destination first: reading and converting the checkpoint takes seconds.
    if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise ValueError(f"--out {out} already holds checkpoints; convert into a new directory")
    sd = read_torch_state_dict(torch_path)
    config, dims, model = convert_state_dict(sd, base_config, drop_geometry, morgan_radius)
    out.mkdir(parents=True, exist_ok=True)
    tx = train.make_optimizer(**config.optim, total_steps=1)
    _, state = train.init_state(model, tx)
    files.atomic_write_text(out / "config.json", json.dumps(json.loads(config.to_json_best_effort()), indent=1))
    files.atomic_write_text(out / "model_dims.json", json.dumps(dims, indent=1))
    ckpt = checkpoint_lib.Checkpointer(out / "checkpoints", async_save=False)
    try:
        ckpt.save(0, state, {"step": 0, "converted_from": str(torch_path) if paths.is_remote(torch_path)
                                      else str(Path(torch_path).resolve())}, force=True)
    finally:
        ckpt.close()
    n = sum(int(np.prod(v.shape)) for v in sd.values())
    log(f"converted {len(sd)} tensors ({n:,} values) from {torch_path}: GIN {config.model.gnn_layers} x "
        f"{config.model.gnn_width}, latent {config.model.latent}, tree depth {config.model.tree_depth}, "
        f"modalities {list(dims['mol_dims']) + list(dims['cell_dims'])} -> {out}")
    if "geometry" in dims["mol_dims"]:   # said now, not first when `chmr-jax embed` refuses it
        log("this encoder takes a 3D (geometry) input: `chmr-jax embed` and embed_smiles need SMILES-only "
            "encoders; convert again with --drop_geometry for one")
    return out
