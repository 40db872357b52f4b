"""S3-compatible object store (SeaweedFS or MinIO in KFP, moto locally) through the minio client.

Every object carries its sha256 in user metadata, so readers can verify what they fetch and writers
can skip what is already there.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import sys
import time
import urllib3
import weakref
from xml.etree.ElementTree import ParseError
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from minio import Minio
from minio.commonconfig import CopySource
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import check_bucket_name

from components.errors import UserError
from components.files import atomic_path
from components.hashing import sha256_bytes, sha256_file

SHA_META = "sha256"  # stored as x-amz-meta-sha256
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken"}
_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"}


class StorageError(UserError, RuntimeError):
    """A one-line, user-facing storage failure."""


class IntegrityError(StorageError):
    """An object whose bytes no longer match the sha256 recorded when it was written."""


def _refused(e: BaseException) -> bool:
    """Whether nothing listens at the endpoint (ECONNREFUSED anywhere in urllib3's chain of reasons)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ConnectionRefusedError):
            return True
        e = getattr(e, "reason", None) or e.__cause__ or e.__context__
    return False


def _status_of(e: Exception) -> int:
    """The HTTP status of a non-S3 answer (0 when minio only failed to parse a 2xx body as XML)."""
    if isinstance(e, ServerError):
        return e.status_code
    return int(getattr(e, "_code", 0) or 0)


@dataclass(frozen=True)
class S3Config:
    endpoint: str = "seaweedfs.kubeflow:9000"
    bucket: str = "mlpipeline"
    prefix: str = "sam-pipeline/"
    access_key: str | None = None
    secret_key: str | None = None
    secure: bool = False
    region: str | None = None

    @classmethod
    def from_env(cls, **overrides) -> "S3Config":
        env = os.environ
        values = {
            "endpoint": env.get("S3_ENDPOINT"),
            "bucket": env.get("S3_BUCKET"),
            "prefix": env.get("S3_PREFIX"),
            # KFP's secret mlpipeline-minio-artifact uses the keys accesskey/secretkey.
            "access_key": env.get("AWS_ACCESS_KEY_ID") or env.get("accesskey"),
            "secret_key": env.get("AWS_SECRET_ACCESS_KEY") or env.get("secretkey"),
            "secure": _truthy(env["S3_SECURE"]) if "S3_SECURE" in env else None,
            "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None and v != ""})
        cfg = cls(**{k: v for k, v in values.items() if v is not None})
        endpoint = cfg.endpoint
        # Accept URLs as users paste them; the scheme decides TLS.
        if endpoint.startswith("https://"):
            cfg = replace(cfg, endpoint=endpoint[8:].rstrip("/"), secure=True)
        elif endpoint.startswith("http://"):
            cfg = replace(cfg, endpoint=endpoint[7:].rstrip("/"), secure=False)
        if cfg.prefix and not cfg.prefix.endswith("/"):
            cfg = replace(cfg, prefix=cfg.prefix + "/")
        return cfg


def _truthy(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def check_bucket(bucket: str) -> str:
    """The bucket name, or a one-line StorageError (callers may check flags before any work starts)."""
    try:
        check_bucket_name(bucket, strict=True)
    except ValueError as e:
        raise StorageError(f"invalid bucket name {bucket!r}: {e}") from None
    return bucket


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str | None
    etag: str | None = None


def _connections() -> urllib3.PoolManager:
    # Fail fast on an unreachable endpoint: urllib3's own retries would hide it for minutes.
    return urllib3.PoolManager(timeout=urllib3.Timeout(connect=5, read=120),
                               retries=urllib3.Retry(total=0, connect=0, read=0, redirect=0), maxsize=16)


def _own_connections_after_fork() -> None:
    # A forked child (a DataLoader worker) must not share the parent's keep-alive sockets: requests interleave.
    for store in list(_LIVE_STORES):
        store.client._http = _connections()  # minio's one HTTP pool (Minio.__init__'s http_client)


_LIVE_STORES: "weakref.WeakSet[ObjectStore]" = weakref.WeakSet()
os.register_at_fork(after_in_child=_own_connections_after_fork)


class ObjectStore:
    def __init__(self, config: S3Config, *, create_bucket: bool = True, retries: int = 4, retry_delay: float = 0.5):
        check_bucket(config.bucket)
        # retry_delay: the first backoff in seconds, doubling after each try (tests that count tries shorten it).
        self.config, self.retries, self.retry_delay = config, retries, retry_delay
        self.client = Minio(config.endpoint, access_key=config.access_key, secret_key=config.secret_key,
                            secure=config.secure, region=config.region, http_client=_connections())
        _LIVE_STORES.add(self)
        if create_bucket:
            self._ensure_bucket()

    # -- naming -------------------------------------------------------------------------------
    def key(self, *parts: str) -> str:
        return self.config.prefix + "/".join(p.strip("/") for p in parts)

    def uri(self, key: str) -> str:
        return f"s3://{self.config.bucket}/{key}"

    @staticmethod
    def parse_uri(uri: str) -> tuple[str, str]:
        if not uri.startswith("s3://"):
            raise StorageError(f"not an s3:// uri: {uri}")
        bucket, _, key = uri[5:].partition("/")
        if not bucket:
            raise StorageError(f"s3 uri has no bucket: {uri}")
        return bucket, key

    def for_bucket(self, bucket: str) -> "ObjectStore":
        if bucket == self.config.bucket and not self.config.prefix:
            return self
        return ObjectStore(replace(self.config, bucket=bucket, prefix=""), create_bucket=False,
                           retries=self.retries, retry_delay=self.retry_delay)

    # -- retries and error translation ---------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        """The one retry mechanism: throttling, 5xx, non-S3 answers and connection errors are retried
        with jittered exponential backoff; what is still failing after `retries` becomes one line. A
        refused connection (nothing listens there) is retried once only, and the first retry of each
        call is said at once on stderr (the run's console shows it), not only after every retry failed."""
        delay, limit = self.retry_delay, self.retries
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except S3Error as e:
                if e.code in _CREDENTIAL_CODES:
                    raise StorageError(
                        f"object store at {self.config.endpoint} rejected the credentials ({e.code}) "
                        f"while trying to {what}; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                        f"(in a cluster: secret mlpipeline-minio-artifact)") from None
                status = getattr(e.response, "status", 0) or 0
                # 501 Not Implemented is an answer, not an outage.
                if e.code not in _TRANSIENT_CODES and (status < 500 or status == 501):
                    raise  # callers translate what they expect (NoSuchKey, PreconditionFailed, ...)
                failure = (f"object store at {self._scheme()}://{self.config.endpoint} keeps failing "
                           f"({e.code}, HTTP {status or '?'}) while trying to {what}; try again later")
            except (InvalidResponseError, ServerError, ParseError) as e:
                # A 5xx without an S3 error body (a proxy or load balancer in front of the store, a
                # crashed request handler), or an answer that is not S3 at all (a web page).
                status = _status_of(e)
                limit = limit if status >= 500 else 0  # a web page does not turn into S3 by asking again
                failure = (f"object store at {self._scheme()}://{self.config.endpoint} keeps failing "
                           f"(HTTP {status}) while trying to {what}; try again later") if status >= 500 else (
                    f"{self._scheme()}://{self.config.endpoint} is not an S3 endpoint (it answered "
                    f"HTTP {status or '2xx'} with something that is not S3 XML) while trying to {what}; "
                    "check --s3-endpoint / S3_ENDPOINT")
            except (urllib3.exceptions.HTTPError, OSError) as e:
                refused = _refused(e)
                limit = min(limit, 1) if refused else limit
                failure = (f"object store at {self._scheme()}://{self.config.endpoint} is unreachable "
                           f"({'connection refused' if refused else type(e).__name__}) while trying to {what}; "
                           "set --s3-endpoint / S3_ENDPOINT")
            if attempt >= limit:
                raise StorageError(failure) from None
            if attempt == 0:
                print(f"sam-pipeline: retrying: {failure.split(';')[0]} (up to {limit} more tries)",
                      file=sys.stderr, flush=True)
            # Jittered exponential backoff, so parallel uploads do not retry in lockstep.
            time.sleep(delay * (1 + random.random()))
            delay *= 2

    def _repair_hint(self, key: str) -> str:
        """How a damaged object is repaired: a dataset's files are re-checked and re-uploaded from the source."""
        if key.startswith(self.config.prefix + "datasets/"):
            return "; `sam-pipeline run --verify-data` (or `ingest --verify`) re-checks the dataset and repairs it"
        return ""

    def _scheme(self) -> str:
        return "https" if self.config.secure else "http"

    def _ensure_bucket(self) -> None:
        bucket = self.config.bucket
        exists = self._call(f"check bucket {bucket}", self.client.bucket_exists, bucket)
        if exists and self.config.region:
            # With a region set, the client asks nothing that must parse as S3 XML before writing: a
            # web server answers the HEAD above (and every PUT) with 200. An empty listing must parse.
            self._call(f"list bucket {bucket}", lambda: list(
                self.client.list_objects(bucket, prefix=self.key(".s3-probe/"))))
        if not exists:
            try:
                self._call(f"create bucket {bucket}", self.client.make_bucket, bucket)
            except S3Error as e:
                if e.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise StorageError(f"cannot create bucket {bucket}: {e.code}") from None

    # -- single objects ------------------------------------------------------------------------
    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = self._call(f"stat {self.uri(key)}", self.client.stat_object, self.config.bucket, key)
        except S3Error as e:
            if e.code in {"NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"}:
                return None
            raise
        meta = {k.lower(): v for k, v in (st.metadata or {}).items()}
        sha = meta.get(f"x-amz-meta-{SHA_META}")
        return ObjectInfo(key, st.size, sha, st.etag)

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def put_file(self, key: str, path: str | Path, sha256: str | None = None,
                 content_type: str = "application/octet-stream") -> ObjectInfo:
        sha256 = sha256 or sha256_file(path)
        self._call(f"upload {path} to {self.uri(key)}", self.client.fput_object, self.config.bucket,
                   key, str(path), content_type=content_type, metadata={SHA_META: sha256})
        return ObjectInfo(key, Path(path).stat().st_size, sha256)

    def copy(self, src_key: str, dst_key: str) -> None:
        """`src_key`'s bytes and metadata under `dst_key` too, copied by the server: nothing travels again (S3
        CopyObject, sources up to 5 GiB)."""
        self._call(f"copy {self.uri(src_key)} to {self.uri(dst_key)}", self.client.copy_object,
                   self.config.bucket, dst_key, CopySource(self.config.bucket, src_key))

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> ObjectInfo:
        sha = sha256_bytes(data)
        self._call(f"upload {self.uri(key)}", lambda: self.client.put_object(
            self.config.bucket, key, io.BytesIO(data), len(data), content_type=content_type,
            metadata={SHA_META: sha}))
        return ObjectInfo(key, len(data), sha)

    def put_json(self, key: str, obj) -> ObjectInfo:
        data = json.dumps(obj, indent=2, sort_keys=True).encode()
        return self.put_bytes(key, data, content_type="application/json")

    def get_bytes(self, key: str) -> bytes:
        """The object's bytes, checked against the sha256 recorded with it (IntegrityError if not)."""
        def fetch():
            resp = self.client.get_object(self.config.bucket, key)
            try:
                return resp.read(), resp.headers.get(f"x-amz-meta-{SHA_META}")
            finally:
                resp.close()
                resp.release_conn()

        try:
            data, recorded = self._call(f"download {self.uri(key)}", fetch)
        except S3Error as e:
            if e.code in {"NoSuchKey", "NoSuchObject"}:
                raise StorageError(f"{self.uri(key)} does not exist") from None
            raise
        if recorded and sha256_bytes(data) != recorded:
            raise IntegrityError(f"{self.uri(key)}: sha256 mismatch after download (expected {recorded}, "
                                 f"got {sha256_bytes(data)}){self._repair_hint(key)}")
        return data

    def put_bytes_if_absent(self, key: str, data: bytes,
                            content_type: str = "application/octet-stream") -> bool:
        """Create `key` only if no object has that name (`If-None-Match: *`); False if one exists.

        Honoured by AWS S3, MinIO, SeaweedFS (weed/s3api checkConditionalHeaders, tested in
        weed/s3api/s3api_conditional_headers_test.go) and moto (moto/s3/responses.py put_object).
        minio-py's put_object turns unknown headers into x-amz-meta-*, so the plain PutObject call
        (`_put_object`, minio 7.2) carries the condition.
        """
        sha = sha256_bytes(data)
        headers = {"Content-Type": content_type, f"x-amz-meta-{SHA_META}": sha, "If-None-Match": "*"}
        try:
            self._call(f"create {self.uri(key)}", self.client._put_object, self.config.bucket, key,
                       data, headers)
        except S3Error as e:
            if e.code in {"PreconditionFailed", "ConditionalRequestConflict"}:
                return False
            if e.code not in {"NotImplemented", "MethodNotAllowed"}:
                raise
            # A store without conditional writes: check, then write. Not atomic, so callers that need
            # a single winner write a unique token and read it back (see registry._claim).
            if self.exists(key):
                return False
            self.put_bytes(key, data, content_type)
        return True

    def content_sha256(self, key: str) -> str | None:
        """The sha256 of the object's bytes as stored now (downloaded and hashed, not its metadata);
        None when there is no such object."""
        def fetch():
            h = hashlib.sha256()
            resp = self.client.get_object(self.config.bucket, key)
            try:
                for chunk in resp.stream(1 << 20):
                    h.update(chunk)
            finally:
                resp.close()
                resp.release_conn()
            return h.hexdigest()

        try:
            return self._call(f"verify {self.uri(key)}", fetch)
        except S3Error as e:
            if e.code in {"NoSuchKey", "NoSuchObject"}:
                return None
            raise

    def get_json(self, key: str):
        data = self.get_bytes(key)
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StorageError(f"{self.uri(key)} is not valid JSON ({getattr(e, 'msg', e)}); the object "
                               "is damaged: delete it or write it again") from None

    def get_file(self, key: str, path: str | Path) -> ObjectInfo:
        path = Path(path)
        info = self.stat(key)
        if info is None:
            raise StorageError(f"{self.uri(key)} does not exist")
        with atomic_path(path) as tmp:
            self._call(f"download {self.uri(key)}", self.client.fget_object, self.config.bucket, key,
                       str(tmp))
            if info.sha256:
                actual = sha256_file(tmp)
                if actual != info.sha256:
                    raise IntegrityError(f"{self.uri(key)}: sha256 mismatch after download "
                                         f"(expected {info.sha256}, got {actual}){self._repair_hint(key)}")
        return info

    def list(self, prefix: str) -> list[str]:
        objs = self._call(f"list {self.uri(prefix)}", lambda: list(
            self.client.list_objects(self.config.bucket, prefix=prefix, recursive=True)))
        return sorted(o.object_name for o in objs if not o.is_dir)

    def delete(self, key: str) -> None:
        self._call(f"delete {self.uri(key)}", self.client.remove_object, self.config.bucket, key)

    # -- many objects ----------------------------------------------------------------------------
    def put_many(self, items: list[tuple[str, Path, str | None]], *, workers: int = 8,
                 skip_existing: bool = True, verify: bool = False,
                 progress: str | None = None) -> tuple[int, int]:
        """Upload (key, path, sha256) items in parallel; returns (uploaded, skipped).

        An existing object is skipped when its recorded sha256 matches; with `verify`, only when its
        bytes, downloaded and hashed, do (a damaged object keeps its metadata)."""
        from tqdm import tqdm

        def one(item) -> bool:
            key, path, sha = item
            sha = sha or sha256_file(path)
            if skip_existing:
                if verify:
                    if self.content_sha256(key) == sha:
                        return False
                else:
                    info = self.stat(key)
                    if info is not None and info.sha256 == sha:
                        return False
            self.put_file(key, path, sha)
            return True

        uploaded = 0
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
                tqdm(total=len(items), desc=progress, unit="obj", disable=progress is None) as bar:
            for did_upload in pool.map(one, items):
                uploaded += did_upload
                bar.update()
        return uploaded, len(items) - uploaded
