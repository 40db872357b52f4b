"""The object store of the local runs in one working folder: one S3 server shared by every run of the folder
while any of them runs, and the local registry folder that keeps registered versions after it stops.

Sharing one store is what lets two runs started at once in one folder register v1 and v2: the registry's
create-only version claim then happens in one place. Each run holds a shared flock on `<root>/store/lease`
while it runs; the server (started by whichever run found none) ends once nobody holds it, a SIGKILLed run's
lock included (components/s3server.py, "lease:" owner). `<root>/store/server.json` says where it listens.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from components.files import atomic_path, unique_temp


@contextlib.contextmanager
def shared_store(pipeline_root: Path, *, bucket: str, prefix: str) -> Iterator:
    """The folder's S3 config for the duration of the `with`; starts the server when none is running, and then
    fills it with the versions of the local registry (earlier runs' models, which the champion gate and the
    version numbers must see)."""
    from components import s3server
    from components.storage import ObjectStore

    folder = pipeline_root / "store"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lease", "a") as lease:
        # Blocks only while a server that found itself unused is exiting (it holds the lock exclusively).
        fcntl.flock(lease, fcntl.LOCK_SH)
        with open(folder / "start.lock", "a") as start:
            fcntl.flock(start, fcntl.LOCK_EX)  # one run at a time decides whether to start the server
            endpoint = _running(folder / "server.json")
            if endpoint is None:
                _, url = s3server.start_server(f"lease:{folder / 'lease'}")
                endpoint = url.removeprefix("http://")
                # A bucket only this server has: a later run tells it from another server on a reused port.
                mark = f"sam-local-{uuid.uuid4().hex[:16]}"
                ObjectStore(s3server.local_config(endpoint, bucket=mark))
                seed_registry(ObjectStore(s3server.local_config(endpoint, bucket=bucket, prefix=prefix)),
                              pipeline_root / "registry")
                with atomic_path(folder / "server.json", suffix=".json") as tmp:
                    Path(tmp).write_text(json.dumps({"endpoint": endpoint, "mark": mark}) + "\n")
        yield s3server.local_config(endpoint, bucket=bucket, prefix=prefix)


def _running(path: Path) -> str | None:
    from components import s3server

    from components.storage import ObjectStore

    try:
        doc = json.loads(path.read_text())
        endpoint, mark = doc["endpoint"], doc["mark"]
    except (OSError, ValueError, KeyError):
        return None
    if not s3server.is_up(endpoint):
        return None
    store = ObjectStore(s3server.local_config(endpoint, bucket=mark), create_bucket=False)
    try:
        return endpoint if store.client.bucket_exists(mark) else None
    except Exception:  # noqa: BLE001 - whatever answers there and cannot say it has our bucket is not ours
        return None


def seed_registry(store, registry: Path) -> None:
    """Put the local registry's versions (kept by earlier runs) into a newly started store."""
    for path in sorted(registry.rglob("*")) if registry.is_dir() else ():
        parts = path.relative_to(registry).parts
        if path.is_file() and not any(p.startswith(".") for p in parts):  # not a copy still being written
            store.put_file(store.key(*parts), path)


def keep_registered(store, registered: dict, registry: Path) -> dict:
    """Copy the new version's folder (model, card, whatever the registry keeps there) and the model's own
    objects beside the version folders (the `latest` pointer the champion gate reads) into the local registry.
    A version folder already there is another store's claim of the same number (a store started while this
    one ran elsewhere, or a run with its own --s3-endpoint): not overwritten, reported as a conflict."""
    _, key = store.parse_uri(registered["model_uri"])
    version_key = key.rsplit("/", 1)[0]
    model_key = version_key.rsplit("/", 1)[0]
    folder = registry / version_key[len(store.config.prefix):]
    conflict = {"conflict": f"{folder} already exists (another local run registered the same version at the "
                            f"same time); this run's model is {registered['model_uri']} in a store that stops "
                            "with the runs"}
    if folder.exists():
        return conflict
    tmp = unique_temp(folder)  # hidden: seed_registry skips it; unique: two runs may copy at once
    try:
        for obj in store.list(version_key + "/"):
            store.get_file(obj, tmp / obj[len(version_key) + 1:])
        try:
            os.rename(tmp, folder)  # the version appears complete or not at all
        except OSError:
            if folder.exists():  # the other run's copy landed while this one was copying
                return conflict
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-copied stays behind, whatever failed
    for obj in store.list(model_key + "/"):
        if "/" not in obj[len(model_key) + 1:]:  # get_file replaces atomically
            store.get_file(obj, folder.parent / obj[len(model_key) + 1:])
    return {"model": str(folder / "model.pt"), "card": str(folder / "model_card.json")}
