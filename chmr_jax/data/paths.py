"""Where data, caches and runs live. The only place that turns a user's path into a path object.

Data directory precedence: explicit `--data_dir` flag > `CHMR_DATA_DIR` > `~/.cache/chmr_jax`.
Cache directory precedence: explicit `--cache_dir` flag > `CHMR_CACHE_DIR` > `<home cache>/features`.
The cache is kept apart from the data directory so that a shared, read-only data directory
(e.g. `../shared/data`) is never written to.

Cloud storage: `as_path` gives an `etils.epath.Path` for a URL (`gs://bucket/run`; also s3://, az://,
hf://: etils' backends, through fsspec + gcsfs for gs:// when TensorFlow is absent) and a resolved
`pathlib.Path` otherwise (`pathlib.Path("gs://b/run").resolve()` is the local folder `<cwd>/gs:/b/run`).
Both have the same read / write / list / mkdir methods, so the jobs use either. `check_reachable`
asks the bucket once, with a bounded wait, before a job does anything heavy.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

DATA_ENV = "CHMR_DATA_DIR"
CACHE_ENV = "CHMR_CACHE_DIR"
DEFAULT_HOME = Path("~/.cache/chmr_jax")
# Seconds `check_reachable` waits for the bucket to answer (gcsfs alone retries for ~50 s with no network).
TIMEOUT_ENV = "CHMR_STORAGE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 20.0

# A URL, or one that pathlib has already collapsed ("gs:/b/run" from Path("gs://b/run")).
_SCHEMES = ("gs", "s3", "az", "hf")
_URL = re.compile(r"^(gs|s3|az|hf):/+(.*)$")


class StorageUnreachable(OSError):
    """A bucket that cannot be reached or does not answer (the network, the credentials): an environment fault."""


class BucketNotFound(StorageUnreachable):
    """A bucket that does not exist or these credentials cannot see: most often a typo in what the user gave."""


def is_remote(path) -> bool:
    """Whether `path` names object storage (gs://, s3://, az://, hf://) rather than a local file."""
    return path is not None and bool(_URL.match(os.fspath(path)))


def as_path(path):
    """epath.Path for a URL (gs://bucket/run), else the expanded, resolved local pathlib.Path."""
    text = os.fspath(path)
    m = _URL.match(text)
    if m:
        from etils import epath
        return epath.Path(f"{m[1]}://{m[2]}")
    return Path(text).expanduser().resolve()


def check_reachable(path, what: str = "path", timeout_s: float | None = None) -> None:
    """For a URL: its bucket exists and answers within `timeout_s` (default $CHMR_STORAGE_TIMEOUT_S or
    20 s), else StorageUnreachable naming the bucket and what to do. Local paths pass."""
    if not is_remote(path):
        return
    import fsspec
    url = os.fspath(as_path(path))
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    scheme = url.split("://", 1)[0]
    timeout_s = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S) if timeout_s is None else timeout_s
    result: dict = {}

    def probe():   # in a thread: gcsfs's own retries (credentials, DNS) take ~50 s with no network
        try:
            fs, _ = fsspec.core.url_to_fs(url)
            result["exists"] = fs.exists(bucket)
        except Exception as e:   # noqa: BLE001 (any failure means: not usable; reported below)
            result["error"] = e

    thread = threading.Thread(target=probe, daemon=True, name="chmr-bucket-check")
    thread.start()
    thread.join(timeout_s)
    where = f"{scheme}://{bucket}"
    if thread.is_alive():
        raise StorageUnreachable(
            f"{what} {url}: bucket {where} did not answer within {timeout_s:.0f}s (no network, or no credentials: "
            "`gcloud auth application-default login`, or the VM's service account); fix access or use a local path "
            f"(${TIMEOUT_ENV} sets the wait)")
    if "error" in result:
        e = result["error"]
        raise StorageUnreachable(f"{what} {url}: bucket {where} cannot be reached ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200] if str(e) else ''}); check the name, the network "
                                 "and the credentials, or use a local path")
    if not result.get("exists"):
        raise BucketNotFound(f"{what} {url}: bucket {where} does not exist or these credentials cannot see it; "
                             f"create it (gcloud storage buckets create {where}) or fix the name")


def gcsfuse_mount(path) -> str | None:
    """The mount point when local `path` lies on a gcsfuse mount (a bucket mounted as a folder, where
    renaming a directory fails unless the mount allows it), else None. Read from /proc/mounts."""
    return _fuse_mount(Path(path).resolve(), _read_mounts())


def _read_mounts() -> str:
    try:
        return Path("/proc/mounts").read_text()
    except OSError:
        return ""


def _fuse_mount(path: Path, mounts: str) -> str | None:
    best = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (path == Path(point) or Path(point) in path.parents) and (best is None or len(point) > len(best[0])):
            best = (point, fields[2])
    return best[0] if best and best[1] == "fuse.gcsfuse" else None


def resolve_data_dir(flag: str | os.PathLike | None = None) -> Path:
    """Returns the data directory: `flag` if given, else $CHMR_DATA_DIR, else ~/.cache/chmr_jax. A URL
    (gs://bucket/data) is mirrored to local disk first (`pull`) and its local mirror returned."""
    if flag:
        return _local(flag, "--data_dir", prune=True)
    env = os.environ.get(DATA_ENV)
    if env:
        return _local(env, f"${DATA_ENV}", prune=True)
    return DEFAULT_HOME.expanduser()


def resolve_cache_dir(flag: str | os.PathLike | None = None) -> Path:
    """Returns the featurization cache directory (created if missing). A URL is mirrored (`pull`); the
    jobs `push` what they add to it once their inputs are built."""
    if flag:
        path = _local(flag, "--cache_dir", prune=False)   # (entries are keyed by content; a process may
                                                          # have just written one it has not uploaded yet)
    elif os.environ.get(CACHE_ENV):
        path = _local(os.environ[CACHE_ENV], f"${CACHE_ENV}", prune=False)
    else:
        path = DEFAULT_HOME.expanduser() / "features"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def local_only(path, what: str, why: str = "this command writes a local folder of runs") -> Path:
    """For outputs kept local (stress and planted runs, an HLO dump): a URL is refused in one line (never
    a local `gs:` folder); write locally and copy it up (`gcloud storage cp -r`)."""
    if is_remote(path):
        raise ValueError(f"{what}={os.fspath(path)}: {why}; give a local path and copy it up afterwards "
                         "(gcloud storage cp -r)")
    return Path(path).expanduser().resolve()


def _local(path, what: str, prune: bool) -> Path:
    """The data and cache directories are read with numpy / gzip / csv, which need local files: a URL is
    mirrored to local disk (never a local `gs:` folder), a local path resolved."""
    if is_remote(path):
        local = pull(path, what, prune=prune)
        if prune and not any(p.is_file() and not p.name.startswith(".") for p in local.rglob("*")):   # a typo?
            raise FileNotFoundError(f"{what}={os.fspath(as_path(path))}: the bucket holds no objects under it; "
                                    "check the name (gcloud storage ls)")
        return local
    return Path(path).expanduser().resolve()


# ---- local mirrors of bucket folders ---------------------------------------------------------------
# Data and feature-cache directories, and embed's outputs, are read and written by numpy / gzip / csv /
# pyarrow / array_record, memory-mapped and renamed: local-file operations. A gs:// folder is therefore
# used through a local mirror, <$CHMR_MIRROR_DIR or ~/.cache/chmr_jax/mirror>/<scheme>/<bucket>/<prefix>:
# `pull` brings the bucket's objects down (only those that differ), `push` sends local files up (only
# those the bucket lacks or holds differently), markers (manifests, plan.json, shard records) after
# everything else: a reader that finds one finds what it lists. Outputs are written in a per-job
# `staged` folder instead. Every transfer is checked: uploads by gcsfs (MD5), downloads against the listing
# (size, and MD5, else CRC32C, where the store reports one). The mirror's path alone names its URL
# (`remote_of`), so no state is kept between calls.

MIRROR_ENV = "CHMR_MIRROR_DIR"
_PULLED = ".chmr_pulled.json"   # in a pruned mirror: the names the last pull saw in the bucket
# Temporary names of atomic writes (files.py, Orbax, TFDS, our own downloads): never transferred.
_TEMPORARY = re.compile(r"\.tmp\d*$|\.tmp\d+\.|(^|/)\.")


def mirror_root() -> Path:
    return Path(os.environ.get(MIRROR_ENV) or DEFAULT_HOME / "mirror").expanduser().resolve()


def mirror_of(url) -> Path:
    """The local folder that mirrors `url`: <mirror root>/<scheme>/<bucket>/<prefix>."""
    scheme, rest = os.fspath(as_path(url)).split("://", 1)
    parts = [p for p in rest.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"{os.fspath(url)}: name a bucket folder (gs://bucket/folder)")
    return mirror_root().joinpath(scheme, *parts)


def remote_of(local) -> str | None:
    """The URL that a mirror folder (or a file or folder inside one) stands for; None for any other path."""
    if is_remote(local):
        return os.fspath(as_path(local))
    path, root = Path(local).expanduser().resolve(), mirror_root()
    if not path.is_relative_to(root):
        return None
    parts = path.relative_to(root).parts
    # (only <root>/<scheme>/...: a folder that merely lies under the root is not a mirror)
    return f"{parts[0]}://" + "/".join(parts[1:]) if len(parts) >= 2 and parts[0] in _SCHEMES else None


_DIGESTS: dict = {}   # (kind, path, size, mtime_ns) -> digest: a job resolves its data dir several times


def _digest_b64(path: Path, kind: str) -> str:
    """base64 of the file's MD5, or of its CRC32C as 4 big-endian bytes (GCS's md5Hash / crc32c)."""
    import base64
    st = path.stat()
    memo = (kind, str(path), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        if kind == "md5":
            import hashlib
            h = hashlib.md5()
        else:
            import google_crc32c
            h = google_crc32c.Checksum()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _DIGESTS[memo] = base64.b64encode(h.digest()).decode()
    return _DIGESTS[memo]


def _compare(local: Path, info: dict) -> bool | None:
    """Whether the local file holds the object `info` describes: same size and the same MD5, or CRC32C
    where the store has no MD5 (GCS composite objects, e.g. large `gcloud storage cp` uploads). None:
    the sizes agree but there is no digest to compare."""
    if not local.is_file() or local.stat().st_size != int(info.get("size", -1)):
        return False
    if info.get("md5Hash"):
        return info["md5Hash"] == _digest_b64(local, "md5")
    if info.get("crc32c"):
        try:
            return info["crc32c"] == _digest_b64(local, "crc32c")
        except ImportError:   # (google-crc32c comes with gcsfs' google-cloud dependencies)
            return None
    return None


def _same(local: Path, info: dict) -> bool:
    """Known to be the same (an unknown is not: it is transferred again)."""
    return _compare(local, info) is True


def _listing(fs, key: str) -> dict:
    """{relative name: info} of the objects under key (gcsfs caches listings: asked afresh)."""
    fs.invalidate_cache()
    try:
        found = fs.find(key, detail=True)
    except FileNotFoundError:
        return {}
    key = key.rstrip("/")
    out = {}
    for name, info in found.items():
        rel = name[len(key):].lstrip("/") if name.startswith(key) else None
        if rel and info.get("type", "file") == "file" and not _TEMPORARY.search(rel):
            out[rel] = info
    return out


def listing(url) -> dict:
    """{relative name: info (size, md5Hash, ...)} of the objects under a bucket folder, asked afresh."""
    import fsspec
    fs, key = fsspec.core.url_to_fs(os.fspath(as_path(url)))
    return _listing(fs, key)


def pull(url, what: str = "path", only: Callable[[str], bool] | None = None, into=None,
         prune: bool = False) -> Path:
    """Copies the objects under `url` that the local folder (`into`, default `mirror_of(url)`) lacks or
    holds differently (only those whose relative name passes `only`), each to a temporary name, checked,
    then renamed. prune: also delete local files the bucket no longer holds (for read-only folders, e.g. a
    data dir, so that a file removed from the bucket is not read from a stale copy). Returns the local
    folder (created). An unreachable bucket: StorageUnreachable, nothing created."""
    import fsspec
    check_reachable(url, what)
    local = Path(into) if into is not None else mirror_of(url)
    fs, key = fsspec.core.url_to_fs(os.fspath(as_path(url)))
    local.mkdir(parents=True, exist_ok=True)
    listing = _listing(fs, key)
    _download(fs, [(f"{key.rstrip('/')}/{rel}", info, local / rel, f"{what} {os.fspath(as_path(url))}/{rel}")
                   for rel, info in sorted(listing.items())
                   if (only is None or only(rel)) and not _same(local / rel, info)])
    if prune:
        # Only what an earlier pull brought down and the bucket no longer holds: files this host added
        # itself (a public file downloaded into a gs:// data dir, a cache nested in it) are kept.
        record = local / _PULLED
        try:
            before = set(json.loads(record.read_text()))
        except (OSError, ValueError):
            before = set()
        for rel in sorted(before - set(listing)):
            if only is None or only(rel):
                (local / rel).unlink(missing_ok=True)
        tmp = record.with_name(record.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(sorted(listing)))
        os.replace(tmp, record)
    return local


@contextlib.contextmanager
def staged(url, what: str = "path", only: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """A fresh local folder standing for bucket folder `url` during one job (for outputs): it starts as a
    copy of what the bucket holds (the objects `only` passes), the job writes into it and uploads with
    push(folder, to=url), and it is deleted on exit. Fresh per job, so nothing stale from an earlier run
    (or another process on this host) is mixed in or uploaded again. It lives under the mirror root
    (<root>/.staged/<owner>-...), which may be shared by hosts (an NFS home) or containers: a folder is
    removed here only when its owner is provably gone (`_abandoned`), never for a process this host cannot
    see. (pull asks the bucket first: an unreachable one raises and the folder is removed.)"""
    folder = staging_folder()
    try:
        yield pull(url, what, only=only, into=folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def staging_folder() -> Path:
    """A new empty folder <mirror root>/.staged/<owner>-<random> for local files on their way to a bucket
    (the caller deletes it); the folders of owners that are provably gone (a killed job) are removed first."""
    base = mirror_root() / ".staged"
    base.mkdir(parents=True, exist_ok=True)
    me, now = _owner(), time.time()
    for old in base.iterdir():
        if _abandoned(old, me, now):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix="+".join(me) + "-", dir=base))


# A staging folder whose owner this host cannot check (another host, PID namespace or boot, or a name from
# before owners were recorded) is removed only when nothing in it changed for this long.
STAGED_STALE_S = 7 * 24 * 3600


def _owner(pid: int | None = None) -> tuple[str, str, str, str, str]:
    """(pid, its start time, PID namespace, boot id, hostname) of a process (default: this one): a pid alone
    names a process only within one PID namespace of one boot of one host, and only until it is reused."""
    import socket
    pid = os.getpid() if pid is None else pid
    try:
        namespace = re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:16]
    except OSError:   # (no /proc: not Linux)
        namespace = boot = ""
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
    return str(pid), _start_time(pid) or "", namespace, boot, host


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22); None: no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _abandoned(folder: Path, me: tuple, now: float) -> bool:
    """Whether staging folder `folder` may be removed: its owner ran in this PID namespace of this boot of
    this host and that process (pid and start time) no longer runs; or, for an owner this host cannot check,
    nothing in it changed for STAGED_STALE_S."""
    owner = folder.name.rsplit("-", 1)[0].split("+")
    if len(owner) == 5 and owner[0].isdigit() and owner[2:] == list(me[2:]) and me[2]:
        if owner[:2] == list(me[:2]):
            return False   # (this very process)
        return _start_time(int(owner[0])) != owner[1]   # gone, or the pid now belongs to another process
    try:
        newest = max([folder.stat().st_mtime] + [p.stat().st_mtime for p in folder.rglob("*")])
    except OSError:   # (removed meanwhile)
        return False
    return now - newest > STAGED_STALE_S


def local_file(path, what: str = "path") -> Path:
    """A file to read: a local path (resolved), or for a URL (gs://bucket/lib.csv) its copy in the local
    mirror, downloaded unless the copy there is the same object (size, MD5)."""
    if not is_remote(path):
        return Path(path).expanduser().resolve()
    import fsspec
    check_reachable(path, what)
    url = os.fspath(as_path(path))
    fs, key = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    try:
        info = fs.info(key)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {url}: no such object") from None
    if info.get("type", "file") != "file":
        raise IsADirectoryError(f"{what} {url} is a folder; name a file")
    dst = mirror_of(url)
    if not _same(dst, info):
        _download(fs, [(key, info, dst, f"{what} {url}")])
    return dst


def _download(fs, items: list) -> None:
    """Objects [(key, info, dst, name)] to local files, in one batch (gcsfs fetches a list concurrently):
    each to a temporary name, checked against the listing (size, and MD5 or CRC32C: gcsfs's own check needs
    an MD5, which composite objects lack, and crcmod), then renamed into place."""
    if not items:
        return
    tmps = [dst.with_name(dst.name + f".tmp{os.getpid()}") for _, _, dst, _ in items]
    for tmp in tmps:
        tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        fs.get([key for key, _, _, _ in items], [str(t) for t in tmps])
        for (_, info, dst, name), tmp in zip(items, tmps):
            if _compare(tmp, info) is False:   # (no digest to compare: the size was checked)
                raise OSError(f"{name}: the downloaded copy differs from the object (size or MD5); run again")
            os.replace(tmp, dst)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def _is_marker(rel: str) -> bool:
    """Files whose presence says the others are complete (corpus and export manifests, embed's plan and
    shard records): uploaded after everything else."""
    return rel.rsplit("/", 1)[-1] in ("manifest.json", "plan.json") or rel.startswith("shards/")


def push(local, what: str = "path", only: Callable[[str], bool] | None = None, to=None) -> int:
    """Uploads the files under folder `local` (a mirror folder or one inside it; or any folder with `to`,
    the URL it stands for) that the bucket lacks or holds differently: markers (_is_marker) after all
    others, each group oldest first (file times can tie: the explicit group is what guarantees a
    manifest goes up after what it lists). gcsfs checks each upload (consistency="md5": the MD5 that GCS
    computed of what it stored). An object the bucket lacked when listed is created only if it is still
    absent (gcsfs mode="create", a generation precondition): when another host created it meanwhile (two
    hosts pushing the same content-keyed cache entry: the same arrays, manifests that differ only in when
    and where they were built), that object is kept and copied over the local file, so both pushes succeed
    and the bucket holds one object. Returns how many were sent; 0 for a plain local folder."""
    url = os.fspath(as_path(to)) if to is not None else remote_of(local)
    if url is None:
        return 0
    import fsspec
    local = Path(local).expanduser().resolve()
    fs, key = fsspec.core.url_to_fs(url)
    candidates = {p.relative_to(local).as_posix(): p for p in local.rglob("*")
                  if p.is_file() and not _TEMPORARY.search(p.relative_to(local).as_posix())}
    listing = _listing(fs, key)
    sent = 0
    for rel, path in sorted(candidates.items(), key=lambda kv: (_is_marker(kv[0]), kv[1].stat().st_mtime_ns, kv[0])):
        if (only is not None and not only(rel)) or (rel in listing and _same(path, listing[rel])):
            continue
        target = f"{key.rstrip('/')}/{rel}"
        try:
            fs.put_file(str(path), target, consistency="md5", mode="overwrite" if rel in listing else "create")
        except FileExistsError:   # created by another host since the listing: theirs is kept
            fs.invalidate_cache(target)
            info = fs.info(target)
            if not _same(path, info):
                _download(fs, [(target, info, path, f"{what} {url}/{rel}")])
            continue
        except Exception as e:
            if type(e).__name__ == "ChecksumError":   # (gcsfs.retry.ChecksumError is no OSError)
                raise OSError(f"{what} {url}/{rel}: the uploaded object differs from the local file (MD5); "
                              "run again") from e
            raise
        sent += 1
    return sent


def open_text(path):
    """A text file for reading, gunzipped on the fly when it ends in .gz (newline='' for the csv module)."""
    import gzip
    path = Path(path)
    return gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")
