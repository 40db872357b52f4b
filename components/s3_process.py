"""The embedded S3 server's own process: moto's S3 server, a watchdog that ends it when nobody needs it any more,
and, for the store the local runs of a working folder share, its objects kept in a folder across servers.

components/s3server.py runs this file as a script (`python s3_process.py OWNER EVERY [--objects DIR] --fd -p`). It
imports nothing of this package on purpose: the child needs only the standard library and moto.

Why moto with write-through (and not an S3 server with a filesystem backend): the steps keep talking to a real
S3 server process with the minio client code of the cluster, and moto is the server every test already runs
against: conditional puts (the registry's create-only claims), multipart uploads, listings and errors behave
as the tests know them. What moto lacks is durability, added here in one place:
- every object change a client makes (put, multipart completion, copy, delete, multi-delete) is written to
  `DIR` before the client gets its answer, so a server killed with SIGKILL loses nothing that was acknowledged;
- each object is one record file, written to a temporary name and renamed over the old one, so a killed writer
  leaves either the old record or the new one, never a torn object (and a record cut short is skipped on load);
- a starting server reads only each record's header line; bytes are read from the file when a client asks, and
  a written object's bytes leave memory once on disk, so 700 MB of embeddings cost no memory and no start time.
A record: one JSON header line (bucket, key, size, ETag, metadata, a unique id) and then the object's bytes, at
`DIR/<h[:2]>/<h>` with h the sha256 of "bucket/key" (any key, of any length or characters, is one flat name).
Kept: bytes, metadata (content type, x-amz-meta-*) and ETag. Not kept: ACLs, tags, versions, empty buckets.
"""
from __future__ import annotations

import argparse
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

REGION = "us-east-1"  # the region the local configs name (components/s3server.local_config)


# -- the watchdog -----------------------------------------------------------------------------------------
# "pid:<parent>": the server belongs to one process; the watchdog compares getppid() with it (a dead parent's
# children are re-parented), so it works where PR_SET_PDEATHSIG does not exist. "lease:<file>": the server is
# shared by the runs of one working folder (pipelines/local_store.py); each holds a shared flock on the file
# while it runs, and the kernel drops a killed run's lock, so the server ends once it can take the lock
# exclusively. A SIGKILLed parent runs no cleanup: without this, each killed run left a server behind.

def watch_parent(parent: int, every: float) -> None:
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(0)


def watch_lease(path: str, every: float) -> None:
    with open(path, "a") as lease:
        while True:
            time.sleep(every)
            try:
                fcntl.flock(lease, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue
            os._exit(0)  # still holding the lock: a run arriving now waits, then starts a new server


# -- records --------------------------------------------------------------------------------------------

def record_path(folder: Path, bucket: str, key: str) -> Path:
    h = hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()
    return folder / h[:2] / h


class Stored:
    """A key's bytes in its record file, read when a client asks (moto's FakeKey reads its `_value_buffer`
    with seek and read). Each read checks the record's id: a newer put of the same key may have replaced the
    file since this key was looked up; the read then fails, the client is answered 500 and retries, and gets
    the newer key: never new bytes under the old key's ETag and checksum."""

    def __init__(self, path: Path, rid: str, offset: int, size: int):
        self.path, self.rid, self.offset, self.size, self.pos = path, rid, offset, size, 0

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos + (0, self.pos, self.size)[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int | None = -1) -> bytes:
        with open(self.path, "rb") as f:
            if json.loads(f.readline())["id"] != self.rid:
                raise OSError(f"{self.path} was replaced by a newer write of its key")
            f.seek(self.offset + self.pos)
            left = self.size - self.pos
            data = f.read(left if n is None or n < 0 else min(n, left))
        self.pos += len(data)
        return data

    def close(self) -> None:
        pass


def write_record(folder: Path, bucket: str, key) -> Stored:
    """Write one moto key to its record (temporary file, then renamed over the old record)."""
    path = record_path(folder, bucket, key.name)
    header = {"format": 1, "id": uuid.uuid4().hex, "bucket": bucket, "key": key.name, "size": key.size,
              "etag": key.etag.strip('"'), "metadata": dict(key.metadata),
              "last_modified": key.last_modified.isoformat()}
    line = json.dumps(header).encode() + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{header['id']}.tmp")  # hidden: loading skips (and removes) it
    try:
        with open(tmp, "wb") as f:
            f.write(line)
            with key.lock:
                key._value_buffer.seek(0)
                shutil.copyfileobj(key._value_buffer, f, 1 << 20)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Stored(path, header["id"], len(line), key.size)


def _read_header(path: Path) -> dict | None:
    """A record's header, or None for a record cut short (the machine stopped before the data reached disk)."""
    try:
        with open(path, "rb") as f:
            line = f.readline()
            header = json.loads(line)
            complete = os.fstat(f.fileno()).st_size == len(line) + header["size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {**header, "offset": len(line)} if complete else None


def load(folder: Path, backend) -> dict:
    """Put every record of `folder` into moto's backend (headers only: bytes stay on disk); returns
    {(bucket, key): moto key} of what is on disk."""
    on_disk = {}
    for path in sorted(folder.glob("*/*")):
        if path.name.startswith("."):
            path.unlink(missing_ok=True)  # a write a killed server did not finish: never acknowledged
            continue
        header = _read_header(path)
        if header is None:
            print(f"s3 store: skipping {path}: not a complete record", file=sys.stderr, flush=True)
            continue
        bucket, name = header["bucket"], header["key"]
        if bucket not in backend.buckets:
            backend.create_bucket(bucket, REGION)
        key = backend.put_object(bucket, name, b"", disable_notification=True)
        key.set_metadata(header["metadata"])
        key._etag, key.contentsize = header["etag"], header["size"]
        key.last_modified = datetime.datetime.fromisoformat(header["last_modified"])
        key._value_buffer = Stored(path, header["id"], header["offset"], header["size"])
        on_disk[bucket, name] = key
    return on_disk


class WriteThrough:
    """WSGI middleware around moto's app: after a successful request that may change objects, the objects it
    names are made the same on disk as in moto, before the answer leaves. One lock around each changing request
    and its write-through: two runs uploading the same weights at once had moto replace (and close the bytes
    of) the key one of them was copying to disk; now changes reach moto and the disk one at a time, so the
    last write of a key wins on disk as in moto. Reads stay concurrent."""

    def __init__(self, app, folder: Path, backend, on_disk: dict):
        self.app, self.folder, self.backend, self.on_disk = app, folder, backend, on_disk
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        if environ["REQUEST_METHOD"] not in ("PUT", "POST", "DELETE"):
            return self.app(environ, start_response)
        answer = []
        with self.lock:
            body = self.app(environ, lambda status, headers, exc_info=None: answer.append(
                (status, headers, exc_info)) or (lambda data: None))
            status, headers, exc_info = answer[0]
            try:
                if status.startswith("2"):
                    self.sync(environ)
            except Exception:  # noqa: BLE001 - the client must not believe a write that is not on disk
                traceback.print_exc()
                if hasattr(body, "close"):
                    body.close()
                start_response("500 Internal Server Error", [("Content-Type", "application/xml")])
                return [b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code><Message>"
                        b"could not write the object to the store folder</Message></Error>"]
        start_response(status, headers, exc_info)
        return body

    def sync(self, environ) -> None:
        raw = environ.get("RAW_URI") or environ.get("PATH_INFO", "/")  # as moto's Request.raw_path reads it
        path = unquote(urlparse(raw).path if "://" in raw else raw.split("?", 1)[0])
        bucket, _, name = path.lstrip("/").partition("/")
        store = self.backend.buckets.get(bucket)
        if name:
            self._sync_key(store, bucket, name)
        query = {part.partition("=")[0] for part in environ.get("QUERY_STRING", "").split("&")}
        if "delete" in query or store is None:
            # a multi-object delete names its keys in the body: check every key of the bucket on disk
            for b, k in [bk for bk in self.on_disk if bk[0] == bucket]:
                self._sync_key(store, b, k)

    def _sync_key(self, store, bucket: str, name: str) -> None:
        key = store.keys.get(name) if store is not None else None
        if key is self.on_disk.get((bucket, name)):
            return
        if key is None:
            record_path(self.folder, bucket, name).unlink(missing_ok=True)
            del self.on_disk[bucket, name]
            return
        stored = write_record(self.folder, bucket, key)
        with key.lock:  # the bytes now live on disk: moto's copy (memory or a temporary file) goes
            old, key._value_buffer = key._value_buffer, stored
        old.close()
        if key.multipart is not None:  # the uploaded parts, kept by moto beside the object
            key.multipart.dispose()
            key.multipart = None
        self.on_disk[bucket, name] = key


# -- the process ----------------------------------------------------------------------------------------

def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="moto's S3 server for sam-pipeline")
    parser.add_argument("owner", help='"pid:<parent>" or "lease:<file>"')
    parser.add_argument("every", type=float, help="watchdog interval, seconds")
    parser.add_argument("--objects", type=Path, help="keep objects in this folder (write-through)")
    parser.add_argument("--fd", type=int, required=True, help="the listening socket, bound by the parent")
    parser.add_argument("-p", "--port", type=int, required=True, help="its port (moto puts it in URLs)")
    args = parser.parse_args(argv)
    kind, _, arg = args.owner.partition(":")
    target, owner = (watch_parent, int(arg)) if kind == "pid" else (watch_lease, arg)
    threading.Thread(target=target, args=(owner, args.every), daemon=True, name="watchdog").start()

    os.environ.setdefault("MOTO_PORT", str(args.port))
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from moto.s3.models import s3_backends
    from werkzeug.serving import make_server

    for sig in (signal.SIGINT, signal.SIGTERM):  # as moto's own server does: exit, running finally blocks
        signal.signal(sig, lambda *_: sys.exit(0))
    app = DomainDispatcherApplication(create_backend_app)
    app.debug = True  # as moto's own server sets it
    if args.objects is not None:
        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        args.objects.mkdir(parents=True, exist_ok=True)
        app = WriteThrough(app, args.objects, backend, load(args.objects, backend))
    make_server("127.0.0.1", args.port, app, threaded=True, request_handler=MotoRequestHandler,
                fd=args.fd).serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
