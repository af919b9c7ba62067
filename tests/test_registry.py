"""Data directory resolution, the registry, and downloads (file:// and a loopback HTTP server)."""
import functools
import hashlib
import http.server
import threading

import pytest

from chmr_jax.data import paths, registry


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("CHMR_DATA_DIR", str(tmp_path / "env"))
    assert paths.resolve_data_dir(tmp_path / "flag") == (tmp_path / "flag").resolve()
    assert paths.resolve_data_dir() == (tmp_path / "env").resolve()
    monkeypatch.delenv("CHMR_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.resolve_data_dir() == tmp_path / "home" / ".cache" / "chmr_jax"
    monkeypatch.delenv("CHMR_CACHE_DIR", raising=False)
    assert paths.resolve_cache_dir() == (tmp_path / "home/.cache/chmr_jax/features").resolve()


def test_registry_checksums_match_shared_data(data_dir):
    for spec in registry.REGISTRY.values():
        for f in spec.files:
            assert registry.sha256_of(data_dir / f.path) == f.sha256, f.path
            assert f.url is None or f.url.startswith("https://")
            assert f.url or f.note


def _remote(tmp_path, content: bytes, url: str) -> registry.RemoteFile:
    return registry.RemoteFile("sub/file.csv", url, hashlib.sha256(content).hexdigest())


def test_download_from_file_url(tmp_path):
    src = tmp_path / "src.csv"
    src.write_bytes(b"smiles,y\nCCO,1\n")
    remote = _remote(tmp_path, src.read_bytes(), src.as_uri())
    local = registry.fetch_file(remote, tmp_path / "data", allow_download=True)
    assert local == tmp_path / "data/sub/file.csv" and local.read_bytes() == src.read_bytes()


@pytest.fixture()
def http_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_from_loopback_http_with_checksum(tmp_path, http_server):
    served, base = http_server
    content = b"x" * 200_000
    (served / "big.csv").write_bytes(content)
    remote = _remote(tmp_path, content, f"{base}/big.csv")
    local = registry.fetch_file(remote, tmp_path / "data", allow_download=True)
    assert local.read_bytes() == content
    # Present now: a second fetch does not download (the server copy can vanish).
    (served / "big.csv").unlink()
    assert registry.fetch_file(remote, tmp_path / "data", allow_download=True) == local


def test_checksum_mismatch_saves_nothing(tmp_path, http_server):
    served, base = http_server
    (served / "f.csv").write_bytes(b"tampered")
    remote = registry.RemoteFile("sub/f.csv", f"{base}/f.csv", "0" * 64)
    with pytest.raises(registry.ChecksumError, match="does not match"):
        registry.fetch_file(remote, tmp_path / "data", allow_download=True)
    assert not (tmp_path / "data/sub").exists() or not any((tmp_path / "data/sub").iterdir())


def test_missing_file_error_names_file_location_and_variable(tmp_path, http_server):
    _, base = http_server
    remote = registry.RemoteFile("infoalign/x/assays.csv.gz", f"{base}/nope.csv.gz", "0" * 64)
    with pytest.raises(registry.DataNotFoundError) as err:
        registry.fetch_file(remote, tmp_path, allow_download=True)
    msg = str(err.value)
    assert "infoalign/x/assays.csv.gz" in msg and str(tmp_path / "infoalign/x/assays.csv.gz") in msg
    assert "CHMR_DATA_DIR" in msg and "404" in msg
    with pytest.raises(registry.DataNotFoundError, match="downloads are disabled"):
        registry.fetch("chembl2k", "assays.csv.gz", tmp_path)        # CHMR_OFFLINE=1 in tests
    derived = registry.REGISTRY["l1000_drugbank"].file("drugbank_structures.tsv")
    with pytest.raises(registry.DataNotFoundError, match="cannot be downloaded as-is"):
        registry.fetch_file(derived, tmp_path, allow_download=True)


def test_modified_present_file_warns(tmp_path):
    remote = registry.RemoteFile("a.csv", None, "0" * 64, note="n")
    (tmp_path / "a.csv").write_text("smiles\n")
    with pytest.warns(UserWarning, match="sha256 differs"):
        assert registry.fetch_file(remote, tmp_path) == tmp_path / "a.csv"
