"""fetch-weights against a real HTTP server and the embedded S3 server, with a randomly initialised
checkpoint of the real vit_t architecture standing in for mobile_sam.pt (no internet here)."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from components import weights
from components.download import DownloadError
from components.hashing import sha256_file
from components.storage import ObjectStore, StorageError
from components.steps import fetch_step
from components.weights import CATALOGUE, WeightsError, fetch_weights
from helpers import free_port


@pytest.fixture
def served(random_vit_t, tmp_path, http_server):
    """(url, sha256, size, www dir): the checkpoint behind http://127.0.0.1."""
    path, sha = random_vit_t
    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(path, www / "mobile_sam.pt")
    return f"{http_server(www)}/mobile_sam.pt", sha, path.stat().st_size, www


@pytest.fixture
def catalogue_at(served, monkeypatch):
    """The catalogue's vit_t entry pointed at the local server, with the random checkpoint's pins."""
    url, sha, size, _ = served
    entry = replace(CATALOGUE["vit_t"], url=url, sha256=sha, bytes=size)
    monkeypatch.setitem(CATALOGUE, "vit_t", entry)
    return entry


def cache_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_catalogue_pins_the_official_files():
    assert {k: (c.bytes, c.filename) for k, c in CATALOGUE.items()} == {
        "vit_t": (40_728_226, "vit_t_mobile_sam.pth"),
        "vit_b": (375_042_383, "vit_b_sam_vit_b_01ec64.pth"),
        "vit_h": (2_564_550_879, "vit_h_sam_vit_h_4b8939.pth")}
    assert CATALOGUE["vit_t"].sha256.startswith("6dbb9052") and CATALOGUE["vit_h"].url.endswith("4b8939.pth")


def test_download_verify_cache_then_object_store(served, store, tmp_path):
    url, sha, size, www = served
    first = fetch_weights("vit_t", url=url, sha256=sha, store=store)
    assert first.origin == "download" and first.sha256 == sha and first.bytes == size
    # Not the catalogue's file, so it must not take the official name.
    assert first.path == weights.models_dir() / f"vit_t_{sha}.pth"
    key = store.key("weights", "vit_t", sha, f"vit_t_{sha}.pth")
    assert first.object_uri == store.uri(key) and store.stat(key).sha256 == sha

    import torch
    from mobile_sam import sam_model_registry
    model = sam_model_registry["vit_t"]()
    model.load_state_dict(torch.load(first.path, map_location="cpu", weights_only=True))

    (www / "mobile_sam.pt").unlink()  # from here on a download would fail with 404
    assert fetch_weights("vit_t", url=url, sha256=sha, store=store).origin == "local-cache"
    first.path.unlink()
    again = fetch_weights("vit_t", url=url, sha256=sha, store=store)
    assert again.origin == "object-store" and sha256_file(again.path) == sha
    assert cache_files(weights.models_dir()) == [f"vit_t_{sha}.pth"]


def test_catalogue_entry_uses_official_name_and_pins(catalogue_at, served, tmp_path):
    _, sha, size, www = served
    result = fetch_weights("vit_t")
    assert result.path.name == "vit_t_mobile_sam.pth" and result.sha256 == sha and result.bytes == size
    assert result.source_url == catalogue_at.url and result.object_uri is None
    (www / "mobile_sam.pt").unlink()
    assert fetch_weights("vit_t").origin == "local-cache"


def test_corrupt_cache_is_refetched(catalogue_at, served):
    first = fetch_weights("vit_t")
    first.path.write_bytes(first.path.read_bytes()[:1000])  # truncated: size and sha both wrong
    again = fetch_weights("vit_t")
    assert again.origin == "download" and again.bytes == served[2]


def test_wrong_sha256_leaves_nothing(served, store):
    url, sha, size, _ = served
    with pytest.raises(WeightsError, match=f"sha256 mismatch: expected {'0' * 64}, got {sha}"):
        fetch_weights("vit_t", url=url, sha256="0" * 64, store=store)
    assert cache_files(weights.models_dir()) == []
    assert store.list(store.key("weights")) == []


def test_wrong_size_leaves_nothing(served, monkeypatch, store):
    url, sha, size, _ = served
    monkeypatch.setitem(CATALOGUE, "vit_t", replace(CATALOGUE["vit_t"], url=url, sha256=sha, bytes=size + 1))
    with pytest.raises(DownloadError, match=f"size mismatch: expected {size + 1} bytes, got {size}"):
        fetch_weights("vit_t", store=store)
    assert cache_files(weights.models_dir()) == []
    assert store.list(store.key("weights")) == []


def test_http_404_names_the_url(served):
    url, *_ = served
    with pytest.raises(WeightsError, match=r"vit_t weights: http://127\.0\.0\.1:\d+/nope\.pt: HTTP 404"):
        fetch_weights("vit_t", url=url.replace("mobile_sam.pt", "nope.pt"))
    assert cache_files(weights.models_dir()) == []


def test_unpinned_mirror_is_named_by_its_sha_and_found_again(served):
    url, sha, _, www = served
    first = fetch_weights("vit_b", url=url)  # a mirror: catalogue pins do not apply
    assert first.sha256 == sha and first.path.name == f"vit_b_{sha}.pth"
    (www / "mobile_sam.pt").unlink()
    assert fetch_weights("vit_b", url=url).origin == "local-cache"


def test_local_file_override(random_vit_t, tmp_path):
    path, sha = random_vit_t
    result = fetch_weights("vit_t", url=str(path), sha256=sha, cache_dir=tmp_path / "models")
    assert result.path == tmp_path / "models" / f"vit_t_{sha}.pth" and result.sha256 == sha


def test_unknown_model_type():
    with pytest.raises(WeightsError, match="unknown model type 'vit_x'; choose one of vit_t, vit_b, vit_h"):
        fetch_weights("vit_x")


def test_unreachable_object_store(served, s3):
    url, sha, *_ = served
    dead = ObjectStore(replace(s3, endpoint=f"127.0.0.1:{free_port()}"), create_bucket=False, retries=0)
    with pytest.raises(StorageError, match="is unreachable"):
        fetch_weights("vit_t", url=url, sha256=sha, store=dead)
    assert cache_files(weights.models_dir()) == []


def test_fetch_step_copies_to_the_artifact(catalogue_at, served, s3_env, tmp_path):
    out = tmp_path / "outputs" / "weights"
    meta = fetch_step("vit_t", "", "", s3_env.endpoint, s3_env.bucket, s3_env.prefix, str(out))
    _, sha, size, _ = served
    assert meta == {"model_type": "vit_t", "sha256": sha, "source_url": catalogue_at.url, "bytes": size,
                    "object_uri": f"s3://{s3_env.bucket}/{s3_env.prefix}weights/vit_t/{sha}/vit_t_mobile_sam.pth"}
    assert out.stat().st_size == size
    json.dumps(meta)


# -- an unpinned URL is re-checked: content that is not a checkpoint, or a changed size ---------------
def _small_checkpoint(path: Path, value: float) -> str:
    import torch

    torch.save({"image_encoder.w": torch.full((64,), value)}, path)
    return sha256_file(path)


def test_url_serving_a_non_checkpoint_is_refused_naming_the_url(tmp_path, http_server):
    www = tmp_path / "www"
    www.mkdir()
    (www / "mobile_sam.pt").write_text("<!doctype html><html><body>Sign in to continue</body></html>")
    url = f"{http_server(www)}/mobile_sam.pt"
    with pytest.raises(WeightsError) as e:
        fetch_weights("vit_b", url=url)
    msg = str(e.value)
    assert url in msg and "not a PyTorch checkpoint" in msg and "\n" not in msg
    assert "weights_only=False" not in msg and "weights_only" not in msg.replace("weights_only=True", "")
    assert cache_files(weights.models_dir()) == []


def test_cached_file_that_is_not_a_checkpoint_is_fetched_again(tmp_path, http_server):
    www = tmp_path / "www"
    www.mkdir()
    good_sha = _small_checkpoint(www / "m.pt", 1.0)
    url = f"{http_server(www)}/m.pt"
    # What an earlier version cached when the URL once served a login page of the very same size.
    cache = weights.models_dir()
    cache.mkdir(parents=True)
    bad = b"<html>" + b"x" * ((www / "m.pt").stat().st_size - 6)
    bad_sha = __import__("hashlib").sha256(bad).hexdigest()
    (cache / f"vit_b_{bad_sha}.pth").write_bytes(bad)
    (cache / "sources.json").write_text(json.dumps({url: bad_sha}))
    result = fetch_weights("vit_b", url=url)
    assert (result.origin, result.sha256) == ("download", good_sha)
    assert not (cache / f"vit_b_{bad_sha}.pth").exists()


def test_cached_file_whose_source_changed_size_is_fetched_again(tmp_path, http_server):
    www = tmp_path / "www"
    www.mkdir()
    first_sha = _small_checkpoint(www / "m.pt", 1.0)
    url = f"{http_server(www)}/m.pt"
    assert fetch_weights("vit_b", url=url).sha256 == first_sha
    import torch

    torch.save({"image_encoder.w": torch.ones(128)}, www / "m.pt")  # the mirror now serves a new file
    again = fetch_weights("vit_b", url=url)
    assert again.origin == "download" and again.sha256 == sha256_file(www / "m.pt") != first_sha
    # Same size as the cached file: no download (the size is all an unpinned URL can be checked by).
    assert fetch_weights("vit_b", url=url).origin == "local-cache"


@pytest.mark.parametrize("make, problem", [
    (lambda torch, p: torch.save({"image_encoder.w": torch.ones(3)}, p), None),
    (lambda torch, p: torch.save(torch.nn.Linear(2, 2).state_dict(), p), None),  # an OrderedDict
    (lambda torch, p: torch.save({"model": torch.nn.Linear(2, 2).state_dict()}, p), None),
    (lambda torch, p: torch.save(torch.nn.Linear(2, 2).state_dict(), p, pickle_protocol=4), None),
    (lambda torch, p: torch.save({"w": torch.ones(2)}, p, _use_new_zipfile_serialization=False), None),
    (lambda torch, p: torch.save(torch.ones(3), p), "holding Tensor, not a dict of tensors"),
    (lambda torch, p: torch.save(torch.ones(3), p, pickle_protocol=4), "holding Tensor, not a dict of tensors"),
    (lambda torch, p: torch.save([torch.ones(2)], p), "holding list, not a dict of tensors"),
    (lambda torch, p: torch.save({}, p), "holding an empty dict"),
    (lambda torch, p: p.write_text("<!doctype html><html></html>"), "not a PyTorch checkpoint"),
    (lambda torch, p: __import__("zipfile").ZipFile(p, "w").close(), "not a PyTorch checkpoint"),
])
def test_checkpoint_problem_reads_torch_files_without_torch(make, problem, tmp_path):
    """Files written by the real torch.save; the check itself imports no torch (the fetch-weights image has
    none: tests/test_images.py runs the step in a venv with only the weights extra)."""
    import torch

    path = tmp_path / "m.pt"
    make(torch, path)
    found = weights.checkpoint_problem(path)
    assert found == problem if problem is None else problem in found
