"""gs:// workdirs against a GCS emulator on 127.0.0.1 (tests/gcs_emulator.py, started and stopped here),
workdirs where directories cannot be renamed (a gcsfuse mount), and a bucket that does not answer."""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

import chmr_jax
import pytest

from chmr_jax import cli
from chmr_jax.data import files, paths
from chmr_jax.training import checkpoint as checkpoint_lib, metric_writers, pretrain

ROOT = Path(__file__).resolve().parents[1]
TEST_CONFIG = str(ROOT / "configs" / "test.py")
BUCKET = "test-bucket"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _storage_env(url: str) -> dict:
    # gcsfs (etils.epath's gs:// backend) and tensorstore (Orbax's array writer) at the emulator.
    # GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs's default file system first asks the bucket's
    # layout over gRPC, which the emulator does not serve (a 60 s wait per bucket, retried per call).
    return {"STORAGE_EMULATOR_HOST": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x"}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    pytest.importorskip("gcp_storage_emulator")
    pytest.importorskip("gcsfs")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "gcs_emulator.py"), "start", "--host", "127.0.0.1",
                             "--port", str(port), "--in-memory", "--default-bucket", BUCKET],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180   # a hang guard: a loaded machine starts the emulator slowly
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the GCS emulator did not start: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.2)
    yield _storage_env(f"http://127.0.0.1:{port}")
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


@pytest.fixture
def gcs(emulator, monkeypatch):
    """The emulator's variables in this process too (before gcsfs is first imported)."""
    for k, v in emulator.items():
        monkeypatch.setenv(k, v)
    # gcsfs picks its class when first imported; make sure it is the plain one (no gRPC layout probe) even
    # if something imported gcsfs before this fixture, and that etils makes a new file system for the emulator.
    import fsspec
    import gcsfs.core
    from etils.epath import backend
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, gcsfs.core.GCSFileSystem, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    return emulator


def _bucket(env):
    import gcsfs
    # An independent reader: gcsfs itself, not chmr_jax's paths / etils.
    return gcsfs.core.GCSFileSystem(endpoint_url=env["STORAGE_EMULATOR_HOST"], token="anon")


def _rows(fs, key):
    fs.invalidate_cache()
    return {r["step"]: r["loss"] for r in map(json.loads, fs.cat(key).decode().splitlines())}


def _committed(fs, key):
    fs.invalidate_cache()   # (gcsfs caches listings)
    return sorted(int(p.rsplit("/", 1)[1]) for p in fs.ls(key) if fs.exists(f"{p}/commit_success.txt"))


def test_paths_local_and_remote(tmp_path, gcs, monkeypatch):
    assert paths.as_path("gs://b/run") == paths.as_path(Path("gs://b/run"))   # pathlib's "gs:/b/run" too
    assert str(paths.as_path(Path("gs://b/run")) / "x.json") == "gs://b/run/x.json"
    assert paths.as_path("rel") == Path("rel").resolve() and not paths.is_remote(tmp_path)
    with pytest.raises(ValueError, match="--workdir=gs://b/stress: this command writes a local folder"):
        paths.local_only("gs://b/stress", "--workdir")
    assert not Path("gs:").exists()
    mounts = f"/dev/sda1 / ext4 rw 0 0\nbucket {tmp_path}/mnt fuse.gcsfuse rw 0 0\ntmpfs {tmp_path}/mnt/t tmpfs rw 0 0\n"
    assert paths._fuse_mount(tmp_path / "mnt" / "run", mounts) == f"{tmp_path}/mnt"
    assert paths._fuse_mount(tmp_path / "mnt" / "t" / "run", mounts) is None   # a mount inside it wins
    assert paths._fuse_mount(tmp_path / "other", mounts) is None
    # An object write is verified by reading it back; a missing bucket is named in one line.
    files.atomic_write_text(f"gs://{BUCKET}/unit/a.json", '{"a": 1}')
    assert _bucket(gcs).cat(f"{BUCKET}/unit/a.json") == b'{"a": 1}'
    with pytest.raises(paths.StorageUnreachable, match="bucket gs://no-such-bucket does not exist"):
        paths.check_reachable("gs://no-such-bucket/run", "--workdir")
    # metrics.jsonl on gs://: rows after the resumed-from step dropped, new rows uploaded at sync().
    w = metric_writers.JsonlWriter(f"gs://{BUCKET}/unit/metrics.jsonl")
    for step in (1, 2, 3):
        w.write(step, {"loss": float(step)})
    w.close()
    w = metric_writers.JsonlWriter(f"gs://{BUCKET}/unit/metrics.jsonl", resume_step=2)
    w.write(3, {"loss": 30.0})
    w.sync()
    assert _rows(_bucket(gcs), f"{BUCKET}/unit/metrics.jsonl") == {1: 1.0, 2: 2.0, 3: 30.0}
    w.close()


def test_a_bucket_folder_is_mirrored_both_ways_and_only_what_differs_moves(tmp_path, gcs, monkeypatch):
    monkeypatch.setenv(paths.MIRROR_ENV, str(tmp_path / "mirror"))
    fs = _bucket(gcs)
    assert paths.mirror_of("gs://b/data/") == tmp_path / "mirror" / "gs" / "b" / "data"
    assert paths.remote_of(tmp_path / "mirror" / "gs" / "b" / "data" / "x.csv") == "gs://b/data/x.csv"
    assert paths.remote_of(tmp_path / "elsewhere") is None and paths.push(tmp_path / "elsewhere") == 0
    assert paths.remote_of(tmp_path / "mirror" / "work" / "features") is None   # under the root, not a mirror
    # Objects without an MD5 (composite uploads) are compared by CRC32C (reference: google_crc32c itself).
    import base64
    import google_crc32c
    (tmp_path / "f.bin").write_bytes(b"abc" * 1000)
    crc = base64.b64encode(google_crc32c.value(b"abc" * 1000).to_bytes(4, "big")).decode()
    assert paths._same(tmp_path / "f.bin", {"size": 3000, "crc32c": crc})
    assert not paths._same(tmp_path / "f.bin", {"size": 3000, "crc32c": base64.b64encode(b"\0\0\0\0").decode()})
    assert not paths._same(tmp_path / "f.bin", {"size": 3000})     # no digest: not known to be the same
    with pytest.raises(FileNotFoundError, match=f"--data_dir=gs://{BUCKET}/typo: the bucket holds no objects"):
        paths.resolve_data_dir(f"gs://{BUCKET}/typo")
    with pytest.raises(ValueError, match="name a bucket folder"):
        paths.mirror_of("gs://b/../c")
    for key, data in (("m/a.csv", b"a,b\n1,2\n"), ("m/sub/b.npy", b"\x93NUMPY" + bytes(range(200))),
                      ("m/c.json.tmp123", b"half"), ("m/.hidden", b"h")):
        fs.pipe(f"{BUCKET}/{key}", data)
    local = paths.resolve_data_dir(f"gs://{BUCKET}/m")     # a data dir URL: pulled, its mirror returned
    assert local == paths.mirror_of(f"gs://{BUCKET}/m")
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*")
                  if p.is_file() and p.name != paths._PULLED) == ["a.csv", "sub/b.npy"]   # (_PULLED: what it pulled)
    assert (local / "sub" / "b.npy").read_bytes() == fs.cat(f"{BUCKET}/m/sub/b.npy")   # temporaries never move
    stamp = (local / "a.csv").stat().st_mtime_ns, (local / "a.csv").stat().st_ino
    fs.pipe(f"{BUCKET}/m/sub/b.npy", b"changed")
    paths.pull(f"gs://{BUCKET}/m")
    assert ((local / "a.csv").stat().st_mtime_ns, (local / "a.csv").stat().st_ino) == stamp   # unchanged: not fetched
    assert (local / "sub" / "b.npy").read_bytes() == b"changed"
    # A damaged download (here: the object changes between the listing and the copy) is an error, not a file.
    import fsspec
    ours = fsspec.core.url_to_fs(f"gs://{BUCKET}/m")[0]   # the file system paths.pull / push use (cached by fsspec)
    get_file = ours._get_file   # (pull fetches its list in one batch: gcsfs's async per-file coroutine)

    async def damaging_get_file(rpath, lpath, **k):
        await get_file(rpath, lpath, **k)
        Path(lpath).write_bytes(b"X")
    monkeypatch.setattr(ours, "_get_file", damaging_get_file)
    fs.pipe(f"{BUCKET}/m/a.csv", b"a,b\n3,4\n")
    with pytest.raises(OSError, match="a.csv: the downloaded copy differs from the object"):
        paths.pull(f"gs://{BUCKET}/m")
    monkeypatch.setattr(ours, "_get_file", get_file)
    assert (local / "a.csv").read_bytes() == b"a,b\n1,2\n" and not list(local.glob("a.csv.tmp*"))
    # push: new and changed files go up (oldest first), identical ones and temporaries do not.
    cache = paths.resolve_cache_dir(f"gs://{BUCKET}/cache")
    (cache / "x.npz").write_bytes(b"x" * 10)
    (cache / "x.npz.tmp77").write_bytes(b"partial")
    (cache / "d").mkdir()
    (cache / "d" / "manifest.json").write_text("{}")
    sent = []
    put_file = ours.put_file
    monkeypatch.setattr(ours, "put_file", lambda lpath, rpath, **k: (sent.append(Path(lpath).name),
                                                                     put_file(lpath, rpath, **k))[1])
    for f in (cache / "x.npz", cache / "d" / "manifest.json"):
        os.utime(f, ns=(1, 1))   # equal file times (coarse clocks): a manifest still goes up after what it lists
    assert paths.push(cache) == 2 and sent == ["x.npz", "manifest.json"]
    assert fs.cat(f"{BUCKET}/cache/d/manifest.json") == b"{}" and not fs.exists(f"{BUCKET}/cache/x.npz.tmp77")
    assert paths.push(cache) == 0                             # nothing differs now
    (cache / "x.npz").write_bytes(b"y" * 10)                 # same size, other bytes: the MD5 tells
    assert paths.push(cache) == 1 and fs.cat(f"{BUCKET}/cache/x.npz") == b"y" * 10
    # A data dir's mirror drops what the bucket no longer holds (a cache's does not: another process may
    # have just written an entry it has not uploaded yet).
    fs.rm(f"{BUCKET}/m/sub/b.npy")
    (cache / "only_here.npz").write_bytes(b"z")
    (local / "fetched.csv").write_text("x")   # put there by this host (a public file downloaded into the data dir)
    assert paths.resolve_data_dir(f"gs://{BUCKET}/m") == local and not (local / "sub" / "b.npy").exists()
    assert (local / "fetched.csv").exists()   # pruning drops only what an earlier pull brought down
    assert (local / "a.csv").exists() and paths.resolve_cache_dir(f"gs://{BUCKET}/cache") == cache
    assert (cache / "only_here.npz").exists()
    # Outputs are staged in a fresh folder per job: a copy of the bucket folder, uploaded with push(to=), deleted
    # after; a killed job's folder (its process gone) is removed by the next job.
    gone = subprocess.Popen(["true"])
    owner = paths._owner(gone.pid)
    gone.wait()
    stale = tmp_path / "mirror" / ".staged" / ("+".join(owner) + "-abc")
    stale.mkdir(parents=True)
    with paths.staged(f"gs://{BUCKET}/cache", "--out") as out:
        assert out.parent == tmp_path / "mirror" / ".staged" and not stale.exists()
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["d/manifest.json", "x.npz"]
        (out / "new.json").write_text("[]")
        assert paths.push(out, "--out", to=f"gs://{BUCKET}/cache") == 1
    assert not out.exists() and fs.cat(f"{BUCKET}/cache/new.json") == b"[]"


def _build_entry(cache: Path, entry: str, host: str) -> Path:
    """One host's build of a content-keyed cache entry: the same arrays everywhere, a manifest that says when
    and where it was built (as the corpus manifest's created_unix and local source paths do)."""
    d = cache / entry
    d.mkdir(parents=True)
    (d / "values.npy").write_bytes(b"\x93NUMPY same arrays" * 500)
    (d / "keys.npy").write_bytes(b"\x93NUMPY same keys" * 50)
    (d / "manifest.json").write_text(json.dumps({"created_unix": time.time_ns(), "sources": [str(cache / host)]}))
    return d


def test_two_mirrors_push_the_same_cache_entry_and_both_succeed_with_one_object(gcs, tmp_path, monkeypatch):
    fs = _bucket(gcs)
    url = f"gs://{BUCKET}/race"
    caches = {}
    for host in ("a", "b"):
        monkeypatch.setenv(paths.MIRROR_ENV, str(tmp_path / host))
        caches[host] = paths.resolve_cache_dir(url)
        _build_entry(caches[host], "corpus-x", host)
    # Both hosts listed the bucket before either uploaded (the race): b's creates find a's objects.
    monkeypatch.setenv(paths.MIRROR_ENV, str(tmp_path / "a"))
    assert paths.push(caches["a"]) == 3
    real_listing = paths._listing
    monkeypatch.setattr(paths, "_listing", lambda fs, key: {})
    monkeypatch.setenv(paths.MIRROR_ENV, str(tmp_path / "b"))
    assert paths.push(caches["b"]) == 0    # nothing of b's replaced a's, and no error
    monkeypatch.setattr(paths, "_listing", real_listing)
    fs.invalidate_cache()
    assert sorted(fs.ls(f"{BUCKET}/race/corpus-x")) == [f"{BUCKET}/race/corpus-x/{n}"
                                                        for n in ("keys.npy", "manifest.json", "values.npy")]
    for host in ("a", "b"):   # one entry: a's, which b's mirror now holds too
        for f in (caches[host] / "corpus-x").iterdir():
            assert fs.cat(f"{BUCKET}/race/corpus-x/{f.name}") == (caches["a"] / "corpus-x" / f.name).read_bytes() \
                == f.read_bytes()

    # The same, for real: two processes with their own mirrors push the same entry at once (3 trials; the
    # break-in's push failed in 3 of 4). (A host that lists after the other's upload replaces a manifest that
    # differs, as for any changed file: still one object, one host's.)
    env = {**os.environ, **gcs, "PYTHONPATH": str(ROOT)}
    script = ("import sys, os, time; from pathlib import Path; from chmr_jax.data import paths\n"
              "cache = paths.resolve_cache_dir(sys.argv[1])\n"
              "while not Path(sys.argv[2]).exists(): time.sleep(0.01)\n"
              "print('sent', paths.push(cache))")
    for trial in range(3):
        procs = []
        for host in ("a", "b"):
            mirror = tmp_path / f"t{trial}{host}"
            _build_entry(mirror / "gs" / BUCKET / f"race{trial}", "corpus-x", host)
            procs.append(subprocess.Popen([sys.executable, "-c", script, f"{url}{trial}", str(tmp_path / f"go{trial}")],
                                          env={**env, paths.MIRROR_ENV: str(mirror)}, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        time.sleep(2)   # (both started and waiting: then both push at once)
        (tmp_path / f"go{trial}").touch()
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert sorted(int(o.strip().splitlines()[-1].split()[1]) for o in outs)[-1] >= 1, outs
        fs.invalidate_cache()
        assert len(fs.ls(f"{BUCKET}/race{trial}/corpus-x")) == 3
        manifest = fs.cat(f"{BUCKET}/race{trial}/corpus-x/manifest.json")
        built = [tmp_path / f"t{trial}{host}" / "gs" / BUCKET / f"race{trial}" / "corpus-x" for host in ("a", "b")]
        assert manifest in [(d / "manifest.json").read_bytes() for d in built]   # one host's, whole
        for d in built:
            for name in ("values.npy", "keys.npy"):
                assert (d / name).read_bytes() == fs.cat(f"{BUCKET}/race{trial}/corpus-x/{name}")


def test_a_staging_folder_is_removed_only_when_its_owner_is_provably_gone(gcs, tmp_path, monkeypatch):
    """The mirror root may be shared by hosts (an NFS home) or containers: a bare pid says nothing there."""
    monkeypatch.setenv(paths.MIRROR_ENV, str(tmp_path / "mirror"))
    base = tmp_path / "mirror" / ".staged"
    base.mkdir(parents=True)
    me = paths._owner()
    dead = subprocess.Popen(["true"])
    gone = paths._owner(dead.pid)
    dead.wait()
    live = subprocess.Popen(["sleep", "600"])
    owners = {"other_host": gone[:4] + ("otherhost",), "other_namespace": gone[:2] + ("4026500000",) + me[3:],
              "other_boot": gone[:3] + ("0" * 16,) + me[4:], "live_here": paths._owner(live.pid),
              "dead_here": gone, "pid_reused": (me[0], "1") + me[2:]}
    folders = {name: base / ("+".join(o) + "-x" + name.replace("_", "")) for name, o in owners.items()}
    folders["before_owners"] = base / f"{dead.pid}-abc"   # (a name of the earlier format)
    for f in folders.values():
        f.mkdir()
        (f / "plan.json").write_text("{}")
    try:
        with paths.staged(f"gs://{BUCKET}/staged_owner", "--out") as mine:
            assert mine.name.startswith("+".join(me) + "-")
            assert sorted(n for n, f in folders.items() if f.exists()) == [
                "before_owners", "live_here", "other_boot", "other_host", "other_namespace"]
            assert all((f / "plan.json").exists() for f in folders.values() if f.exists())
    finally:
        live.kill()
        live.wait()
    assert not mine.exists()
    # An owner this host cannot check is given up only when nothing in its folder changed for a week.
    week_ago = time.time() - paths.STAGED_STALE_S - 60
    for f in (folders["other_host"], folders["other_host"] / "plan.json"):
        os.utime(f, (week_ago, week_ago))
    with paths.staged(f"gs://{BUCKET}/staged_owner", "--out"):
        assert sorted(n for n, f in folders.items() if f.exists()) == ["before_owners", "other_boot", "other_namespace"]

    # A real second PID namespace (as a container sharing this mirror): its live job's folder is kept.
    if subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --pid needs privileges here")
    script = ("import sys, time; from pathlib import Path; from chmr_jax.data import paths\n"
              "with paths.staged(sys.argv[1], '--out') as d:\n"
              "    (d / 'plan.json').write_text('{}'); print(d, flush=True)\n"
              "    while not Path(sys.argv[2]).exists(): time.sleep(0.05)\n")
    other = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", script,
                              f"gs://{BUCKET}/staged_owner", str(tmp_path / "done")],
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        theirs = Path(other.stdout.readline().strip())
        assert theirs.parent == base and theirs.name.split("+")[2] != me[2]   # (another namespace)
        with paths.staged(f"gs://{BUCKET}/staged_owner", "--out"):
            assert (theirs / "plan.json").exists()
    finally:
        (tmp_path / "done").touch()
        other.wait(timeout=60)
    assert other.returncode == 0 and not theirs.exists()


# Process 0's metric writers on a gs:// workdir, then a SIGKILL: rows 1..3 written, each flushed as the loop does
# (uploaded at once: no upload interval here), the job killed.
KILLED_WRITERS = """
import os, signal, sys
from chmr_jax.training import metric_writers
metric_writers.UPLOAD_EVERY_S = 0
w = metric_writers.MetricWriters(sys.argv[1])
for step in (1, 2, 3):
    w.write(step, {"loss": 1.0 / step})
    w.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_gs_metric_writers_leave_no_local_staging_even_when_killed(gcs, tmp_path):
    """TensorBoard events of a gs:// workdir are written in memory and uploaded whole: a SIGKILLed job leaves
    no /tmp/chmr_tb_* (nor anything else) behind, and the events it synced decode."""
    from helpers import event_class, read_event_records
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, **gcs, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT), paths.MIRROR_ENV: str(tmp_path / "m")}
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITERS, f"gs://{BUCKET}/tb_run"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert list(tmp.iterdir()) == [] and not (tmp_path / "gs:").exists()
    fs = _bucket(gcs)
    fs.invalidate_cache()
    (event_file,) = fs.ls(f"{BUCKET}/tb_run/tensorboard")
    assert event_file.rsplit("/", 1)[1].startswith("events.out.tfevents.")
    fs.get(event_file, str(tmp_path / "events"))
    Event = event_class()
    scalars = [(e.step, v.tag, round(v.simple_value, 4)) for e in map(Event.FromString, read_event_records(
        tmp_path / "events")) for v in e.summary.value]
    assert scalars == [(1, "loss", 1.0), (2, "loss", 0.5), (3, "loss", 0.3333)]
    assert [r["step"] for r in metric_writers.read_jsonl(f"gs://{BUCKET}/tb_run/metrics.jsonl")] == [1, 2, 3]


def test_a_corrupt_gs_checkpoint_is_copied_aside_and_the_older_one_restored(gcs):
    import jax.numpy as jnp
    fs = _bucket(gcs)
    state = {"params": {"w": jnp.arange(12.0).reshape(3, 4)}, "rest": {"b": jnp.zeros(2)}}
    ckpt = checkpoint_lib.Checkpointer(f"gs://{BUCKET}/q/checkpoints", max_to_keep=None)
    assert ckpt.dir_renames is False
    for step in (1, 2):
        ckpt.save(step, jax.tree.map(lambda x: x + step, state), {"step": step})
    ckpt.close()
    fs.invalidate_cache()
    for key in fs.find(f"{BUCKET}/q/checkpoints/2/state"):
        if "/d/" in key:
            fs.pipe(key, b"garbage")
    ckpt = checkpoint_lib.Checkpointer(f"gs://{BUCKET}/q/checkpoints", max_to_keep=None, log=lambda *a: None)
    restored, meta = ckpt.restore_newest_good(state)
    assert meta["step"] == 1 and ckpt.all_steps() == [1]
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.arange(12.0).reshape(3, 4) + 1)
    fs.invalidate_cache()
    aside = fs.ls(f"{BUCKET}/q/corrupt")
    assert len(aside) == 1 and aside[0].rsplit("/", 1)[1].startswith("2-")
    assert fs.exists(f"{aside[0]}/commit_success.txt") and not fs.exists(f"{BUCKET}/q/checkpoints/2/commit_success.txt")
    # The run goes on and saves step 2 again: Orbax's file system (etils' gcsfs) must not still list the old
    # step 2 (its rm of the stale listing raised FileNotFoundError and ended the run).
    ckpt.save(2, jax.tree.map(lambda x: x + 20, state), {"step": 2})
    ckpt.close()
    assert _committed(fs, f"{BUCKET}/q/checkpoints") == [1, 2]
    again, meta = checkpoint_lib.Checkpointer(f"gs://{BUCKET}/q/checkpoints", max_to_keep=None).restore_newest_good(state)
    assert meta["step"] == 2
    np.testing.assert_array_equal(np.asarray(again["params"]["w"]), np.arange(12.0).reshape(3, 4) + 20)


# One of 2 JAX processes (CPU, gloo, one device each) checkpointing a small replicated state into a gs://
# folder: phase "save" writes steps 1 and 2; phase "resume" restores the newest good step, saves step 2
# again and closes (its read-back check included), then writes what it restored to OUT/<process>.json.
TWO_PROCESS_GS_CHECKPOINT = """
import json, sys
port, pid, directory, out, phase = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from chmr_jax.training import checkpoint, train
replicated = NamedSharding(train.data_mesh(jax.devices()), PartitionSpec())
def state(scale):
    g = lambda a: jax.make_array_from_callback(a.shape, replicated, lambda index: a[index])
    return {"params": {"w": g(np.full((64, 16), scale, np.float32))}, "rest": {"mean": g(np.ones(3, np.float32))}}
warnings = []
ckpt = checkpoint.Checkpointer(directory, max_to_keep=None, log=warnings.append)
if phase == "save":
    for step in (1, 2):
        ckpt.save(step, state(float(step)), {"step": step})
else:
    restored, meta = ckpt.restore_newest_good(state(0.0))
    ckpt.save(2, state(20.0), {"step": 2})
    ckpt.close()
    again, meta2 = checkpoint.Checkpointer(directory, max_to_keep=None).restore_newest_good(state(0.0))
    open(f"{out}/{pid}.json", "w").write(json.dumps({"restored": meta["step"], "w": float(train.host_array(
        restored["params"]["w"])[0, 0]), "then": meta2["step"], "w2": float(train.host_array(again["params"]["w"])[0, 0]),
        "warnings": warnings}))
ckpt.close()
"""


def _flip_largest_data_file(fs, step_key):
    """64 bytes flipped in the middle of the largest `d/` file of a checkpoint step (as the break-in did)."""
    fs.invalidate_cache()
    key = max((k for k in fs.find(step_key) if "/d/" in k), key=fs.size)
    data = bytearray(fs.cat(key))
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    fs.pipe(key, bytes(data))


def test_two_processes_set_a_corrupt_gs_checkpoint_aside_and_save_that_step_again(gcs, tmp_path):
    env = {**os.environ, **gcs, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "PYTHONPATH": str(ROOT)}
    directory = f"gs://{BUCKET}/mp/checkpoints"

    def both(phase):
        port = _free_port()
        procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_GS_CHECKPOINT, str(port), str(i), directory,
                                   str(tmp_path), phase], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for i in (0, 1)]
        try:
            outs = [p.communicate(timeout=300)[0] for p in procs]   # (the old code hung in the save, then aborted)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for i, o in enumerate(outs):
            (tmp_path / f"{phase}_{i}.log").write_text(o)
        assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)

    fs = _bucket(gcs)
    both("save")
    assert _committed(fs, f"{BUCKET}/mp/checkpoints") == [1, 2]
    _flip_largest_data_file(fs, f"{BUCKET}/mp/checkpoints/2/state")
    both("resume")
    got = [json.loads((tmp_path / f"{i}.json").read_text()) for i in (0, 1)]
    assert [(g["restored"], g["w"], g["then"], g["w2"]) for g in got] == [(1, 1.0, 2, 20.0)] * 2
    assert "step 2 is corrupt" in got[0]["warnings"][0]
    assert _committed(fs, f"{BUCKET}/mp/checkpoints") == [1, 2]
    assert [p.rsplit("/", 1)[1].split("-")[0] for p in fs.ls(f"{BUCKET}/mp/corrupt")] == ["2"]


def test_two_process_pretraining_resumes_past_a_corrupt_gs_checkpoint_and_finishes(gcs, cache_dir, tmp_path):
    """launch/two_process.sh with a gs:// workdir: 4 steps (checkpoints 2, 4), step 4 damaged, then 6 steps: both
    processes set step 4 aside, resume from 2, save 4 again and finish (the break-in's process 0 crashed and
    process 1 hung in that save). No local `gs:` folder and no /tmp/chmr_tb_* either."""
    logs, tmp = tmp_path / "logs", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, **gcs, "PYTHON": sys.executable, "LOG_DIR": str(logs), "TMPDIR": str(tmp),
           paths.MIRROR_ENV: str(tmp_path / "host%i"), "PYTHONPATH": str(ROOT)}

    def run(steps):
        out = subprocess.run(["bash", str(ROOT / "launch" / "two_process.sh"), f"gs://{BUCKET}/mp_run", "--config",
                              TEST_CONFIG, f"--config.cache_dir={cache_dir}", f"--config.train.steps={steps}",
                              "--config.train.checkpoint_every_steps=2", "--config.train.progress=log"],
                             env=env, capture_output=True, text=True, timeout=900)
        text = [(logs / f"process_{i}.log").read_text() for i in (0, 1)]
        assert out.returncode == 0, out.stderr + "\n".join(t[-3000:] for t in text)
        return text

    fs = _bucket(gcs)
    run(4)
    assert _committed(fs, f"{BUCKET}/mp_run/checkpoints") == [2, 4]
    _flip_largest_data_file(fs, f"{BUCKET}/mp_run/checkpoints/4/state")
    text = run(6)
    assert "checkpoint step 4 is corrupt" in text[0] and f"resumed from gs://{BUCKET}/mp_run/checkpoints/2" in text[0]
    assert _committed(fs, f"{BUCKET}/mp_run/checkpoints") == [2, 4, 6]
    assert json.loads(fs.cat(f"{BUCKET}/mp_run/summary.json"))["steps"] == 6
    assert [r["step"] for r in map(json.loads, fs.cat(f"{BUCKET}/mp_run/metrics.jsonl").decode().splitlines())] \
        == [1, 2, 3, 4, 5, 6]
    assert list(tmp.iterdir()) == [] and not (ROOT / "gs:").exists() and not (ROOT / "runs" / "logs" / BUCKET).exists()


def test_two_hosts_build_the_corpus_records_into_a_gs_cache_and_each_reads_all_of_them(gcs, tmp_path):
    """Pretraining's first use with a gs:// feature cache and a local mirror per process (as separate hosts
    have): each process featurizes its half and uploads its own shard, process 0 the manifest after them, and
    each then reads the other's shard from the bucket: both hold the corpus a 1-process build makes."""
    from chmr_jax.data import corpus as corpus_lib, records
    import test_records
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "two_process_records.py"), str(port), str(i), f"gs://{BUCKET}/rec_cache",
         str(tmp_path)], env={**os.environ, **gcs, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
                              "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                              paths.MIRROR_ENV: str(tmp_path / f"host{i}")},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    got = [json.loads((tmp_path / f"process_{i}.json").read_text()) for i in (0, 1)]
    mirrors = [Path(g["path"]) for g in got]
    assert mirrors[0] != mirrors[1] and mirrors[0].name == mirrors[1].name
    fs = _bucket(gcs)
    fs.invalidate_cache()
    listed = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/rec_cache/{mirrors[0].name}"))
    assert listed == ["gene_edges.npy", "manifest.json", records.shard_name(0, 2), records.shard_name(1, 2)]
    for i, g in enumerate(got):
        assert any(line.startswith(f"corpus: featurized 48 of 96 molecules (process {i} of 2)") for line in g["log"])
        assert records.missing(mirrors[i]) == []     # the other process' shard came down from the bucket
    inputs = test_records.tiny_inputs(tmp_path / "one_cache", with_rejects=False)
    records.build(inputs, tmp_path / "one", records.Share(), log=lambda *a: None)
    assert records.read_records(mirrors[0]) == records.read_records(mirrors[1]) == records.read_records(tmp_path / "one")
    assert got[0]["digest"] == got[1]["digest"] == test_records.SCRIPT.corpus_digest(corpus_lib.Corpus.load(tmp_path / "one"))


# Runs `chmr-jax pretrain` and SIGKILLs itself at the final save (step 6), once checkpoint 4 is committed:
# every row 1..6 of this uninterrupted computation is in the bucket (uploaded before each save), the
# final checkpoint is not.
KILL_AT_FINAL_SAVE = """
import os, signal, sys
from chmr_jax import cli
from chmr_jax.training import checkpoint
save = checkpoint.Checkpointer.save
def killing_save(self, step, state, meta, force=False):
    if step == 6:
        self.manager.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)
    return save(self, step, state, meta, force)
checkpoint.Checkpointer.save = killing_save
sys.exit(cli.main(sys.argv[1:]))
"""


def test_gs_workdir_killed_run_resumes_the_same_curve_and_embeds(gcs, cache_dir, tmp_path, tmp_path_factory,
                                                                  monkeypatch):
    # The feature cache is a bucket folder too: the killed run builds the corpus and uploads it, the resumed
    # run (another local mirror: another machine) reads it from the bucket.
    env = {**os.environ, **gcs, "CHMR_CACHE_DIR": f"gs://{BUCKET}/cache", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           paths.MIRROR_ENV: str(tmp_path_factory.mktemp("pretrain_host1")),
           # the resumed process reuses the first one's compiled programs (cost, not behaviour)
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env.pop("XLA_FLAGS", None)
    workdir = f"gs://{BUCKET}/run"
    args = ["pretrain", "--config", TEST_CONFIG, "--workdir", workdir, "--config.train.steps=6",
            "--config.train.checkpoint_every_steps=2", "--config.train.progress=log"]
    killed = subprocess.run([sys.executable, "-c", KILL_AT_FINAL_SAVE, *args], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr[-3000:]
    fs = _bucket(gcs)
    uninterrupted = _rows(fs, f"{BUCKET}/run/metrics.jsonl")
    assert sorted(uninterrupted) == [1, 2, 3, 4, 5, 6]
    assert _committed(fs, f"{BUCKET}/run/checkpoints") == [2, 4]   # commit files, not renamed directories
    assert not fs.exists(f"{BUCKET}/run/summary.json")
    assert [p for p in fs.find(f"{BUCKET}/cache") if p.endswith("/manifest.json") and "/corpus-synthetic-" in p]
    env[paths.MIRROR_ENV] = str(tmp_path_factory.mktemp("pretrain_host2"))
    # The newest checkpoint is damaged (64 bytes flipped): the resumed run sets it aside, resumes from step 2,
    # saves step 4 again (through Orbax's own file system, which must not still list the old step 4) and finishes.
    _flip_largest_data_file(fs, f"{BUCKET}/run/checkpoints/4/state")

    # (the resumed run also traces step 5: jax.profiler writes locally, the trace is copied into the bucket)
    resumed = subprocess.run([sys.executable, "-m", "chmr_jax.cli", *args, "--config.train.profile_steps=5:6"],
                             env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-3000:]
    assert "checkpoint step 4 is corrupt" in resumed.stdout + resumed.stderr
    assert f"resumed from {workdir}/checkpoints/2 (step 2 of 6)" in resumed.stdout
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[1].split("-")[0] for p in fs.ls(f"{BUCKET}/run/corrupt")] == ["4"]
    assert "corpus: cached " in resumed.stdout and "corpus: building" not in resumed.stdout   # from the bucket
    assert _rows(fs, f"{BUCKET}/run/metrics.jsonl") == uninterrupted   # bit-identical after the restore
    assert _committed(fs, f"{BUCKET}/run/checkpoints") == [2, 4, 6]
    assert json.loads(fs.cat(f"{BUCKET}/run/summary.json"))["steps"] == 6
    assert any(p.rsplit("/", 1)[1].startswith("events.out.tfevents") for p in fs.ls(f"{BUCKET}/run/tensorboard"))
    assert list(tmp_path.iterdir()) == []            # no local gs: folder (or anything else) in the cwd
    assert any(p.endswith(".xplane.pb") for p in fs.find(f"{BUCKET}/run/profile"))

    # The encoder read from the bucket is the one read from a local copy of the workdir, and embed works.
    fs.get(f"{BUCKET}/run", str(tmp_path / "copy"), recursive=True)
    remote, _, meta = pretrain.load_pretrained(workdir)
    local, _, _ = pretrain.load_pretrained(tmp_path / "copy")
    assert meta["step"] == 6
    from flax import nnx
    for kind in (nnx.Param, nnx.BatchStat):
        leaves = jax.tree.leaves(nnx.state(remote, kind)), jax.tree.leaves(nnx.state(local, kind))
        assert len(leaves[0]) == len(leaves[1]) > 0
        for a, b in zip(*leaves):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    (tmp_path / "mols.csv").write_text("smiles\nCCO\nc1ccccc1O\nCC(=O)Nc1ccc(O)cc1\n")
    # (a subprocess like the gs:// embeds below: one CPU device, the same padded batches, identical floats)
    plain = subprocess.run([sys.executable, "-m", "chmr_jax.cli", "embed", "--pretrained", workdir, "--input",
                            str(tmp_path / "mols.csv"), "--out", str(tmp_path / "emb"), "--formats", "npz",
                            "--shard_size", "2", "--cache_dir", str(cache_dir)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert plain.returncode == 0, plain.stdout + plain.stderr[-3000:]
    arrays, manifest = chmr_jax.load_embeddings(tmp_path / "emb")
    assert np.asarray(arrays["anchor"]).shape[0] == 3 and list(np.asarray(arrays["id"])) == ["row0", "row1", "row2"]
    assert manifest["checkpoint_step"] == 6 and manifest["pretrained"] == workdir

    # embed --out gs://: killed after its first shard (written locally, then uploaded), resumed on another
    # machine (an empty local mirror) that takes the finished shard from the bucket, read back from the bucket.
    out = f"gs://{BUCKET}/emb"
    embed = ["embed", "--pretrained", workdir, "--input", str(tmp_path / "mols.csv"), "--out", out,
             "--formats", "numpy,parquet", "--shard_size", "2", "--cache_dir", str(cache_dir)]
    killed = subprocess.run([sys.executable, "-m", "chmr_jax.cli", *embed], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600, env={**env, "CHMR_EMBED_KILL_AFTER_SHARDS": "1",
                                                         paths.MIRROR_ENV: str(tmp_path_factory.mktemp("host1"))})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr[-3000:]
    fs.invalidate_cache()
    first = json.loads(fs.cat(f"{BUCKET}/emb/shards/00000.json"))
    assert all(fs.exists(f"{BUCKET}/emb/{rel}") for rel in first["files"])
    assert not fs.exists(f"{BUCKET}/emb/shards/00001.json") and not fs.exists(f"{BUCKET}/emb/manifest.json")
    resumed = subprocess.run([sys.executable, "-m", "chmr_jax.cli", *embed], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600, env={**env, paths.MIRROR_ENV: str(tmp_path_factory.mktemp("host2"))})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-3000:]
    assert "skipped: [0]" in resumed.stdout
    fs.invalidate_cache()
    assert json.loads(fs.cat(f"{BUCKET}/emb/shards/00000.json")) == first     # not redone
    assert json.loads(fs.cat(f"{BUCKET}/emb/manifest.json"))["molecules"] == 3
    # The bucket loses one file of shard 1 (say, a host died between uploads): a rerun redoes that shard only.
    lost = next(rel for rel in json.loads(fs.cat(f"{BUCKET}/emb/shards/00001.json"))["files"] if rel.startswith("numpy/"))
    fs.rm(f"{BUCKET}/emb/{lost}")
    fs.rm(f"{BUCKET}/emb/manifest.json")
    again = subprocess.run([sys.executable, "-m", "chmr_jax.cli", *embed], cwd=tmp_path, capture_output=True,
                           text=True, timeout=600, env=env)
    assert again.returncode == 0 and "skipped: [0]" in again.stdout, again.stdout + again.stderr[-3000:]
    fs.invalidate_cache()
    assert fs.exists(f"{BUCKET}/emb/{lost}") and fs.exists(f"{BUCKET}/emb/manifest.json")
    monkeypatch.setenv(paths.MIRROR_ENV, str(tmp_path_factory.mktemp("reader")))
    for fmt in ("numpy", "parquet"):
        remote_arrays, remote_manifest = chmr_jax.load_embeddings(out, fmt)
        assert sorted(remote_arrays) == sorted(arrays)
        for name in arrays:
            np.testing.assert_array_equal(np.asarray(remote_arrays[name]), np.asarray(arrays[name]))
    assert not (tmp_path / "gs:").exists()


def test_two_hosts_embed_into_one_bucket_folder(gcs, tiny_run, data_dir, tmp_path):
    # Two processes with separate local mirrors (as on two hosts): each uploads its own shards, process 0
    # fetches the other's records for the manifest; the export read from the bucket is the local one-process one.
    import csv
    with open(data_dir / "moleculenet" / "bbbp.csv", newline="") as fh:
        rows = [(f"b{i}", r["smiles"]) for i, r in zip(range(20), csv.DictReader(fh))]
    src = tmp_path / "lib.csv"
    src.write_text("name,smiles\n" + "".join(f"{n},{s}\n" for n, s in rows))
    common = ["--pretrained", str(tiny_run), "--input", str(src), "--id_column", "name", "--shard_size", "7",
              "--batch_size", "8", "--workers", "1", "--no_progress", "--formats", "numpy"]
    env = {**os.environ, **gcs, "PYTHON": sys.executable, "CHMR_COMMAND": "embed"}
    for n, out, mirror in ((1, str(tmp_path / "local"), ""), (2, f"gs://{BUCKET}/two", str(tmp_path / "host%i"))):
        run = subprocess.run(["bash", str(ROOT / "launch" / "two_process.sh"), str(tmp_path / f"logs{n}"), *common,
                              "--out", out], env={**env, "NUM_PROCESSES": str(n), paths.MIRROR_ENV: mirror},
                             capture_output=True, text=True, timeout=300)
        logs = "".join(p.read_text()[-2000:] for p in sorted((tmp_path / f"logs{n}").glob("*.log")))
        assert run.returncode == 0, run.stderr + logs
    for i, mine in ((0, [0, 2]), (1, [1])):
        assert f"process {i} of 2: wrote shards {mine}" in (tmp_path / "logs2" / f"process_{i}.log").read_text()
    assert not list(tmp_path.glob("host*/gs/*/two"))   # outputs are staged per run (deleted), not mirrored
    assert not list(tmp_path.glob("host*/.staged/*"))
    fs = _bucket(gcs)
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/two/shards")) == ["00000.json", "00001.json", "00002.json"]
    want, _ = chmr_jax.load_embeddings(tmp_path / "local")
    got, manifest = chmr_jax.load_embeddings(f"gs://{BUCKET}/two")
    assert manifest["processes"] == 2 and len(manifest["shards"]) == 3
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]))


def test_a_gs_finetune_csv_is_keyed_by_its_content(gcs, tmp_path, monkeypatch):
    # run_or_reuse serves an earlier results.json only for the same settings: an edited CSV in the bucket
    # must change them (pathlib would have collapsed the URL and recorded no digest at all).
    import hashlib
    from chmr_jax import config_util
    from chmr_jax.downstream import finetune
    monkeypatch.setenv(paths.MIRROR_ENV, str(tmp_path / "mirror"))
    fs = _bucket(gcs)
    config = config_util.load_config(str(ROOT / "configs" / "finetune.py"))
    config.csv = f"gs://{BUCKET}/task/t.csv"
    for text in (b"smiles,y\nCCO,1\n", b"smiles,y\nCCO,0\n"):
        fs.pipe(f"{BUCKET}/task/t.csv", text)
        assert finetune.run_settings(config, tmp_path / "no_run")["csv_sha256"] == hashlib.sha256(text).hexdigest()


def test_gs_data_and_cache_dirs_prepare_a_benchmark_and_another_host_reuses_the_cache(gcs, data_dir, tmp_path,
                                                                                       monkeypatch, capsys):
    from chmr_jax.data import featurize
    fs = _bucket(gcs)
    fs.put(str(data_dir / "moleculenet" / "bbbp.csv"), f"{BUCKET}/data/moleculenet/bbbp.csv")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(paths.MIRROR_ENV, str(tmp_path / "host1"))
    args = ["prepare", "--dataset", "bbbp", "--data_dir", f"gs://{BUCKET}/data", "--cache_dir",
            f"gs://{BUCKET}/cache", "--workers", "1"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    fs.invalidate_cache()
    cached = sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{BUCKET}/cache"))
    assert any(n.startswith("bbbp-") and n.endswith(".npz") for n in cached), cached   # the features went up
    mirror = tmp_path / "host1" / "gs" / BUCKET
    assert sorted(p.name for p in (mirror / "cache").rglob("*") if p.is_file()) == cached
    assert (mirror / "data" / "moleculenet" / "bbbp.csv").read_bytes() == (data_dir / "moleculenet" / "bbbp.csv").read_bytes()
    # Another host (an empty mirror) takes the features from the bucket: nothing is featurized again.
    monkeypatch.setenv(paths.MIRROR_ENV, str(tmp_path / "host2"))
    monkeypatch.setattr(featurize.MoleculeFeatures, "save", lambda *a, **k: pytest.fail("featurized again"))
    assert cli.main(args) == 0
    second = capsys.readouterr().out
    table = lambda text: [line.rsplit(None, 1)[0] for line in text.splitlines() if line.startswith("bbbp")]
    assert table(second) == table(first) and len(table(first)) == 1   # the same counts, split sizes
    assert cli.main([*args[:2], "bace", *args[3:]]) == 2              # not in the bucket: named there
    assert f"expected it at gs://{BUCKET}/data/moleculenet/bace.csv (mirrored to " in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["host1", "host2"]        # no local gs: folder


def test_no_directory_renames_on_a_gcsfuse_workdir(tmp_path, cache_dir, monkeypatch):
    # gcsfuse without --rename-dir-limit: renaming a directory fails (EXDEV here); files rename fine.
    mount = tmp_path / "mnt"
    mount.mkdir()

    def refuse_dirs(rename):
        def guarded(src, dst, *a, **k):
            if os.path.isdir(src) and Path(os.path.abspath(src)).is_relative_to(mount):
                raise OSError(errno.EXDEV, "directory rename on a gcsfuse mount", str(src))
            return rename(src, dst, *a, **k)
        return guarded

    monkeypatch.setattr(os, "rename", refuse_dirs(os.rename))
    monkeypatch.setattr(os, "replace", refuse_dirs(os.replace))
    (mount / "probe").mkdir()
    with pytest.raises(OSError, match="gcsfuse"):
        (mount / "probe").rename(mount / "probe2")   # the guard is live (pathlib goes through os.rename)
    monkeypatch.setattr(paths, "_read_mounts", lambda: f"bucket {mount} fuse.gcsfuse rw 0 0\n")
    workdir = mount / "run"
    assert checkpoint_lib.dir_renames_of("auto", workdir) is False and checkpoint_lib.dir_renames_of("auto", tmp_path)

    def pretrain_cli(steps):
        return cli.main(["pretrain", "--config", TEST_CONFIG, "--workdir", str(workdir), f"--config.cache_dir={cache_dir}",
                         f"--config.train.steps={steps}", "--config.train.checkpoint_every_steps=2",
                         "--config.train.progress=log", "--config.train.devices=1"])   # (one device: a cheaper compile)

    assert pretrain_cli(4) == 0
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if (p / "commit_success.txt").exists())
    assert steps == [2, 4]
    # A corrupt newest step is moved aside by copy + delete, the run restarts from step 2 and saves step 4 again.
    for f in (workdir / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")
    assert pretrain_cli(6) == 0
    assert [p.name.split("-")[0] for p in (workdir / "corrupt").iterdir()] == ["4"]
    rows = metric_writers.read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert json.loads((workdir / "summary.json").read_text())["resumed_from"] == 2
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4, 6]


def test_unreachable_bucket_fails_in_one_line_without_a_local_folder(tmp_path):
    # Nothing listens on the port: the bucket check gives up after its bounded wait ($CHMR_STORAGE_TIMEOUT_S,
    # 20 s by default), well before gcsfs's own retries (~50 s) or any input building.
    env = {**os.environ, **_storage_env(f"http://127.0.0.1:{_free_port()}"), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    env.pop(paths.TIMEOUT_ENV, None)
    # The bounded wait is proven by the message naming it, not by a wall time (issue 35: wall times on a
    # busy machine vary); the subprocess timeout only guards against a hang.
    proc = subprocess.run([sys.executable, "-m", "chmr_jax.cli", "pretrain", "--config", TEST_CONFIG, "--workdir",
                           "gs://no-such-bucket/run"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr   # (an environment fault: retrying may help)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chmr-jax pretrain: --workdir gs://no-such-bucket/run: bucket "
                                                   "gs://no-such-bucket "), proc.stderr
    # (gcsfs keeps retrying a refused connection here; should it give up first, its error is the line)
    assert "did not answer within 20s" in lines[0] or "cannot be reached" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_exit_codes_tell_what_the_user_gave_from_storage_faults(gcs, tmp_path, monkeypatch, capsys):
    """2: an error in what the user gave; 3: storage or the environment failed (an orchestrator retries it).
    The FileNotFoundError that gcsfs raises for an object gone from under a listing (as Orbax's rmtree of a
    stale step did) is a storage fault, not a missing input file."""
    import fsspec
    fs = fsspec.core.url_to_fs(f"gs://{BUCKET}/x")[0]
    args = ["pretrain", "--config", TEST_CONFIG, "--workdir", f"gs://{BUCKET}/exit_codes"]

    def code_and_line(raise_it):
        monkeypatch.setattr(pretrain, "run", lambda config, workdir, data_dir=None: raise_it())
        code = cli.main(args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return code, lines[0]

    code, line = code_and_line(lambda: fs.rm(f"{BUCKET}/exit_codes/checkpoints/4", recursive=True))
    assert code == 3 and line.startswith("chmr-jax pretrain: storage or environment fault (FileNotFoundError") \
        and "run it again" in line
    assert code_and_line(lambda: open(tmp_path / "my_molecules.csv"))[0] == 2          # a file the user named
    assert code_and_line(lambda: paths.check_reachable("gs://no-such-bucket/run", "--workdir")) == (
        2, "chmr-jax pretrain: --workdir gs://no-such-bucket/run: bucket gs://no-such-bucket does not exist or these "
           "credentials cannot see it; create it (gcloud storage buckets create gs://no-such-bucket) or fix the name")

    def io_error():
        raise checkpoint_lib.CheckpointIOError("gs://b/run/checkpoints/4: reading failed 3 times")
    assert code_and_line(io_error) == (3, "chmr-jax pretrain: gs://b/run/checkpoints/4: reading failed 3 times")
    assert code_and_line(lambda: int("x"))[0] == 2                                      # a bad value (ValueError)
    # An output path that is an existing file, or one the user may not write: what the user gave (not retried).
    (tmp_path / "afile").write_text("hi")
    assert code_and_line(lambda: (tmp_path / "afile").mkdir())[0] == 2                  # FileExistsError
    # The storage and credential libraries' own error classes (not OSError): a 5xx after gcsfs's retries, an
    # expired credential. Retrying may succeed: 3.
    import gcsfs.retry
    import google.auth.exceptions

    def http_503():
        raise gcsfs.retry.HttpError({"code": 503, "message": "backend error"})

    def refresh():
        raise google.auth.exceptions.RefreshError("the token expired")
    assert code_and_line(http_503)[0] == 3 and code_and_line(refresh)[0] == 3

    def bug():
        raise KeyError("a bug")
    monkeypatch.setattr(pretrain, "run", lambda config, workdir, data_dir=None: bug())
    with pytest.raises(KeyError):   # a bug keeps its traceback (exit 1)
        cli.main(args)
