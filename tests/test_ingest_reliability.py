"""Ingest and read-back under races, damage and bad input, against the real S3 server process."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.datasets import synthetic
from components.datasets.ingest import ingest
from components.datasets.reader import SplitRefs
from components.errors import UserError

pytestmark = pytest.mark.usefixtures("data_dir")  # fresh DATA_DIR and object cache per test


@pytest.fixture
def folder(tmp_path):
    return synthetic.make_folder(tmp_path / "ds", [f"s{i}" for i in range(6)], size=(40, 48), mask_suffix="_mask")


def test_byte_identical_files_are_read_concurrently(tmp_path, store):
    """Several items share one image and one mask (a dataset with copies): their downloads run in
    parallel threads into one cache entry and must all succeed."""
    src = synthetic.make_folder(tmp_path / "dup", ["a"], size=(40, 48), mask_suffix="_mask")
    # Noise does not compress: a few MB, so the parallel downloads of it overlap.
    noise = np.random.default_rng(0).integers(0, 256, (900, 900, 3), dtype=np.uint8)
    Image.fromarray(noise).save(src / "images" / "a.png")
    mask = np.zeros((900, 900), np.uint8)
    mask[100:300, 100:300] = 1
    Image.fromarray(mask).save(src / "masks" / "a_mask.png")
    for i in range(12):
        shutil.copy(src / "images" / "a.png", src / "images" / f"copy{i}.png")
        shutil.copy(src / "masks" / "a_mask.png", src / "masks" / f"copy{i}_mask.png")
    result = ingest(str(src), "folder", "dup", store)
    manifest = result.manifest
    assert len({it["image"]["sha256"] for it in manifest["items"]}) == 1
    for split in ("train", "val", "test"):
        refs = SplitRefs(store, manifest, split, tmp_path / f"cache-{split}")
        with ThreadPoolExecutor(8) as pool:  # several loads of one object at once: one cache entry, no leftovers
            samples = list(pool.map(refs.load, range(len(refs))))
        assert samples and all(s.image_sha256 == samples[0].image_sha256 for s in samples)
    leftovers = [p for p in (tmp_path / "cache-train").rglob("*") if p.is_file() and p.name.startswith(".")]
    assert leftovers == []


def _ingest_in_subprocess(cfg, source: str, name: str) -> subprocess.CompletedProcess:
    code = ("import sys, json; from components.storage import ObjectStore, S3Config; "
            "from components.datasets.ingest import ingest; "
            "c = S3Config(endpoint=sys.argv[1], bucket=sys.argv[2], prefix=sys.argv[3], "
            "access_key=sys.argv[4], secret_key=sys.argv[5]); "
            "r = ingest(sys.argv[6], 'folder', sys.argv[7], ObjectStore(c), workers=8); "
            "print(r.manifest_uri)")
    return subprocess.run([sys.executable, "-c", code, cfg.endpoint, cfg.bucket, cfg.prefix, cfg.access_key,
                           cfg.secret_key, source, name], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_parallel_ingests_of_the_same_data_both_succeed(tmp_path, s3):
    """Four processes and a thread ingest the same folder into the same new bucket at once: all succeed
    and the store holds exactly one manifest and one copy of each object. Before the store retried
    HTML 5xx answers, moto's "internal error" page under this load failed one ingest in about four."""
    import uuid
    from dataclasses import replace

    from components.storage import ObjectStore

    folder = synthetic.make_folder(tmp_path / "ds", [f"s{i}" for i in range(20)], size=(160, 160),
                                   mask_suffix="_mask")
    cfg = replace(s3, bucket=f"race-{uuid.uuid4().hex[:8]}", prefix="p/")
    with ThreadPoolExecutor(5) as pool:
        procs = [pool.submit(_ingest_in_subprocess, cfg, str(folder), "same") for _ in range(4)]
        threads = [pool.submit(lambda: ingest(str(folder), "folder", "same", ObjectStore(cfg)))]
        results = [f.result() for f in threads]
        done = [f.result() for f in procs]
    for proc in done:
        assert proc.returncode == 0, proc.stderr[-2000:]
    uris = {r.manifest_uri for r in results} | {p.stdout.strip() for p in done}
    assert len(uris) == 1
    reader = ObjectStore(cfg, create_bucket=False)
    keys = reader.list(reader.key("datasets", "same"))
    assert sum(k.endswith("/manifest.json") for k in keys) == 1 and len(keys) == 2 * 20 + 1


# -- a damaged store is repaired by --verify ------------------------------------------------------
def _damage(store, key: str) -> None:
    """Overwrite an object's bytes but keep its recorded sha256, as bit rot or a bad copy does."""
    import io

    info = store.stat(key)
    junk = b"\x00garbage" * 10
    store.client.put_object(store.config.bucket, key, io.BytesIO(junk), len(junk),
                            metadata={"sha256": info.sha256})


def test_verify_repairs_a_damaged_object(folder, store):
    first = ingest(str(folder), "folder", "pf", store)
    image_key = first.manifest["items"][0]["image"]["key"]
    mask_key = first.manifest["items"][1]["mask"]["key"]
    _damage(store, image_key)
    store.delete(mask_key)
    # A plain re-run trusts the committed manifest (documented: cheap, no download).
    plain = ingest(str(folder), "folder", "pf", store)
    assert (plain.uploaded, plain.skipped) == (0, 12)
    image_sha = first.manifest["items"][0]["image"]["sha256"]
    assert store.content_sha256(image_key) != image_sha
    repaired = ingest(str(folder), "folder", "pf", store, verify=True)
    assert (repaired.uploaded, repaired.skipped) == (2, 10)
    assert repaired.to_json()["verified"] == 12
    assert store.content_sha256(image_key) == image_sha
    assert store.get_bytes(image_key) == (folder / "images" / "s0.png").read_bytes()
    assert store.exists(mask_key)
    assert repaired.manifest_uri == first.manifest_uri
    again = ingest(str(folder), "folder", "pf", store, verify=True)
    assert (again.uploaded, again.skipped) == (0, 12)


def test_verify_rewrites_a_corrupt_manifest(folder, store):
    from components.storage import StorageError

    first = ingest(str(folder), "folder", "pf", store)
    manifest_key = first.manifest_uri.split("/", 3)[3]
    store.put_bytes(manifest_key, b'{"format_version": 1, "items": [')
    with pytest.raises(StorageError, match="not valid JSON") as e:
        ingest(str(folder), "folder", "pf", store)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    fixed = ingest(str(folder), "folder", "pf", store, verify=True)
    assert store.get_json(manifest_key)["content_hash"] == fixed.content_hash == first.content_hash


def test_cli_ingest_verify(folder, store, s3_env, capsys):
    import json

    from pipelines.cli import main

    ingest(str(folder), "folder", "pf", store)
    assert main(["ingest", "--source", str(folder), "--format", "folder", "--name", "pf", "--verify",
                 "--prefix", store.config.prefix]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verified"] == 12 and (out["uploaded"], out["skipped"]) == (0, 12)


# -- bad input: one line naming the thing -----------------------------------------------------------
@pytest.mark.parametrize("name", ["a/../b", "../x", "Upper", "", "a b"])
def test_bad_dataset_name_is_a_user_error(folder, store, name):
    with pytest.raises(UserError) as e:
        ingest(str(folder), "folder", name, store)
    assert repr(name) in str(e.value) and "\n" not in str(e.value)
    assert store.list(store.key("datasets")) == []


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height (Pillow reads the size from the header before any pixel)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_decompression_bomb_is_a_validation_problem(folder, store):
    from components.datasets.validate import DatasetError

    _png_header_only(folder / "images" / "s2.png", 30_000, 30_000)  # 900 megapixels
    with pytest.raises(DatasetError) as e:
        ingest(str(folder), "folder", "pf", store)
    (problem,) = e.value.problems
    assert problem.startswith("images/s2.png:") and "900000000 pixels" in problem
    assert "SAM_MAX_IMAGE_PIXELS" in problem
    assert store.list(store.key("datasets")) == []


def test_pixel_limit_is_configurable(folder, store, monkeypatch):
    from components.datasets.validate import DatasetError

    monkeypatch.setenv("SAM_MAX_IMAGE_PIXELS", "1000")  # the images are 40x48 = 1920 pixels
    with pytest.raises(DatasetError) as e:
        ingest(str(folder), "folder", "pf", store)
    assert len(e.value.problems) == 12 and "images/s0.png" in str(e.value)
    # An explicit parameter wins over the environment.
    assert ingest(str(folder), "folder", "pf", store, max_pixels=2000).manifest["totals"]["images"] == 6
    monkeypatch.setenv("SAM_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(UserError, match="SAM_MAX_IMAGE_PIXELS='lots' must be a positive whole number"):
        ingest(str(folder), "folder", "pf", store)


def test_every_problem_is_listed_with_its_file(folder, store):
    from components.datasets.validate import DatasetError

    (folder / "masks" / "s1_mask.png").unlink()
    (folder / "images" / "s3.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError) as e:
        ingest(str(folder), "folder", "pf", store)
    assert len(e.value.problems) == 2
    text = str(e.value)
    assert "s1" in text and "images/s3.png" in text and text.count("\n") == 2


# -- a killed ingest's temp folders are cleaned by the next one ----------------------------------
def test_stale_work_folders_of_dead_ingests_are_removed(folder, store, tmp_path, monkeypatch):
    import tempfile
    import time

    from components.datasets import sources

    tmp = tmp_path / "systmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    old = time.time() - 3600
    stale = tmp / f"sam-ingest-{dead_pid}-abc"
    fresh = tmp / f"sam-ingest-{dead_pid}-new"  # a dead owner, but too recent to be sure it is not reused
    alive = tmp / f"sam-ingest-{os.getpid()}-mine"
    other = tmp / "sam-ingest-legacy"  # no pid in the name: not ours to judge
    for d in (stale, fresh, alive, other):
        (d / "unzipped").mkdir(parents=True)
        (d / "unzipped" / "x.png").write_bytes(b"x" * 1000)
    for d in (stale, alive, other):
        os.utime(d, (old, old))
    ingest(str(folder), "folder", "pf", store)
    assert sorted(p.name for p in tmp.iterdir()) == sorted([fresh.name, alive.name, other.name])
    assert sources.STALE_AFTER_S <= 600


@pytest.mark.parametrize("where", ["local", "store"])
def test_corrupt_manifest_is_one_line_when_read(folder, store, tmp_path, where):
    from components.datasets.reader import load_manifest

    first = ingest(str(folder), "folder", "pf", store)
    if where == "local":
        ref = tmp_path / "manifest.json"
        ref.write_text('{"format_version": 1, "ite')
    else:
        ref = first.manifest_uri
        store.put_bytes(ref.split("/", 3)[3], b'{"format_version": 1, "ite')
    with pytest.raises(UserError) as e:
        load_manifest(store, ref)
    assert str(ref) in str(e.value) and "not valid JSON" in str(e.value) and "\n" not in str(e.value)
