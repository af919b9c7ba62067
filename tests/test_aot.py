"""`chmr-jax compile` (training/aot.py): TPU topology names, the compiled-program cost walker against
closed forms, and the tiny step compiled for 4 v5e chips on this CPU (issue 22).

Everything that initialises libtpu runs in a subprocess: libtpu holds a per-process lockfile, and the
test process must stay free to spawn featurization workers."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from chmr_jax.mechanisms import collapse
from chmr_jax.training import aot

ROOT = Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install 'jax[tpu]'); "
                                  "the deviceless TPU compile cannot run here")


@pytest.mark.parametrize("name,topology,chips,hosts", [
    ("v5e-4", "v5e:2x2", 4, 1), ("v5e-8", "v5e:2x4", 8, 1), ("v5litepod-16", "v5e:4x4", 16, 4),
    ("v5e-64", "v5e:8x8", 64, 16), ("v4-32", "v4:2x2x4", 16, 4), ("v5p-128", "v5p:4x4x4", 64, 16),
    ("v6e-64", "v6e:8x8", 64, 16), ("v5e:4x4", "v5e:4x4", 16, 4), ("V4:2x2x2", "v4:2x2x2", 8, 2)])
def test_topology_names(name, topology, chips, hosts):
    spec = aot.parse_topology(name)
    assert (spec.topology_name, spec.chips, spec.hosts) == (topology, chips, hosts)


@pytest.mark.parametrize("bad,says", [("v5e-12", "no v5e slice of 12"), ("v4-33", "must be even"),
                                      ("v7x-8", "unknown TPU topology"), ("v5e:4x4x4", "2-D"), ("tpu", "unknown")])
def test_topology_name_errors(bad, says):
    with pytest.raises(ValueError, match=says):
        aot.parse_topology(bad)


def test_padded_bytes_follow_the_tile():
    # [100, 9] int32 in (8, 128) tiles occupies 104 x 128 words; a [10] vector with T(128) one 128-word row.
    assert aot._bytes_of("s32[100,9]{1,0:T(8,128)}") == 104 * 128 * 4
    assert aot._bytes_of("s32[100,9]{1,0:T(8,128)}", padded=False) == 100 * 9 * 4
    assert aot._bytes_of("f32[10]{0:T(128)}") == 128 * 4 and aot._bytes_of("f32[]{:T(128)}") == 4
    # minor-to-major {0,1}: dim 0 is the most minor one
    assert aot._bytes_of("f32[9,100]{0,1:T(8,128)}") == 128 * 104 * 4
    # on-chip arrays (S(1)) are left out of HBM traffic
    assert aot._bytes_of("(f32[8,128]{1,0:T(8,128)S(1)}, f32[8,128]{1,0:T(8,128)})", hbm_only=True) == 8 * 128 * 4


def test_collapse_eigvalsh_is_a_host_call_on_cpu_only():
    """The host LAPACK path is chosen by the platform compiled for: the CPU program calls back."""
    cov = jnp.eye(8, dtype=jnp.float32) * jnp.arange(1, 9, dtype=jnp.float32)
    text = jax.jit(collapse.eigvalsh).lower(cov).compile().as_text()
    assert "callback" in text.lower()
    assert jnp.allclose(jnp.sort(collapse.eigvalsh(cov)), jnp.arange(1, 9))


def _run(code: str, timeout=600):
    env = {**os.environ, "TPU_SKIP_MDS_QUERY": "1", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=env, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_libtpu
def test_hlo_cost_counts_every_loop_trip_and_finds_host_calls():
    """Closed forms: a 6-trip fori_loop and a 5-trip scan of n x n matmuls are 6 and 5 x 2 n^3 FLOPs
    (XLA's own cost analysis reports one trip); a pure_callback compiled for TPU is a host transfer."""
    r = _run("""
        import json, numpy as np, jax, jax.numpy as jnp
        from chmr_jax.training import aot
        devs = aot.tpu_devices(aot.parse_topology("v5e-4"))
        mesh = jax.sharding.Mesh(np.array(devs[:1]), ("d",))
        x = jax.ShapeDtypeStruct((512, 512), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        fori = lambda x: jax.lax.fori_loop(0, 6, lambda i, y: jnp.tanh(y @ x), x)
        scan = lambda x: jax.lax.scan(lambda c, _: (jnp.tanh(c @ x), None), x, None, length=5)[0]
        cb = lambda x: jax.pure_callback(lambda a: np.asarray(a), jax.ShapeDtypeStruct(x.shape, x.dtype), x) + 1
        out = {}
        for name, f in (("fori", fori), ("scan", scan), ("cb", cb)):
            c = jax.jit(f).lower(x).compile()
            xla = c.cost_analysis(); xla = xla[0] if isinstance(xla, list) else xla
            t = c.as_text()
            out[name] = {"flops": aot.hlo_cost(t)["flops"], "xla_flops": xla["flops"], "host": aot.host_calls(t)}
        print(json.dumps(out))
    """)
    one = 2 * 512 ** 3
    assert r["fori"]["flops"] == pytest.approx(6 * one, rel=1e-6)
    assert r["scan"]["flops"] == pytest.approx(5 * one, rel=1e-6)
    assert r["fori"]["xla_flops"] < 2 * one          # why the walker exists
    assert r["fori"]["host"] == [] and r["scan"]["host"] == []
    assert r["cb"]["host"], "a host callback compiled for TPU must be reported"


@needs_libtpu
def test_compile_tiny_step_for_v5e_4(tmp_path):
    """The done-when command: the tiny config's step for 4 v5e chips, compiled here, fits, has no host
    callback (the collapse diagnostics use XLA's eigh on TPU), donates its state, and reports every field."""
    out = tmp_path / "x.json"
    env = {**os.environ, "CHMR_CACHE_DIR": str(tmp_path / "cache")}   # the generated corpus: no data needed
    p = subprocess.run([sys.executable, "-m", "chmr_jax.cli", "compile", "--config", str(ROOT / "configs/test.py"),
                        "--topology", "v5e-4", "--out", str(out)], capture_output=True, text=True, env=env,
                       timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "estimate" in p.stdout
    row = json.loads(out.read_text())
    for field in aot.ROW_FIELDS:
        assert row[field] is not None, field
    assert row["topology"] == "v5e:2x2" and row["chips"] == 4 and row["device_kind"] == "TPU v5 lite"
    assert row["fits"] is True and row["hbm_bytes"] == 16 * 2 ** 30
    m = row["memory"]
    assert row["per_chip_bytes"] == m["arguments"] + m["outputs"] + m["temporaries"] - m["aliased"]
    assert row["host_calls"] == [] and row["donated"] is True and m["aliased"] > 0
    assert row["estimate_source"] in ("xla", "roofline")
    r = row["roofline"]
    if row["estimate_source"] == "roofline":
        assert row["estimated_step_s"] == pytest.approx(max(r["compute_s"], r["memory_s"]))
    assert row["estimated_molecules_per_s"] == pytest.approx(row["budget"]["batch_size"] / row["estimated_step_s"])
    assert 0 < row["estimated_mfu"] < 1
    # The batch is the config's (16) padded for 4 chips: graph slots a multiple of 4.
    assert row["global_batch"] == 16 and row["budget"]["n_graph"] % 4 == 0


def test_compile_bad_topology_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "chmr_jax.cli", "compile", "--config", str(ROOT / "configs/test.py"),
                        "--topology", "v5e-12"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "no v5e slice of 12" in p.stderr


@needs_libtpu
def test_a_step_that_does_not_fit_is_a_row_with_fits_false(tmp_path):
    """The TPU compiler refuses a program larger than its HBM: that is the answer (fits: false, the
    temporaries it asked for, the HBM it allows), not a compile error."""
    out = tmp_path / "big.json"
    env = {**os.environ, "CHMR_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-m", "chmr_jax.cli", "compile", "--config", str(ROOT / "configs/test.py"),
                        "--topology", "v5e-4", "--config.batch.batch_size=8000000", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    row = json.loads(out.read_text())
    assert row["fits"] is False and row["per_chip_bytes"] > row["hbm_available_bytes"] > 15 * 2 ** 30
    assert set(aot.ROW_FIELDS) <= set(row)


def test_hbm_refusals_are_told_from_compile_errors():
    assert aot.hbm_refusal("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                           "temporaries (54.12G) exceeds available HBM (15.75G).") == \
        (int(54.12 * 2 ** 30), int(15.75 * 2 ** 30), "temporaries")
    assert aot.hbm_refusal("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
                           "hbm. Used 21.95G of 15.48G hbm. Exceeded hbm capacity by 6.47G.") == \
        (int(21.95 * 2 ** 30), int(15.48 * 2 ** 30), "total")
    assert aot.hbm_refusal("RESOURCE_EXHAUSTED: Ran out of memory in memory space vmem.") is None
    assert aot.hbm_refusal("INVALID_ARGUMENT: unsupported op") is None
