"""The object store of the local runs in one working folder: one S3 server shared by every run of the folder
while any of them runs, keeping its objects in `<root>/store/objects/` across runs.

What a run stores (datasets, embeddings, checkpoints, registered versions) is written through to that folder by
the server itself (components/s3_process.py), and the next server of the folder starts with it: the store is
content-addressed, so a later run finds the dataset and embeddings an earlier one made and computes them no
more, and the registry's versions and champion are simply there. One mechanism for all of it: no copies out.

Sharing one server is what lets two runs started at once in one folder register v1 and v2: the registry's
create-only version claim then happens in one place. Each run holds a shared flock on `<root>/store/lease`
while it runs; the server (started by whichever run found none) ends once nobody holds it, a SIGKILLed run's
lock included (components/s3_process.py, "lease:" owner). `<root>/store/server.json` says where it listens.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from components.errors import UserError
from components.files import atomic_path


def objects_folder(pipeline_root: Path) -> Path:
    """Where the folder's store keeps its objects (what `run --fresh` empties)."""
    return pipeline_root / "store" / "objects"


@contextlib.contextmanager
def shared_store(pipeline_root: Path, *, bucket: str, prefix: str, fresh: bool = False) -> Iterator:
    """The folder's S3 config for the duration of the `with`; starts the server (with the objects earlier runs
    kept) when none is running. `fresh`: first empty the store: every object, registered versions included."""
    from components import s3server
    from components.storage import ObjectStore

    folder = pipeline_root / "store"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lease", "a") as lease:
        if fresh:
            _empty(folder, lease, objects_folder(pipeline_root))
        # Blocks only while a server that found itself unused is exiting (it holds the lock exclusively).
        fcntl.flock(lease, fcntl.LOCK_SH)
        with open(folder / "start.lock", "a") as start:
            fcntl.flock(start, fcntl.LOCK_EX)  # one run at a time decides whether to start the server
            endpoint = _running(folder / "server.json")
            if endpoint is None:
                proc, url = s3server.start_server(f"lease:{folder / 'lease'}", objects=objects_folder(pipeline_root))
                endpoint = url.removeprefix("http://")
                # A bucket only this server has (empty, so never kept): a later run tells it from another server
                # on a reused port.
                mark = f"sam-local-{uuid.uuid4().hex[:16]}"
                ObjectStore(s3server.local_config(endpoint, bucket=mark))
                with atomic_path(folder / "server.json", suffix=".json") as tmp:
                    Path(tmp).write_text(json.dumps({"endpoint": endpoint, "mark": mark, "pid": proc.pid}) + "\n")
        yield s3server.local_config(endpoint, bucket=bucket, prefix=prefix)


def _empty(folder: Path, lease, objects: Path, wait: float = 2.0) -> None:
    """Remove every object of the folder's store, with no run using it: the lease held exclusively (a server
    that found itself unused holds it for a moment while it exits), then a server still idling is stopped (it
    keeps its objects in memory too), then the objects folder goes."""
    from components import s3server

    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(lease, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise UserError(f"--fresh: another run is using the store in {folder}; start a fresh store when "
                                "no other run of this folder is running") from None
            time.sleep(0.2)
    doc = _server_doc(folder / "server.json")
    if doc and _running(folder / "server.json") and doc.get("pid"):
        # Idle (no run holds the lease), and every write it acknowledged is on disk already: SIGKILL loses nothing.
        with contextlib.suppress(ProcessLookupError):  # it may just have ended by itself
            os.kill(doc["pid"], signal.SIGKILL)
        while s3server.is_up(doc["endpoint"]) and time.monotonic() < deadline + 30:
            time.sleep(0.1)
    (folder / "server.json").unlink(missing_ok=True)
    shutil.rmtree(objects, ignore_errors=True)


def _server_doc(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
        return doc if isinstance(doc, dict) and "endpoint" in doc and "mark" in doc else None
    except (OSError, ValueError):
        return None


def _running(path: Path) -> str | None:
    """The endpoint of the folder's server when it answers and is ours (it has our mark bucket)."""
    from components import s3server
    from components.storage import ObjectStore

    doc = _server_doc(path)
    if doc is None or not s3server.is_up(doc["endpoint"]):
        return None
    endpoint, mark = doc["endpoint"], doc["mark"]
    store = ObjectStore(s3server.local_config(endpoint, bucket=mark), create_bucket=False)
    try:
        return endpoint if store.client.bucket_exists(mark) else None
    except Exception:  # noqa: BLE001 - whatever answers there and cannot say it has our bucket is not ours
        return None
