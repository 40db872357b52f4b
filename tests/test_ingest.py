"""ingest-dataset end to end: sources over real HTTP and the embedded S3 server, bad input that must
leave nothing behind, idempotency and interrupted uploads."""
from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.datasets import synthetic
from components.datasets.ingest import ingest
from components.datasets.split import SPLIT_RULE
from components.steps import ingest_step
from components.datasets.sources import PENNFUDAN_URL, cache_path
from components.datasets.validate import DatasetError
from components.storage import ObjectStore, StorageError
from helpers import free_port

pytestmark = pytest.mark.usefixtures("data_dir")  # fresh DATA_DIR and object cache per test


@pytest.fixture(scope="module")
def pennfudan_src(tmp_path_factory):
    """A small Penn-Fudan folder (4 FudanPed + 5 PennPed, small images); copy it before changing it."""
    return synthetic.make_pennfudan(tmp_path_factory.mktemp("pf"), 4, 5, seed=0, size_range=(40, 64))


@pytest.fixture
def pf(pennfudan_src, tmp_path):
    dest = tmp_path / "src" / "PennFudanPed"
    shutil.copytree(pennfudan_src, dest)
    return dest


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def serve_zip(folder: Path, tmp_path: Path, http_server) -> str:
    www = tmp_path / "www"
    synthetic.zip_folder(folder, www / "PennFudanPed.zip")
    return f"{http_server(www)}/PennFudanPed.zip"


def test_ingest_from_url_uploads_everything_then_manifest(pf, tmp_path, http_server, store, data_dir):
    url = serve_zip(pf, tmp_path, http_server)
    result = ingest(url, "auto", "penn-fudan", store, seed=0)
    summary = result.to_json()
    m = result.manifest
    root = store.key("datasets", "penn-fudan", result.content_hash) + "/"
    assert summary["dataset_uri"] == store.uri(root) and summary["manifest_uri"] == store.uri(root + "manifest.json")
    assert (summary["images"], summary["uploaded"], summary["skipped"]) == (9, 18, 0)
    assert summary["splits"] == m["totals"]["splits"]
    assert sum(v["images"] for v in summary["splits"].values()) == 9
    assert summary["instances"] == sum(it["instances"] for it in m["items"])
    keys = store.list(root)
    assert keys == sorted([it["image"]["key"] for it in m["items"]] + [it["mask"]["key"] for it in m["items"]]
                          + [root + "manifest.json"])
    assert store.get_json(root + "manifest.json") == json.loads(json.dumps(m))
    fudan = next(it for it in m["items"] if it["id"] == "FudanPed00001")
    assert fudan["group"] == "FudanPed" and fudan["image"]["key"] == root + "images/FudanPed00001.png"
    assert fudan["mask"]["key"] == root + "masks/FudanPed00001_mask.png"
    assert store.stat(fudan["image"]["key"]).sha256 == fudan["image"]["sha256"]
    with Image.open(pf / "PNGImages" / "FudanPed00001.png") as im:
        assert (fudan["width"], fudan["height"]) == im.size
    assert {k: m["split"][k] for k in ("rule", "seed", "fractions")} == {
        "rule": SPLIT_RULE, "seed": 0, "fractions": {"train": 0.7, "val": 0.15, "test": 0.15}}
    for split in ("train", "val", "test"):  # from 3 images up every split has one
        assert any(it["split"] == split for it in m["items"])
    # The zip is cached (only now, after success) and used by the next run: no second download.
    assert [p.name for p in files_under(data_dir)] == [cache_path(url, data_dir).name]
    (tmp_path / "www" / "PennFudanPed.zip").unlink()
    again = ingest(url, "auto", "penn-fudan", store, seed=0)
    assert (again.content_hash, again.uploaded, again.skipped) == (result.content_hash, 0, 18)
    assert again.manifest["created"] == m["created"]  # the committed manifest, not a rewrite


def test_damaged_data_cache_is_fetched_again(pf, tmp_path, http_server, store, data_dir):
    url = serve_zip(pf, tmp_path, http_server)
    cached = cache_path(url, data_dir)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"PK\x03\x04 half a zip")
    assert ingest(url, "auto", "pf", store).manifest["totals"]["images"] == 9
    assert cached.read_bytes() == (tmp_path / "www" / "PennFudanPed.zip").read_bytes()


def test_official_url_caches_like_the_seed(data_dir):
    assert cache_path(PENNFUDAN_URL) == data_dir / "PennFudanPed.zip"


def test_same_data_same_hash_from_any_source_and_changes_make_new_versions(pf, tmp_path, store):
    folder = ingest(str(pf), "penn-fudan", "pf", store)
    zipped = ingest(str(synthetic.zip_folder(pf, tmp_path / "pf.zip")), "auto", "pf", store)
    assert zipped.content_hash == folder.content_hash and zipped.uploaded == 0
    # Annotators drop the files into the store; ingest from there finds the same version.
    drop = store.key("incoming", "pf")
    for path in files_under(pf):
        store.put_file(f"{drop}/{path.relative_to(pf.parent).as_posix()}", path)
    from_s3 = ingest(f"s3://{store.config.bucket}/{drop}", "auto", "pf", store)
    assert from_s3.content_hash == folder.content_hash and from_s3.uploaded == 0
    reseeded = ingest(str(pf), "auto", "pf", store, seed=1)
    assert reseeded.content_hash != folder.content_hash
    mask = np.asarray(Image.open(pf / "PedMasks" / "PennPed00001_mask.png")).copy()
    mask[0, 0] = 0 if mask[0, 0] else 1
    Image.fromarray(mask).save(pf / "PedMasks" / "PennPed00001_mask.png")
    changed = ingest(f"s3://{store.config.bucket}/{drop}", "auto", "pf", store)
    assert changed.content_hash == folder.content_hash  # the store's copy did not change ...
    edited = ingest(str(pf), "auto", "pf", store)
    assert edited.content_hash != folder.content_hash  # ... the local one did
    assert edited.uploaded == 18  # a version is a complete folder of its own (layout contract)
    manifests = [k for k in store.list(store.key("datasets", "pf")) if k.endswith("manifest.json")]
    assert len(manifests) == 3


def test_zip_in_the_store_is_a_source(pf, tmp_path, store):
    key = store.key("incoming", "PennFudanPed.zip")
    store.put_file(key, synthetic.zip_folder(pf, tmp_path / "pf.zip"))
    result = ingest(store.uri(key), "auto", "pf", store)
    assert result.manifest["totals"]["images"] == 9


def test_interrupted_upload_is_finished_by_a_rerun(pf, store, monkeypatch):
    original, lock, calls = ObjectStore.put_file, threading.Lock(), [0]

    def flaky(self, key, path, sha256=None, content_type="application/octet-stream"):
        with lock:
            calls[0] += 1
            if calls[0] > 5:
                raise StorageError("connection lost (simulated)")
        return original(self, key, path, sha256, content_type)

    monkeypatch.setattr(ObjectStore, "put_file", flaky)
    with pytest.raises(StorageError, match="simulated"):
        ingest(str(pf), "auto", "pf", store)
    keys = store.list(store.key("datasets", "pf"))
    assert len(keys) == 5 and not any(k.endswith("manifest.json") for k in keys)
    monkeypatch.setattr(ObjectStore, "put_file", original)
    result = ingest(str(pf), "auto", "pf", store)
    assert (result.uploaded, result.skipped) == (13, 5)
    keys = store.list(store.key("datasets", "pf"))
    assert len(keys) == 19 and sum(k.endswith("manifest.json") for k in keys) == 1


def test_folder_dataset_with_one_image_serves_every_split(tmp_path, store):
    synthetic.make_folder(tmp_path / "one", ["only"], size=(32, 32), mask_suffix="_mask")
    result = ingest(str(tmp_path / "one"), "folder", "tiny", store)
    (item,) = result.manifest["items"]
    assert item["split"] == "train" and item["splits"] == ["train", "val", "test"] and item["group"] == "all"
    assert all(v["images"] == 1 for v in result.to_json()["splits"].values())


def test_ingest_step_writes_the_artifact_and_metadata(pf, tmp_path, s3_env):
    out = tmp_path / "outputs" / "dataset"
    meta = ingest_step(str(pf), "auto", "penn-fudan", 0, s3_env.endpoint, s3_env.bucket, s3_env.prefix, str(out))
    manifest = json.loads(out.read_text())
    assert meta["content_hash"] == manifest["content_hash"] and meta["uploaded"] == 18
    assert meta["manifest_uri"] == f"s3://{s3_env.bucket}/{manifest['root']}manifest.json"
    assert meta["dataset_uri"] == f"s3://{s3_env.bucket}/{manifest['root']}"
    assert meta["train_images"] + meta["val_images"] + meta["test_images"] == 9
    assert meta["train_instances"] == manifest["totals"]["splits"]["train"]["instances"]
    json.dumps(meta)


# -- bad input: a clear message, and nothing written anywhere ---------------------------------------
def assert_nothing_written(store: ObjectStore, data_dir: Path) -> None:
    assert store.list(store.key("datasets")) == []
    assert files_under(data_dir) == []


def _drop_mask(base):
    (base / "PedMasks" / "FudanPed00002_mask.png").unlink()
    return r"PennFudanPed/PNGImages/FudanPed00002\.png: no mask \(expected PennFudanPed/PedMasks/FudanPed00002_mask\.png\)"


def _drop_image(base):
    (base / "PNGImages" / "PennPed00003.png").unlink()
    return r"PennFudanPed/PedMasks/PennPed00003_mask\.png: mask without image"


def _resize_mask(base):
    p = base / "PedMasks" / "PennPed00001_mask.png"
    Image.open(p).resize((7, 9), Image.NEAREST).save(p)
    return r"PennFudanPed/PNGImages/PennPed00001\.png: image is \d+x\d+ but its mask .* is 7x9"


def _blank_mask(base):
    p = base / "PedMasks" / "PennPed00002_mask.png"
    Image.new("L", Image.open(p).size).save(p)
    return r"PennFudanPed/PedMasks/PennPed00002_mask\.png: mask has no instance"


def _mask_16bit(base):
    p = base / "PedMasks" / "FudanPed00003_mask.png"
    Image.fromarray(np.asarray(Image.open(p)).astype(np.uint16) * 300).save(p)
    return r"PennFudanPed/PedMasks/FudanPed00003_mask\.png: mask is 16-bit"


def _mask_rgb(base):
    p = base / "PedMasks" / "FudanPed00003_mask.png"
    Image.open(p).convert("RGB").save(p)
    return r"PennFudanPed/PedMasks/FudanPed00003_mask\.png: mask is mode RGB"


def _stray_file(base):
    (base / "PNGImages" / "Thumbs.txt").write_text("not an image")
    return r"PennFudanPed/PNGImages/Thumbs\.txt: not an image file"


def _fake_png(base):
    (base / "PNGImages" / "FudanPed00004.png").write_bytes(b"\x89PNG garbage")
    return r"PennFudanPed/PNGImages/FudanPed00004\.png: cannot decode as an image"


def _empty(base):
    for d in ("PNGImages", "PedMasks"):
        for p in (base / d).iterdir():
            p.unlink()
    return r"empty dataset: no images found"


@pytest.mark.parametrize("damage", [_drop_mask, _drop_image, _resize_mask, _blank_mask, _mask_16bit, _mask_rgb,
                                    _stray_file, _fake_png, _empty], ids=lambda f: f.__name__.strip("_"))
def test_bad_dataset_over_http(damage, pf, tmp_path, http_server, store, data_dir):
    match = damage(pf)
    url = serve_zip(pf, tmp_path, http_server)
    with pytest.raises(DatasetError, match=rf"^1 problem in {url}:\n  {match}"):
        ingest(url, "auto", "pf", store)
    assert_nothing_written(store, data_dir)


def test_truncated_zip(pf, tmp_path, http_server, store, data_dir):
    url = serve_zip(pf, tmp_path, http_server)
    zip_path = tmp_path / "www" / "PennFudanPed.zip"
    zip_path.write_bytes(zip_path.read_bytes()[: zip_path.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"1 problem in .*:\n  .*: not a valid zip \(File is not a zip file\)"):
        ingest(url, "auto", "pf", store)
    assert_nothing_written(store, data_dir)


def test_corrupt_member_in_zip(pf, tmp_path, store, data_dir):
    zip_path = synthetic.zip_folder(pf, tmp_path / "pf.zip")
    data = bytearray(zip_path.read_bytes())
    at = data.index(b"IDAT") + 40  # inside the first PNG's compressed pixels
    data[at] ^= 0xFF
    zip_path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"pf\.zip: corrupt zip \(member PennFudanPed/\S+ fails its CRC check\)"):
        ingest(str(zip_path), "auto", "pf", store)
    assert_nothing_written(store, data_dir)


def test_zip_without_the_expected_root(tmp_path, http_server, store, data_dir):
    other = tmp_path / "Other"
    (other / "pictures").mkdir(parents=True)
    (other / "pictures" / "a.png").write_bytes(b"x")
    (other / "labels.csv").write_text("a,1")
    url = serve_zip(other, tmp_path, http_server)
    with pytest.raises(DatasetError, match=r"1 problem in .*:\n  expected PennFudanPed/PNGImages/, "
                                           r"PennFudanPed/PedMasks/, PennFudanPed/Annotation/; found Other/"):
        ingest(url, "penn-fudan", "pf", store)
    with pytest.raises(DatasetError, match=r"not a known dataset layout: expected \[PennFudanPed/PNGImages/.*\] "
                                           r"or \[images/, masks/\]"):
        ingest(url, "auto", "pf", store)
    assert_nothing_written(store, data_dir)


def test_missing_annotation_folder(pf, store, data_dir):
    shutil.rmtree(pf / "Annotation")
    with pytest.raises(DatasetError, match=r"Annotation/: missing \(expected PennFudanPed/PNGImages/"):
        ingest(str(pf.parent), "penn-fudan", "pf", store)
    assert_nothing_written(store, data_dir)


def test_http_404(tmp_path, http_server, store, data_dir):
    (tmp_path / "www").mkdir()
    url = f"{http_server(tmp_path / 'www')}/PennFudanPed.zip"
    with pytest.raises(DatasetError, match=rf"1 problem in {url}:\n  {url}: HTTP 404"):
        ingest(url, "auto", "pf", store)
    assert_nothing_written(store, data_dir)


def test_unreachable_object_store(pf, tmp_path, http_server, s3, store, data_dir):
    url = serve_zip(pf, tmp_path, http_server)
    dead = ObjectStore(replace(s3, endpoint=f"127.0.0.1:{free_port()}", prefix=store.config.prefix),
                       create_bucket=False, retries=0)
    with pytest.raises(StorageError, match=r"object store at http://127\.0\.0\.1:\d+ is unreachable"):
        ingest(url, "auto", "pf", dead)
    assert_nothing_written(store, data_dir)  # not even the zip: the run did not succeed


def test_missing_local_source(tmp_path, store):
    with pytest.raises(DatasetError, match=r"1 problem in .*nope\.zip:\n  .*nope\.zip: no such file or folder"):
        ingest(str(tmp_path / "nope.zip"), "auto", "pf", store)


@pytest.mark.skipif(not os.environ.get("PENNFUDAN_ZIP"),
                    reason="set PENNFUDAN_ZIP to the real PennFudanPed.zip (no internet here to fetch it)")
def test_real_pennfudan(store):
    result = ingest(os.environ["PENNFUDAN_ZIP"], "auto", "penn-fudan", store)
    items = result.manifest["items"]
    assert result.manifest["layout"] == "penn-fudan"
    assert len(items) == 170 and sum(it["instances"] for it in items) == 423
    assert sum(it["group"] == "FudanPed" for it in items) == 74 and max(it["instances"] for it in items) <= 8
    assert {it["split"] for it in items} == {"train", "val", "test"}
