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

import os
import re
import threading
from pathlib import Path

DATA_ENV = "CHMR_DATA_DIR"
CACHE_ENV = "CHMR_CACHE_DIR"
DEFAULT_HOME = Path("~/.cache/chmr_jax")
# Seconds `check_reachable` waits for the bucket to answer (gcsfs alone retries for ~50 s with no network).
TIMEOUT_ENV = "CHMR_STORAGE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 20.0

# A URL, or one that pathlib has already collapsed ("gs:/b/run" from Path("gs://b/run")).
_URL = re.compile(r"^(gs|s3|az|hf):/+(.*)$")


class StorageUnreachable(OSError):
    """A bucket that does not exist, cannot be read with these credentials, or does not answer."""


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
        raise StorageUnreachable(f"{what} {url}: bucket {where} does not exist or these credentials cannot see it; "
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
    """Returns the data directory: `flag` if given, else $CHMR_DATA_DIR, else ~/.cache/chmr_jax."""
    if flag:
        return _local(flag, "--data_dir")
    env = os.environ.get(DATA_ENV)
    if env:
        return _local(env, f"${DATA_ENV}")
    return DEFAULT_HOME.expanduser()


def resolve_cache_dir(flag: str | os.PathLike | None = None) -> Path:
    """Returns the featurization cache directory (created if missing)."""
    if flag:
        path = _local(flag, "--cache_dir")
    elif os.environ.get(CACHE_ENV):
        path = _local(os.environ[CACHE_ENV], f"${CACHE_ENV}")
    else:
        path = DEFAULT_HOME.expanduser() / "features"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def _local(path, what: str) -> Path:
    """The data and cache directories are read with numpy / gzip / csv, which need local files: a URL
    is refused in one line (it would otherwise become a local `gs:` folder)."""
    if is_remote(path):
        raise ValueError(f"{what}={os.fspath(path)}: the data and feature-cache directories must be local (or a "
                         "bucket mounted with gcsfuse); copy the files with `gcloud storage cp -r` or mount the "
                         "bucket. Workdirs (--workdir, --pretrained) may be gs:// URLs")
    return Path(path).expanduser().resolve()


def open_text(path):
    """A text file for reading, gunzipped on the fly when it ends in .gz (newline='' for the csv module)."""
    import gzip
    path = Path(path)
    return gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")
