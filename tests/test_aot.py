"""`chmr-jax compile` (training/aot/): TPU topology names, the compiled-program cost walker against
closed forms (hand-written HLO modules turned into protos by XLA's own parser, and small programs
compiled for TPU), the FLOP counter on TPU programs, the --fit search, the corpus compile takes its
shapes from, and the tiny step compiled for 4 v5e chips on this CPU (issues 22, 34, 36).

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
from chmr_jax.training.aot import cost, fit, hlo

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


def _module(text: str):
    """A hand-written HLO module as its serialized proto, through XLA's own HLO parser."""
    from jax._src.lib import xla_client
    return xla_client.hlo.hlo_module_from_text(textwrap.dedent(text)).as_serialized_hlo_module_proto()


MIB = 256 * 1024 * 4        # f32[256,1024]: tile-aligned, so padded and logical sizes agree


def test_padded_bytes_follow_the_tile():
    """[100, 9] int32 in (8, 128) tiles occupies 104 x 128 words; minor-to-major {0,1} pads dim 0 to 128;
    an S(1) array is on-chip memory, left out of HBM bytes."""
    m = hlo.parse(_module("""
        HloModule m
        ENTRY e {
          a = s32[100,9]{1,0:T(8,128)} parameter(0)
          b = f32[9,100]{0,1:T(8,128)} parameter(1)
          c = f32[8,128]{1,0:T(8,128)S(1)} parameter(2)
          ROOT t = (s32[100,9]{1,0:T(8,128)}, f32[9,100]{0,1:T(8,128)}, f32[8,128]{1,0:T(8,128)S(1)}) tuple(a, b, c)
        }"""))
    a, b, c = (i.shape for i in m.computation(m.entry).instructions[:3])
    assert hlo.nbytes(a) == 104 * 128 * 4 and hlo.nbytes(a, padded=False) == 100 * 9 * 4
    assert hlo.nbytes(b) == 128 * 104 * 4
    assert hlo.nbytes(c) == 8 * 128 * 4 and hlo.nbytes(c, hbm_only=True) == 0


def test_copy_start_direction_prefetch_and_eviction():
    """A prefetch (HBM -> on-chip S(1)) reads HBM once; an eviction (S(1) -> HBM) writes HBM once. XLA's
    copy-start tuple is (destination, source, context): reading element [1] as the result (issue 34 §2)
    charged the prefetch to HBM twice and the eviction not at all."""
    prefetch = cost.program_cost(_module("""
        HloModule m
        ENTRY e {
          p = f32[256,1024]{1,0:T(8,128)} parameter(0)
          cs = (f32[256,1024]{1,0:T(8,128)S(1)}, f32[256,1024]{1,0:T(8,128)}, u32[]{:S(2)}) copy-start(p)
          cd = f32[256,1024]{1,0:T(8,128)S(1)} copy-done(cs)
          ROOT n = f32[256,1024]{1,0:T(8,128)S(1)} negate(cd)
        }"""))
    # copy: 1 MiB read from HBM + 1 MiB written on chip; negate: on chip both ways.
    assert prefetch["hbm_bytes"] == MIB and prefetch["bytes"] == 4 * MIB
    evict = cost.program_cost(_module("""
        HloModule m
        ENTRY e {
          p = f32[256,1024]{1,0:T(8,128)S(1)} parameter(0)
          cs = (f32[256,1024]{1,0:T(8,128)}, f32[256,1024]{1,0:T(8,128)S(1)}, u32[]{:S(2)}) copy-start(p)
          ROOT cd = f32[256,1024]{1,0:T(8,128)} copy-done(cs)
        }"""))
    assert evict["hbm_bytes"] == MIB and evict["bytes"] == 2 * MIB


LOOP = """
    HloModule m
    body {
      s = (s32[], f32[256,1024]) parameter(0)
      i = s32[] get-tuple-element(s), index=0
      x = f32[256,1024] get-tuple-element(s), index=1
      step = s32[] constant(STEP)
      j = s32[] add(i, step)
      y = f32[256,1024] negate(x), backend_config={"window_config":{"estimated_cycles":"100"}}
      ROOT t = (s32[], f32[256,1024]) tuple(j, y)
    }
    cond {
      s = (s32[], f32[256,1024]) parameter(0)
      i = s32[] get-tuple-element(s), index=0
      BOUND
      ROOT lt = pred[] compare(i, n), direction=DIR
    }
    ENTRY e {
      x = f32[256,1024] parameter(0)
      k = s32[] parameter(1)
      z = s32[] constant(START)
      init = (s32[], f32[256,1024]) tuple(z, x)
      w = (s32[], f32[256,1024]) while(init), condition=cond, body=body
      ROOT r = f32[256,1024] get-tuple-element(w), index=1
    }"""


@pytest.mark.parametrize("start,step,bound,direction,trips", [
    (0, 1, 7, "LT", 7), (2, 3, 11, "LT", 3), (0, 1, 4, "LE", 5), (5, -1, 0, "GT", 5), (0, 2, 8, "NE", 4)])
def test_loop_trip_counts_are_read_from_the_loop(start, step, bound, direction, trips):
    """Closed forms: the cycles and bytes of the body count once per trip; the loop is listed with it."""
    text = LOOP.replace("START", str(start)).replace("STEP", str(step)).replace("DIR", direction) \
        .replace("BOUND", f"n = s32[] constant({bound})")
    r = cost.program_cost(_module(text))
    assert [lp["trips"] for lp in r["loops"]] == [trips] and r["unknown_trip_loops"] == []
    assert r["cycles"] == 100 * trips
    # per trip: negate reads and writes 1 MiB, the counter's add 3 x 4 bytes; the condition (compare: 2 x 4
    # bytes read, a 1-byte pred written) runs once more than the body.
    assert r["bytes"] == 2 * MIB * trips + 12 * trips + 9 * (trips + 1)


def test_a_loop_whose_bound_cannot_be_read_is_reported():
    """A bound that is a runtime value (here the program's argument) is counted once and listed."""
    text = LOOP.replace("START", "0").replace("STEP", "1").replace("DIR", "LT") \
        .replace("BOUND", "n = s32[] get-tuple-element(s), index=0")   # compares the counter with itself
    r = cost.program_cost(_module(text))
    assert len(r["unknown_trip_loops"]) == 1 and r["unknown_trip_loops"][0]["trips"] is None
    assert "constant" in r["unknown_trip_loops"][0]["unknown"]
    assert r["cycles"] == 100                                 # once, and said so


@pytest.mark.parametrize("start", [1024, 1000, 16])
def test_fit_search_closes_a_bracket_on_a_linear_footprint(start):
    """A footprint of 1 GiB + 1 MiB per molecule against a 15.75 GiB limit: the largest fitting batch is
    the largest multiple of the unit under (15.75 - 1) GiB / 1 MiB = 15,104, found within the probes,
    also from a config batch that is not a multiple of the unit (16 < the unit once stopped the search
    at once); each probe's step grows at most 4x; the bracket closes on a refusal."""
    unit, limit = 32, int(15.75 * 2 ** 30)
    size = lambda b: 2 ** 30 + b * 2 ** 20
    calls = []

    def probe(b):
        calls.append(b)
        return {"global_batch": b, "fits": size(b) <= limit, "peak_bytes_per_chip": size(b)}

    first = [{"global_batch": start, "fits": True, "peak_bytes_per_chip": size(start)}]
    out = fit.search(probe, first, unit, limit, max_probes=12)
    assert out["largest_fitting_batch"] == 15104 // unit * unit and out["bracket_closed"]
    assert out["smallest_refused_batch"] - out["largest_fitting_batch"] <= max(unit, 0.02 * 15104)
    assert all(b <= 4 * max([start] + [c for c in calls[:k] if size(c) <= limit]) for k, b in enumerate(calls))
    assert "refused at" in fit.bracket_text(out, "16 GB")


def test_fit_prints_a_bracket_until_a_refusal_closes_it():
    """Everything tried fits, or the host stopped the next compile: a lower bound, not a result."""
    unit, limit = 32, 10 * 2 ** 30

    def probe(b):   # the host cannot compile past 5,000 molecules; all that compiles fits
        return {"global_batch": b, "fits": None, "stopped": "host memory"} if b > 5000 else \
            {"global_batch": b, "fits": True, "peak_bytes_per_chip": 2 ** 20 * b}

    out = fit.search(probe, [{"global_batch": 1024, "fits": True, "peak_bytes_per_chip": 2 ** 30}], unit, limit, 6)
    assert out["smallest_refused_batch"] is None and not out["bracket_closed"]
    assert out["largest_fitting_batch"] <= 5000 < out["host_could_not_compile_batch"]
    text = fit.bracket_text(out, "16 GB")
    assert "at least" in text and "bracket" in text and "refused at" not in text


def test_fit_log_is_written_per_probe_and_resumed(tmp_path):
    """Each probe is in the log when the next starts; a second search reuses them and compiles none."""
    log, key = tmp_path / "fit.jsonl", "k"
    limit, unit = 8 * 2 ** 30, 64
    seen = []

    def probe(b):
        seen.append(len(fit.read_log(log, key)))
        rec = {"global_batch": b, "fits": b * 2 ** 20 <= limit, "peak_bytes_per_chip": b * 2 ** 20, "key": key}
        fit.append_log(log, rec)
        return rec

    first = {"global_batch": 512, "fits": True, "peak_bytes_per_chip": 512 * 2 ** 20, "key": key}
    fit.append_log(log, first)
    one = fit.search(probe, [first], unit, limit, max_probes=3)
    assert seen == list(range(1, len(seen) + 1)) and len(seen) == 3
    again = []
    known = fit.read_log(log, key)
    two = fit.search(lambda b: again.append(b) or probe(b), known, unit, limit, max_probes=0)
    assert again == [] and two["largest_fitting_batch"] == one["largest_fitting_batch"]


def test_a_probe_past_its_memory_limit_is_stopped(tmp_path):
    """A child that holds 400 MiB under a 150 MiB cap is stopped, and says so."""
    code = "import time; b = bytearray(400 * 2 ** 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(30)"
    r = fit.run_limited([sys.executable, "-c", code], 150 * 2 ** 20, 60)
    assert r["stopped"] == "memory" and r["peak_rss"] > 150 * 2 ** 20 and r["seconds"] < 30
    ok = fit.run_limited([sys.executable, "-c", "print(1)"], 150 * 2 ** 20, 60)
    assert ok["stopped"] is None and ok["returncode"] == 0


def test_compile_finds_the_corpus_prepare_wrote(tmp_path):
    """`prepare --corpus reachable` saves <cache>/corpus-reachable; compile's shapes then come from it: as
    the config's own corpus (kind reachable) and as the stand-in's molecules for a corpus not here
    (configs/paper.py: kind paper, no path), named in shapes_from; never a stand-in of enumerated molecules."""
    from chmr_jax import cli, config_util
    cache = tmp_path / "cache"
    cfg = tmp_path / "reach.py"
    cfg.write_text(textwrap.dedent(f"""
        from chmr_jax import config_util
        def get_config(arg=None):
            c = config_util.load_config("{ROOT / 'configs/default.py'}")
            c.corpus.include_benchmarks = False      # the profiles' molecules alone: seconds, not minutes
            return c"""))
    assert cli.main(["prepare", "--corpus", "reachable", "--config", str(cfg), "--cache_dir", str(cache),
                     "--workers", "1"]) == 0
    written = cache / "corpus-reachable"
    assert (written / "manifest.json").exists()
    n = json.loads((written / "manifest.json").read_text())["molecules"]
    own = config_util.load_config(str(cfg))
    own.cache_dir = str(cache)
    s = aot.load_sample(own, 4, sample=64, log=lambda *a: None)
    assert s.shapes_from.startswith("the config's corpus") and str(written) in s.shapes_from
    assert s.molecules == n and len(s.data) == 64
    paper = config_util.load_config(str(ROOT / "configs/paper.py") + ":tpu_pod")
    paper.cache_dir = str(cache)
    s = aot.load_sample(paper, 4, sample=64, log=lambda *a: None)
    assert s.shapes_from.startswith("STAND-IN") and "enumerated" not in s.shapes_from
    assert f"{written} (" in s.shapes_from
    # The corpus of the config's leakage guard, not the newest one cached (issue 36): a copy prepared with
    # --exclude_test bbbp, written later, is taken only by a config that excludes bbbp's test split.
    import shutil
    shutil.copytree(written, cache / "corpus-reachable-no-bbbp-test")
    assert f"{written} (" in aot.load_sample(paper, 4, sample=64, log=lambda *a: None).shapes_from
    paper.corpus.exclude_test_of = "bbbp"
    assert f"{cache / 'corpus-reachable-no-bbbp-test'} (" in aot.load_sample(paper, 4, sample=64,
                                                                              log=lambda *a: None).shapes_from


def test_compile_help_lists_no_workdir(capsys):
    from chmr_jax import cli
    assert cli.main(["compile", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--topology" in text and "--workdir" not in text and "--probe_memory_gib" in text


def test_chip_units_are_the_vendors():
    """v5e / v5p / v6e state HBM in GB (10^9), v4 in GiB; the clock converting XLA's cycles is the peak
    rate over the matrix units' FLOPs per cycle (v4's 1.05 GHz is its published clock)."""
    assert aot.CHIPS["v5e"].hbm_bytes == 16 * 10 ** 9 and aot.CHIPS["v5p"].hbm_bytes == 95 * 10 ** 9
    assert aot.CHIPS["v4"].hbm_bytes == 32 * 2 ** 30 and aot.CHIPS["v5e"].hbm_text() == "16 GB"
    assert aot.CHIPS["v4"].clock_hz == pytest.approx(1.05e9, rel=0.01)


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
def test_tpu_programs_flops_loops_ici_and_host_calls():
    """Closed forms on programs compiled for v5e chips: a batched einsum and a vmapped bf16 matmul count
    2 b m n k FLOPs (TPU lowers them as dilated convolutions, which the old formula over-counted 8x and
    16x: issue 34 §3); a 6-trip fori_loop reads 6 trips from the compiled loop and its FLOPs count 6 x
    2 n^3 (XLA's own analysis reports one trip); a ring of 3 permute-and-matmul steps in a shard_map over
    4 chips counts every chip's matmuls; a psum of f32[1024] over 4 chips sends 2 x 3/4 x 4 KiB per chip;
    a pure_callback is a host call."""
    r = _run("""
        import json, numpy as np, jax, jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P
        from chmr_jax.training import aot, utilisation
        from chmr_jax.training.aot import cost, hlo
        devs = aot.tpu_devices(aot.parse_topology("v5e-4"))
        one = jax.sharding.Mesh(np.array(devs[:1]), ("d",))
        four = jax.sharding.Mesh(np.array(devs), ("data",))
        S = lambda shape, dtype=jnp.float32, mesh=one, spec=P(): jax.ShapeDtypeStruct(shape, dtype,
                                                                                     sharding=NamedSharding(mesh, spec))
        out = {}
        f = lambda a, b: jnp.einsum("bij,bjk->bik", a, b)
        out["einsum"] = utilisation.program_flops(jax.jit(f), S((16, 256, 512)), S((16, 512, 128)))
        out["vmap"] = utilisation.program_flops(jax.jit(jax.vmap(jnp.matmul)), S((16, 193, 300), jnp.bfloat16),
                                                S((16, 300, 193), jnp.bfloat16))
        x = S((512, 512))
        fori = jax.jit(lambda x: jax.lax.fori_loop(0, 6, lambda i, y: jnp.tanh(y @ x), x))
        c = fori.lower(x).compile()
        pc = cost.program_cost(hlo.module_proto(c), 1)
        out["fori"] = {"flops": utilisation.program_flops(fori, x), "trips": [lp["trips"] for lp in pc["loops"]],
                       "xla": c.cost_analysis()["flops"]}
        def ring(x, w):
            def body(x, w):
                def step(c, _):
                    c = jax.lax.ppermute(c, "data", [(i, (i + 1) % 4) for i in range(4)])
                    return c, c @ w
                return jax.lax.scan(step, x, None, length=3)[1]
            return jax.shard_map(body, mesh=four, in_specs=(P("data"), P()), out_specs=P(None, "data"))(x, w)
        out["ring"] = utilisation.program_flops(jax.jit(ring), S((64, 128), mesh=four, spec=P("data")),
                                                S((128, 256), mesh=four))
        psum = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "data"), mesh=four, in_specs=P("data"), out_specs=P()))
        c = psum.lower(S((4096,), mesh=four, spec=P("data"))).compile()
        out["psum_ici"] = cost.program_cost(hlo.module_proto(c), 4)["ici_bytes"]
        cb = jax.jit(lambda x: jax.pure_callback(lambda a: np.asarray(a), jax.ShapeDtypeStruct(x.shape, x.dtype), x) + 1)
        out["host"] = cost.host_calls(hlo.module_proto(cb.lower(x).compile()))
        out["fori_host"] = cost.host_calls(hlo.module_proto(fori.lower(x).compile()))
        out["limit"] = aot.hbm_limit(devs)
        print(json.dumps(out))
    """)
    assert r["einsum"] == 2 * 16 * 256 * 512 * 128
    assert r["vmap"] == 2 * 16 * 193 * 300 * 193
    assert r["fori"]["trips"] == [6] and r["fori"]["flops"] == pytest.approx(6 * 2 * 512 ** 3, rel=1e-3)
    assert r["fori"]["xla"] < 2 * 2 * 512 ** 3            # why XLA's own count is not used
    # 4 chips x 3 steps x a [16,128] @ [128,256] (XLA's count of the loop bookkeeping differs by a few FLOPs;
    # counting the shard_map body once, as before, gives a quarter of this)
    assert r["ring"] == pytest.approx(4 * 3 * 2 * 16 * 128 * 256, rel=1e-5)
    assert r["psum_ici"] == pytest.approx(2 * 3 / 4 * 1024 * 4)
    assert r["host"] and r["fori_host"] == []
    assert r["limit"] == int(15.75 * 2 ** 30)              # what the TPU compiler lets a v5e program use


@needs_libtpu
def test_compile_tiny_step_for_v5e_4(tmp_path):
    """The done-when command: the tiny config's step for 4 v5e chips, compiled here, fits, has no host
    callback (the collapse diagnostics use XLA's eigh on TPU), donates its state, and writes the
    compiler's estimate beside the two rooflines, the ICI bytes and the compiler's peak memory. The
    first line names the shapes' corpus; libtpu's no-TPU warnings are not printed."""
    out = tmp_path / "x.json"
    env = {**os.environ, "CHMR_CACHE_DIR": str(tmp_path / "cache")}   # the generated corpus: no data needed
    p = subprocess.run([sys.executable, "-m", "chmr_jax.cli", "compile", "--config", str(ROOT / "configs/test.py"),
                        "--topology", "v5e-4", "--out", str(out)], capture_output=True, text=True, env=env,
                       timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.splitlines()[0].startswith("shapes from: the config's corpus (kind=synthetic")
    assert "Failed to find host bounds" not in p.stderr and "unexpected worker hostname" not in p.stderr
    row = json.loads(out.read_text())
    for field in aot.ROW_FIELDS:
        assert row[field] is not None, field
    assert row["topology"] == "v5e:2x2" and row["chips"] == 4 and row["device_kind"] == "TPU v5 lite"
    assert row["hbm_bytes"] == 16 * 10 ** 9 and row["hbm_limit_bytes"] == int(15.75 * 2 ** 30)
    m = row["memory"]
    assert row["per_chip_bytes"] == m["arguments"] + m["outputs"] + m["temporaries"] - m["aliased"]
    assert row["fits"] is (row["peak_bytes_per_chip"] <= row["hbm_limit_bytes"]) is True
    assert row["host_calls"] == [] and row["donated"] is True and m["aliased"] > 0
    assert row["step_s_xla"] == pytest.approx(row["estimated_cycles"] / aot.CHIPS["v5e"].clock_hz)
    assert row["estimated_step_s"] == row["step_s_xla"] and row["estimate_source"] == "xla_estimated_cycles"
    assert row["step_s_hbm_roofline"] <= row["step_s_all_memory_roofline"]
    assert row["hbm_bytes_accessed_per_chip"] <= row["bytes_accessed_per_chip"]
    assert row["ici_bytes_per_chip"] > 0                   # the gradients' all-reduce over 4 chips
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
    assert row["fits"] is False and row["per_chip_bytes"] > row["hbm_limit_bytes"] > 15 * 2 ** 30
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


# ---- compile --inputs: the input build's device programs (issue 31 item 5) ----------------------------

@pytest.mark.parametrize("flags,says", [(["--molecules", "0"], "--molecules must be at least 1, got 0"),
                                        (["--molecules", "-5"], "at least 1, got -5"),
                                        (["--inputs", "--molecules", "1"], "at least 2 with --inputs")])
def test_compile_bad_molecules_is_one_line(tmp_path, flags, says):
    p = subprocess.run([sys.executable, "-m", "chmr_jax.cli", "compile", "--config", str(ROOT / "configs/test.py"),
                        "--topology", "v5e-4", *flags], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and says in p.stderr


@needs_libtpu
def test_compile_inputs_writes_the_input_programs(tmp_path):
    """--inputs --molecules 4096 on 4 v5e chips: the step's context is scaled to N and the build's own
    programs are compiled at N: the kNN once, propagation once per chunk width (test.py's modalities:
    cell 20, gene 10, expression 10 columns, all narrower than the TPU chunk of 256: widths 20 and 10,
    1 and 2 calls), the held-out views the same programs 5 folds over."""
    out = tmp_path / "x.json"
    env = {**os.environ, "CHMR_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-m", "chmr_jax.cli", "compile", "--config", str(ROOT / "configs/test.py"),
                        "--topology", "v5e-4", "--inputs", "--molecules", "4096", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert "context arrays for 4,096 molecules" in lines[0]
    assert lines[2].startswith("programs: the pretraining step and the input build") and "N = 4,096" in lines[2]
    row = json.loads(out.read_text())
    assert set(aot.ROW_FIELDS) <= set(row) and row["context_molecules"] == 4096 and row["fits"] is True
    progs = {r["name"]: r for r in row["input_programs"]}
    assert list(progs) == ["knn", "propagation c=20", "propagation c=10", "held_out c=20", "held_out c=10"]
    assert [progs[n]["calls"] for n in progs] == [1, 1, 2, 5, 10]
    for r in progs.values():
        assert r["per_chip_bytes"] > 0 and r["fits"] is True and r["molecules"] == 4096
        assert r["est_s_per_call"] > 0 and r["host_calls"] == []
    assert progs["knn"]["layout"]["n"] == 4096 and progs["knn"]["database"] == "replicated"
    assert progs["knn"]["layout"]["k"] == 5 and progs["propagation c=20"]["assumed"]["rows_per_device"] == 1024
    assert progs["held_out c=10"]["per_chip_bytes"] == progs["propagation c=10"]["per_chip_bytes"]
    assert row["input_build_est_s"] == pytest.approx(sum(r["est_s_per_call"] * r["calls"] for r in progs.values()))


@needs_libtpu
def test_input_program_memory_against_closed_forms():
    """The kNN and propagation programs at N = 8192, k = 10, 32 bytes of packed bits, on 4 and 8 v5e chips.
    kNN arguments per chip: its query rows' bits, counts and ids (N / chips x 40 bytes) plus the database:
    replicated, all N x 40 bytes (so doubling the chips saves only the query half), or sharded, N / chips
    x 40; the scalar n_real takes a 512-byte tile. Propagation's arguments halve with twice the chips
    (rows split); the ELL layout and the COO rows it does not read under bcsr (R x 20 x 8 + 2 k R x 4
    bytes) are counted as left on the devices, not as arguments."""
    r = _run("""
        import json, jax
        from chmr_jax.mechanisms import propagation
        from chmr_jax.training import aot, train
        from chmr_jax.training.aot import inputs
        out = {}
        for topo in ("v5e-4", "v5e-8"):
            spec = aot.parse_topology(topo)
            devs = aot.tpu_devices(spec)
            mesh, lim = train.data_mesh(devs), aot.hbm_limit(devs)
            for sharded in (False, True):
                lay = propagation.knn_layout(8192, 10, len(devs), 512, 2048, sharded)
                row = inputs.compile_program("knn", propagation.knn_program(mesh, lay),
                                             inputs.knn_arguments(lay, 32, mesh), spec, devs, lim)
                out[f"{topo} knn {sharded}"] = row["memory"]["arguments"]
            g = inputs.graph_shapes(8192, len(devs), 10)
            row = inputs.compile_program("p", propagation.propagation_program(mesh, 5),
                                         inputs.propagation_arguments(g, len(devs), 64, mesh), spec, devs, lim)
            out[f"{topo} prop"] = [row["memory"]["arguments"], row["unread_argument_bytes_per_chip"], row["per_chip_bytes"]]
        print(json.dumps(out))
    """)
    n, b = 8192, 32 + 4 + 4
    for chips in (4, 8):
        q = n // chips * b
        assert r[f"v5e-{chips} knn False"] == pytest.approx(q + n * b + 4, abs=1024)
        assert r[f"v5e-{chips} knn True"] == pytest.approx(2 * q + 4, abs=1024)
        rows = n // chips
        assert r[f"v5e-{chips} prop"][1] == pytest.approx(rows * 20 * 8 + 2 * 10 * rows * 4, rel=0.02)
    assert 0.45 < r["v5e-8 prop"][0] / r["v5e-4 prop"][0] < 0.55
    assert r["v5e-8 knn False"] > r["v5e-4 knn False"] / 2      # replicated: the database does not shrink
