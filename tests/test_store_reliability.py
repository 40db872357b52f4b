"""The store under stress: flaky or non-S3 endpoints, bad names, damaged objects, parallel writers.

Every server here is real: moto's S3 server process, and plain HTTP servers on loopback that answer
what a proxy or a misconfigured endpoint answers.
"""
from __future__ import annotations

import http.client
import http.server
import threading
from dataclasses import replace

import pytest

from components.errors import UserError
from components.storage import ObjectStore, S3Config, StorageError


class _FlakyProxy(http.server.BaseHTTPRequestHandler):
    """Forwards to the real S3 server, but answers the first `failures` requests with an HTML 5xx,
    as a load balancer in front of an overloaded store does."""

    protocol_version = "HTTP/1.1"
    upstream: tuple[str, int]
    failures: int = 0
    status: int = 502
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def _handle(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        cls = type(self)
        with cls.lock:
            fail = cls.failures > 0
            cls.failures -= fail
        if fail:
            page = b"<html><body>Bad gateway</body></html>"
            self.send_response(cls.status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return
        conn = http.client.HTTPConnection(*cls.upstream, timeout=30)
        conn.request(self.command, self.path, body=body, headers=dict(self.headers))
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle


@pytest.fixture
def serve_handler():
    servers = []

    def serve(handler) -> str:
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"127.0.0.1:{srv.server_address[1]}"

    yield serve
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_transient_html_5xx_is_retried(store, serve_handler):
    host, port = store.config.endpoint.split(":")
    handler = type("Flaky", (_FlakyProxy,), {"upstream": (host, int(port)), "failures": 3, "status": 502})
    flaky = ObjectStore(replace(store.config, endpoint=serve_handler(handler)), retries=4, retry_delay=0.01)
    handler.failures = 3  # the bucket check above went through already; fail the next three calls
    flaky.put_bytes(flaky.key("a"), b"payload")
    assert handler.failures == 0
    assert store.get_bytes(store.key("a")) == b"payload"


def test_persistent_5xx_is_one_line(store, serve_handler):
    host, port = store.config.endpoint.split(":")
    handler = type("Down", (_FlakyProxy,), {"upstream": (host, int(port)), "failures": 10**6, "status": 503})
    with pytest.raises(StorageError) as e:
        ObjectStore(replace(store.config, endpoint=serve_handler(handler)), retries=1, retry_delay=0.01)
    msg = str(e.value)
    assert "\n" not in msg and "503" in msg and handler.__name__ not in msg


class _WebPage(http.server.BaseHTTPRequestHandler):
    """A plain web server where the S3 endpoint should be (a proxy's login page, a wrong port)."""

    def log_message(self, *args):
        pass

    def _page(self):
        page = b"<!doctype html><html><body>Welcome to nginx!</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(page)

    do_GET = do_PUT = do_HEAD = _page


@pytest.mark.parametrize("region", [None, "us-east-1"])
def test_endpoint_answering_html_is_one_line(serve_handler, region):
    # Without a region minio first asks the bucket's location (XML); with one, nothing parses until
    # a listing: either way a web page must not pass for a store that accepted our uploads.
    endpoint = serve_handler(_WebPage)
    with pytest.raises(StorageError) as e:
        ObjectStore(S3Config(endpoint=endpoint, access_key="a", secret_key="b", region=region), retries=1)
    msg = str(e.value)
    assert "\n" not in msg and endpoint in msg and "not an S3" in msg


@pytest.mark.parametrize("bucket", ["Bad_Bucket", "a", "has/slash", "x" * 70])
def test_bad_bucket_name_is_a_user_error(s3, bucket):
    with pytest.raises(StorageError, match="bucket name") as e:
        ObjectStore(replace(s3, bucket=bucket))
    assert bucket in str(e.value) and "\n" not in str(e.value)


def test_corrupt_json_object_is_a_user_error(store):
    key = store.key("datasets", "x", "manifest.json")
    store.put_bytes(key, b'{"format_version": 1, "items": [')
    with pytest.raises(StorageError) as e:
        store.get_json(key)
    assert isinstance(e.value, UserError)
    assert store.uri(key) in str(e.value) and "not valid JSON" in str(e.value)


def test_put_if_absent_is_create_only(store):
    key = store.key("claims", "v1")
    assert store.put_bytes_if_absent(key, b"first") is True
    assert store.put_bytes_if_absent(key, b"second") is False
    assert store.get_bytes(key) == b"first"


def test_parallel_get_file_of_one_object_into_one_path(store, tmp_path):
    """Several threads of one process download the same object to the same place (two byte-identical
    dataset files share one cache entry): each must finish, none may find its temp file gone."""
    from concurrent.futures import ThreadPoolExecutor

    key = store.key("same.bin")
    store.put_bytes(key, b"z" * 200_000)
    dest = tmp_path / "cache" / "same.bin"
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: store.get_file(key, dest), range(16)))
    assert dest.read_bytes() == b"z" * 200_000
    assert [p.name for p in dest.parent.iterdir()] == ["same.bin"]


class _NoConditionalWrites(_FlakyProxy):
    """A store that rejects `If-None-Match` on PUT with 501 NotImplemented (older S3-compatible servers)."""

    def _handle(self):
        if self.command == "PUT" and "If-None-Match" in self.headers:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code>'
                    b"<Message>conditional writes are not implemented</Message></Error>")
            self.send_response(501)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super()._handle()

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle


def test_put_if_absent_without_conditional_write_support(store, serve_handler):
    host, port = store.config.endpoint.split(":")
    handler = type("Old", (_NoConditionalWrites,), {"upstream": (host, int(port))})
    old = ObjectStore(replace(store.config, endpoint=serve_handler(handler)))
    key = old.key("claims", "v1")
    assert old.put_bytes_if_absent(key, b"first") is True
    assert old.put_bytes_if_absent(key, b"second") is False
    assert store.get_bytes(key) == b"first"


class _S3InternalError(_FlakyProxy):
    """Answers the first `failures` requests with an S3-style XML 500 whose code is not a known one."""

    def _handle(self):
        cls = type(self)
        with cls.lock:
            fail = cls.failures > 0
            cls.failures -= fail
        if not fail:
            return super()._handle()
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'<?xml version="1.0"?><Error><Code>BackendFailure</Code><Message>try later</Message></Error>'
        self.send_response(500)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle


def test_xml_5xx_with_an_unknown_code_is_retried_then_one_line(store, serve_handler):
    host, port = store.config.endpoint.split(":")
    handler = type("Backend", (_S3InternalError,), {"upstream": (host, int(port)), "failures": 0})
    flaky = ObjectStore(replace(store.config, endpoint=serve_handler(handler)), retries=3, retry_delay=0.01)
    handler.failures = 2
    flaky.put_bytes(flaky.key("b"), b"ok")
    assert handler.failures == 0 and store.get_bytes(store.key("b")) == b"ok"
    handler.failures = 10**6
    flaky.retries = 1
    with pytest.raises(StorageError, match=r"keeps failing \(BackendFailure, HTTP 500\)") as e:
        flaky.put_bytes(flaky.key("c"), b"no")
    assert "\n" not in str(e.value)


def test_a_refused_connection_gives_up_after_one_retry_and_says_so_at_once(capfd):
    import time

    from helpers import free_port

    started = time.monotonic()
    with pytest.raises(StorageError, match="connection refused") as e:
        ObjectStore(S3Config(endpoint=f"127.0.0.1:{free_port()}", access_key="a", secret_key="b"), retries=4)
    assert time.monotonic() - started < 3, "a refused connection was retried like a 5xx"
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("sam-pipeline: retrying: object store at") and "refused" in err[0]
    assert "\n" not in str(e.value)


def test_a_5xx_is_retried_longer_and_the_first_retry_is_said(store, serve_handler, capfd):
    host, port = store.config.endpoint.split(":")
    handler = type("Down", (_FlakyProxy,), {"upstream": (host, int(port)), "failures": 10**6, "status": 503})
    with pytest.raises(StorageError, match="503"):
        ObjectStore(replace(store.config, endpoint=serve_handler(handler)), retries=2)
    assert handler.failures == 10**6 - 3  # every try of the bucket check reached the proxy
    # (the proxy's own threads may print a broken pipe's traceback here too: not ours)
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("sam-pipeline")]
    assert len(err) == 1 and "retrying" in err[0] and "HTTP 503" in err[0] and "up to 2 more tries" in err[0]


def test_a_web_page_is_not_retried(serve_handler, capfd):
    import time

    endpoint = serve_handler(_WebPage)
    started = time.monotonic()
    with pytest.raises(StorageError, match="not an S3 endpoint"):
        ObjectStore(S3Config(endpoint=endpoint, access_key="a", secret_key="b", region="us-east-1"), retries=4)
    assert time.monotonic() - started < 2, "a web page was retried"  # four retries back off 7.5 s or more
    assert "retrying" not in capfd.readouterr().err
