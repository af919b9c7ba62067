"""Registry of every dataset chmr_jax reads: its files, their public source and checksum.

`fetch(name, file)` returns a local path under the data directory. A missing file is downloaded
(with progress, to a temporary name, checked against its sha256, then renamed into place) when the
network allows; otherwise the error names the file, where it was expected, and what to set.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from chmr_jax.data import paths
from chmr_jax.progress import Progress

OFFLINE_ENV = "CHMR_OFFLINE"  # set to 1 to never attempt a download


class DataNotFoundError(FileNotFoundError):
    """A registered file is absent and could not be downloaded."""


class ChecksumError(ValueError):
    """A downloaded file does not match its registered sha256."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset.

    path: location relative to the data directory.
    url: public source; None when the file is derived and cannot be fetched as-is.
    sha256: hex digest of the file as chmr_jax expects it.
    note: how to obtain a derived file by hand.
    """
    path: str
    url: str | None
    sha256: str
    note: str = ""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    files: tuple[RemoteFile, ...]

    def file(self, basename: str) -> RemoteFile:
        for f in self.files:
            if Path(f.path).name == basename:
                return f
        raise KeyError(f"dataset {self.name!r} has no file {basename!r}; "
                       f"it has {[Path(f.path).name for f in self.files]}")


_INFOALIGN = "https://raw.githubusercontent.com/liugangcode/InfoAlign/main/raw_data"
_KANO = "https://raw.githubusercontent.com/HICAI-ZJU/KANO/main/data"


def _infoalign(name: str, basename: str, sha: str) -> RemoteFile:
    return RemoteFile(f"infoalign/{name}/{basename}", f"{_INFOALIGN}/{name}/raw/{basename}", sha)


def _moleculenet(name: str, sha: str) -> RemoteFile:
    return RemoteFile(f"moleculenet/{name}.csv", f"{_KANO}/{name}.csv", sha)


REGISTRY: dict[str, DatasetSpec] = {s.name: s for s in [
    DatasetSpec("chembl2k", "ChEMBL activity, 2,355 molecules x 41 binary tasks (InfoAlign)", (
        _infoalign("chembl2k", "assays.csv.gz", "9032bb122dcdea5f485d8a706316714538fbce344c56b6eafbc97c68b24dbe5a"),
        _infoalign("chembl2k", "structure.csv.gz", "01d9d51c8ee327e82f2f746d8c3fa187c257d3132f0dcdbd4e79632f00a36122"),
        _infoalign("chembl2k", "CP-JUMP.csv.gz", "22bb89ef6ca8dc04a088c7a09322437c64d90cb98994cc7b67010f145508345a"),
        _infoalign("chembl2k", "GE.csv.gz", "b873ae0745865b65162086756fe3f3eb3f70c946d5d23be27cd9f8d78a34bea3"),
    )),
    DatasetSpec("broad6k", "Broad assays, 6,567 molecules x 32 binary tasks (InfoAlign)", (
        _infoalign("broad6k", "assays.csv.gz", "154734844dd2f9862033422754607120ead6d5ae85e7642f78c50afcc952c8e2"),
        _infoalign("broad6k", "structure.csv.gz", "28716949ea812aa6ff404ee98767c127a48f6ecb89616f731c7c6f9edb34cc79"),
        _infoalign("broad6k", "CP-Bray.csv.gz", "51ff1e1e529d7d105210d38e4323c72ab9d0e13e2f6b0cafe4d0e09a438be4d0"),
        _infoalign("broad6k", "GE.csv.gz", "55fa12b7c77c314ec62d8e0252eacf793f2b0344ce8496d76269be7f0e2df307"),
    )),
    DatasetSpec("biogenadme", "Biogen ADME, 3,521 molecules x 6 log10 regression targets", (
        _infoalign("biogenadme", "assays.csv.gz", "16efe8a9849e69e50e7c3536daf2c65e776d798a092e5d0b8677a92e0a26e7e8"),
    )),
    DatasetSpec("moltoxcast", "ToxCast, 8,576 molecules x 617 binary tasks (InfoAlign)", (
        _infoalign("moltoxcast", "assays.csv.gz", "a263400aa84bfbd10918fdd158a7199f0135f68517af13c0ec643714a59bae22"),
    )),
    DatasetSpec("bbbp", "MoleculeNet BBBP, blood-brain barrier penetration", (
        _moleculenet("bbbp", "a61e17872cbec0743a6147dc802a1f7550acfe8dc1053f881f4c42a3ce2dc597"),)),
    DatasetSpec("bace", "MoleculeNet BACE-1 inhibition", (
        _moleculenet("bace", "5fb6e2a87a148ec7393c1d874d26ec40ee74eb6223ea7d2bfa16d153eb75eb55"),)),
    DatasetSpec("clintox", "MoleculeNet ClinTox (FDA approval, clinical toxicity)", (
        _moleculenet("clintox", "cc561402d058a0d996a9f5e5d02bc20f6652b7003525b32c3598b8da4b24e9b7"),)),
    DatasetSpec("sider", "MoleculeNet SIDER, 27 side-effect classes", (
        _moleculenet("sider", "87b937d1ddb1879bb14e8f23d94ceffcb9ad3e534ae59602820b3bcf03844fbf"),)),
    DatasetSpec("hiv", "MoleculeNet HIV replication inhibition", (
        _moleculenet("hiv", "3a3c7a4ea9626211fe959ef988394670dd76d556ca3c6173b70c88256e4c3555"),)),
    DatasetSpec("l1000_drugbank", "LINCS L1000 consensus signatures of 1,170 DrugBank compounds", (
        RemoteFile("profiles/l1000/consensi-drugbank.tsv.gz",
                   "https://raw.githubusercontent.com/dhimmel/lincs/master/data/consensi/consensi-drugbank.tsv.gz",
                   "f36371a1acc0c4f7cbd20a35969af5447cfadac1c36a640ae892243562847ce2"),
        RemoteFile("profiles/l1000/genes.tsv",
                   "https://raw.githubusercontent.com/dhimmel/lincs/master/data/consensi/genes.tsv",
                   "4b79462a64302bbcc944762b7196441b5b11efae08019370b6564db366a7da0c"),
        RemoteFile("profiles/l1000/drugbank_structures.tsv", None,
                   "0742c160a082b642627c247b25fd303abb637ffd1164e3fb6fcabb019b324867",
                   note="derived: the columns drugbank_id, name, inchikey, inchi of dhimmel/drugbank "
                        "data/drugbank.tsv (https://github.com/dhimmel/drugbank), saved as TSV"),
    )),
    DatasetSpec("l1000_plate", "One L1000 level-3 plate (GCT 1.3), 59 kinase inhibitors x 6 doses + DMSO", (
        RemoteFile("profiles/l1000/LJP005_A375_24H_X1_B19_level3.gct",
                   "https://raw.githubusercontent.com/cmap/cmapPy/master/cmapPy/pandasGEXpress/tests/"
                   "functional_tests/test_files/LJP005_A375_24H_X1_B19_level3.gct",
                   "efd7682a473e84f3bd76e79d83f99dcf35744fb0557322564468e80bf8d15a95"),
    )),
    DatasetSpec("cellpainting_plate", "One LINCS Cell Painting plate (A549, 48 h) with Repurposing Hub structures", (
        RemoteFile("profiles/cellpainting/SQ00015054_normalized_feature_select.csv.gz",
                   "https://github.com/cytomining/cytominer-eval/raw/6f9d350badd0a18b6c1a76171813aaf9a52f8d9f/"
                   "cytominer_eval/example_data/compound/SQ00015054_normalized_feature_select.csv.gz",
                   "0dab037c26926b143d3d64210bde3aa94943691edd226915dada9db85f5bd1c7"),
        RemoteFile("profiles/cellpainting/repurposing_samples_20200324.txt",
                   "https://s3.amazonaws.com/data.clue.io/repurposing/downloads/repurposing_samples_20200324.txt",
                   "3324dfac93d19ceaeafbe7d9e466127709328777cb2f6c5a465740cd327088e9"),
    )),
]}


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, sha256: str | None, timeout_s: float = 30.0,
             show_progress: bool = True) -> Path:
    """Downloads `url` to `dest` atomically; verifies `sha256` when given.

    Raises urllib.error.URLError / OSError when the source is unreachable, ChecksumError when the
    content differs. A partial download never appears at `dest`.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, os.fdopen(fd, "wb") as out:
            total = response.headers.get("Content-Length")
            total = int(total) if total else None
            digest = hashlib.sha256()
            with Progress(total, f"download {dest.name}", unit="B", unit_scale=True, enabled=show_progress) as bar:
                while block := response.read(1 << 16):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        if sha256 and digest.hexdigest() != sha256:
            raise ChecksumError(f"{url}: sha256 {digest.hexdigest()} does not match the registered "
                                f"{sha256}; the file was not saved.")
        os.replace(tmp_name, dest)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return dest


def fetch_file(remote: RemoteFile, data_dir: str | os.PathLike | None = None,
               allow_download: bool | None = None, verify: bool = True) -> Path:
    """Returns the local path of `remote`, downloading it if absent and allowed.

    A present file whose checksum differs is used with a warning (users may refresh sources);
    a downloaded file must match exactly.
    """
    root = paths.resolve_data_dir(data_dir)
    local = root / remote.path
    if local.exists():
        if verify and sha256_of(local) != remote.sha256:
            warnings.warn(f"{local}: sha256 differs from the registered {remote.sha256[:12]}...; "
                          "results may not match the published protocol.", stacklevel=2)
        return local
    if allow_download is None:
        allow_download = os.environ.get(OFFLINE_ENV, "") not in ("1", "true", "yes")
    why = "downloads are disabled (CHMR_OFFLINE)" if not allow_download else ""
    if allow_download and remote.url:
        try:
            return download(remote.url, local, remote.sha256)
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            why = f"download from {remote.url} failed: {err}"
    elif not remote.url:
        why = f"it cannot be downloaded as-is ({remote.note})"
    url = paths.remote_of(local)   # a gs:// data dir: name the bucket, not this host's mirror of it
    raise DataNotFoundError(
        f"Data file {remote.path!r} is missing: expected it at {url + f' (mirrored to {local})' if url else local}. "
        f"{why}. "
        f"Put the file there, or point chmr_jax at a directory that has it with "
        f"--data_dir or the {paths.DATA_ENV} environment variable"
        + (f"; its public source is {remote.url}" if remote.url else "") + ".")


def fetch(dataset: str, basename: str, data_dir: str | os.PathLike | None = None,
          allow_download: bool | None = None) -> Path:
    """Local path of file `basename` of registered `dataset` (see fetch_file)."""
    if dataset not in REGISTRY:
        raise KeyError(f"unknown dataset {dataset!r}; registered: {sorted(REGISTRY)}")
    return fetch_file(REGISTRY[dataset].file(basename), data_dir, allow_download)

