"""Downloads through a real HTTP server on 127.0.0.1."""
from __future__ import annotations

import pytest

from components.download import DownloadError, download
from components.hashing import sha256_bytes


@pytest.fixture
def served(tmp_path, http_server):
    root = tmp_path / "www"
    root.mkdir()
    (root / "f.bin").write_bytes(b"payload" * 1000)
    return http_server(root), sha256_bytes(b"payload" * 1000)


def test_download_verifies_and_renames(served, tmp_path):
    url, sha = served
    dest = tmp_path / "cache" / "f.bin"
    assert download(f"{url}/f.bin", dest, sha256=sha, size=7000) == sha
    assert dest.read_bytes() == b"payload" * 1000
    assert [p.name for p in dest.parent.iterdir()] == ["f.bin"]


@pytest.mark.parametrize("kwargs,match", [
    ({"sha256": "0" * 64}, "sha256 mismatch: expected 0{64}, got [0-9a-f]{64}"),
    ({"size": 12}, "size mismatch: expected 12 bytes, got 7000"),
])
def test_mismatch_leaves_nothing(served, tmp_path, kwargs, match):
    url, _ = served
    dest = tmp_path / "cache" / "f.bin"
    with pytest.raises(DownloadError, match=match):
        download(f"{url}/f.bin", dest, **kwargs)
    assert list(dest.parent.iterdir()) == []


def test_http_404_names_url(served, tmp_path):
    url, _ = served
    with pytest.raises(DownloadError, match=r"/missing.bin: HTTP 404"):
        download(f"{url}/missing.bin", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unreachable_host(tmp_path):
    from helpers import free_port

    url = f"http://127.0.0.1:{free_port()}/w.pt"
    with pytest.raises(DownloadError, match="unreachable"):
        download(url, tmp_path / "w.pt", timeout=2)


def test_local_path(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    assert download(str(src), tmp_path / "dst.bin") == sha256_bytes(b"abc")
    with pytest.raises(DownloadError, match="no such file"):
        download(str(tmp_path / "none"), tmp_path / "d2")
