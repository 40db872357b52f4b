"""What a run says on its console beyond task lines: a store being retried, what --verify-data checked and
repaired, and the way out of a damaged dataset object. The real S3 server; the real console class."""
from __future__ import annotations

import io
import json

import pytest

from pipelines.local_console import Console


@pytest.fixture
def folder(tmp_path, data_dir):
    from components.datasets import synthetic

    return synthetic.make_folder(tmp_path / "ds", [f"s{i}" for i in range(6)], size=(40, 48), mask_suffix="_mask")


def _damage(store, key: str) -> None:
    """Overwrite an object's bytes but keep its recorded sha256, as bit rot does."""
    info = store.stat(key)
    junk = b"\x00garbage" * 10
    store.client.put_object(store.config.bucket, key, io.BytesIO(junk), len(junk), metadata={"sha256": info.sha256})


def test_verify_data_says_what_it_checked_and_repaired(folder, store, s3_env, tmp_path, capfd):
    from components.steps import ingest_step

    args = (str(folder), "folder", "pf", 0, s3_env.endpoint, s3_env.bucket, s3_env.prefix)
    ingest_step(*args, str(tmp_path / "m1.json"))
    assert "verify-data" not in capfd.readouterr().err  # a plain ingest says nothing of the kind
    manifest = json.loads((tmp_path / "m1.json").read_text())
    _damage(store, manifest["items"][0]["image"]["key"])
    ingest_step(*args, str(tmp_path / "m2.json"), verify=True)
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("sam-pipeline")]
    assert err == [f"sam-pipeline: verify-data: {2 * len(manifest['items'])} stored objects "
                   "of pf checked against their sha256; 1 missing or damaged re-uploaded"], err


def test_a_damaged_dataset_object_suggests_verify_data(folder, store):
    from components.datasets.ingest import ingest
    from components.storage import IntegrityError

    first = ingest(str(folder), "folder", "pf", store)
    key = first.manifest["items"][0]["image"]["key"]
    _damage(store, key)
    with pytest.raises(IntegrityError, match=r"sha256 mismatch .*sam-pipeline run --verify-data"):
        store.get_bytes(key)
    with pytest.raises(IntegrityError, match=r"--verify-data"):
        store.get_file(key, folder / "copy.png")


def test_the_console_shows_retries_and_verification_with_their_task():
    out, log = io.StringIO(), io.StringIO()
    console = Console(out, log)
    console.event("Executing task 'ingest-dataset'", 0.0)
    console.write("some chatter\nsam-pipeline: retrying: object store at http://x:1 is unreachable (connection "
                  "refused) while trying to check bucket b (up to 1 more tries)\n"
                  "sam-pipeline: verify-data: 12 stored objects of pf checked against their sha256; 0 missing or "
                  "damaged re-uploaded\n")
    shown = out.getvalue().splitlines()
    assert shown[1] == ("  ingest-dataset: retrying: object store at http://x:1 is unreachable (connection refused) "
                        "while trying to check bucket b (up to 1 more tries)")
    assert shown[2].startswith("  ingest-dataset: verify-data: 12 stored objects")
    assert "some chatter" not in out.getvalue() and "some chatter" in log.getvalue()
