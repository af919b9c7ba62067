"""Small builders shared by the pretraining tests (a tiny generated corpus and model)."""
from flax import nnx

from chmr_jax.data import corpus as C, profiles, synthetic
from chmr_jax.mechanisms import model as M
from chmr_jax.training import pretrain_data as PD


def tiny_corpus(root, n_molecules=64, seed=0, observed=None):
    """A generated corpus in the paper's layout, reduced to two small modalities (12 and 10 dims)."""
    synthetic.write_synthetic_paper_layout(root, n_molecules=n_molecules, seed=seed, dims={"CP-Bray": 12, "GE": 10},
                                           observed=observed or {"CP-Bray": 0.5, "GE": 0.2})
    structures, tables, _, _ = profiles.read_paper_layout(root, ["CP-Bray", "GE"])
    return C.assemble(structures, {"cell": [tables["CP-Bray"]], "expression": [tables["GE"]]}, verbose=False)


def tiny_data_config(**overrides):
    return PD.DataConfig(**{"batch_size": 16, "pad_multiple": 32, "knn_k": 5, "context_clusters": 3,
                            "context_floor": 0.3, **overrides})


def tiny_model(data: PD.PretrainData, dropout: float = 0.5, **kw):
    return M.CHMR({"fingerprint": data.inputs["fingerprint"].shape[1], "graph": 32},
                  {n: m.dim for n, m in data.corpus.modalities.items()},
                  {t: data.context.targets[t].shape[1] for t in data.context.targets},
                  latent=16, gnn_layers=2, gnn_width=32, gnn_dropout=dropout, tree_depth=3, rngs=nnx.Rngs(0), **kw)


def as_float64(module):
    """Casts a module's floating-point state (parameters, batch statistics) to float64 in place.

    Masking and batching tests compare two computations that must be equal in exact arithmetic; in
    float32 their reduction orders differ and XLA's rounding differs between CPUs (1e-3 relative after
    batch norm's variance on an Intel Xeon), so those tests run under `jax.enable_x64(True)` with this
    cast, where the same comparisons agree to ~1e-13 and a tolerance of 1e-9 still catches any real
    leak of padding or batch mates.
    """
    import jax
    import jax.numpy as jnp
    state = nnx.state(module)
    nnx.update(module, jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, state))
    return module


def read_event_records(path) -> list[bytes]:
    """The serialized Event protos of a TensorBoard event file (TFRecord framing: 8-byte little-endian
    length, 4-byte CRC, payload, 4-byte CRC); the CRCs are the writer library's business."""
    import struct
    from pathlib import Path
    data, out, pos = Path(path).read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        out.append(data[pos + 12:pos + 12 + length])
        pos += 16 + length
    assert pos == len(data), f"{path}: truncated record"
    return out


def event_class():
    """tensorflow.Event / Summary / SessionLog (the fields we write) as dynamic protobuf classes,
    declared with event.proto / summary.proto's field numbers: an independent decoder."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    f = descriptor_pb2.FileDescriptorProto(name="chmr_test_event.proto", package="tftest", syntax="proto3")
    T = descriptor_pb2.FieldDescriptorProto

    def msg(name, fields):
        m = f.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            fd = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                fd.type_name = type_name
        return m

    opt, rep = T.LABEL_OPTIONAL, T.LABEL_REPEATED
    msg("Value", [("tag", 1, T.TYPE_STRING, opt, None), ("simple_value", 2, T.TYPE_FLOAT, opt, None)])
    msg("Summary", [("value", 1, T.TYPE_MESSAGE, rep, ".tftest.Value")])
    msg("SessionLog", [("status", 1, T.TYPE_INT32, opt, None)])
    msg("Event", [("wall_time", 1, T.TYPE_DOUBLE, opt, None), ("step", 2, T.TYPE_INT64, opt, None),
                  ("file_version", 3, T.TYPE_STRING, opt, None), ("summary", 5, T.TYPE_MESSAGE, opt, ".tftest.Summary"),
                  ("session_log", 7, T.TYPE_MESSAGE, opt, ".tftest.SessionLog")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tftest.Event"))


def unrolled_flops(fn, *args) -> tuple[float, int]:
    """(XLA's FLOP count of fn(*args) with every lax.scan fully unrolled, number of scans unrolled): an
    independent check of utilisation.program_flops, from the same jaxpr with each scan's `unroll` set
    to its length (JAX then lowers the trips as straight-line code, no while loop for XLA to count once)."""
    import jax
    from jax.extend import core

    n_scans = 0

    def unroll(jaxpr):
        nonlocal n_scans
        eqns = []
        def sub(v):
            if type(v) is tuple and any(isinstance(x, (core.Jaxpr, core.ClosedJaxpr)) for x in v):   # cond's branches
                return tuple(sub(x) for x in v)
            if isinstance(v, core.ClosedJaxpr):
                return core.ClosedJaxpr(unroll(v.jaxpr), v.consts)
            return unroll(v) if isinstance(v, core.Jaxpr) else v

        for eqn in jaxpr.eqns:
            params = {k: sub(v) for k, v in eqn.params.items()}
            if eqn.primitive.name == "scan" and params["length"] > 1:
                params["unroll"] = params["length"]
                n_scans += 1
            eqns.append(eqn.replace(params=params))
        return jaxpr.replace(eqns=eqns)

    closed = jax.make_jaxpr(fn)(*args)
    flat = jax.tree_util.tree_leaves(args)
    closed = core.ClosedJaxpr(unroll(closed.jaxpr), closed.consts)
    lowered = jax.jit(core.jaxpr_as_fun(closed)).lower(*flat)
    # Loops left are not scans: the threefry PRNG's rounds (counted once in both counts)
    # The loops left are not scans: the threefry PRNG's rounds, counted once in both counts.
    text = lowered.as_text()
    assert text.count("stablehlo.while") <= text.count("func.func private @threefry"), "a scan was not unrolled"
    return float(lowered.cost_analysis()["flops"]), n_scans
