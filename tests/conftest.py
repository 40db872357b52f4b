"""Shared fixtures: real servers on loopback, never mocks."""
from __future__ import annotations

import functools
import http.server
import os
import threading
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

# `make test` runs pytest-xdist workers (pytest_xdist_auto_num_workers below): each worker's torch (and the task
# processes its runs start) gets its share of the cores, at least one thread (on CI's two cores: one each).
# A worker sets it whatever it inherited: the controller process set its own one-process default before starting
# the workers.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ or "OMP_NUM_THREADS" not in os.environ:
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["OMP_NUM_THREADS"] = str(max(1, min(4, (os.cpu_count() or 2) // _workers)))
# No test may reach the internet or a developer's real caches.
os.environ.pop("S3_ENDPOINT", None)


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker more than the cores, at most four (a worker running a whole pipeline holds a few GB).
    The extra one uses the time another waits on a task process or a server: on two cores 386 s with three workers,
    461 s with two, 391 s with four."""
    return max(1, min(4, (os.cpu_count() or 1) + 1))


# The files that keep a worker busy longest (one to two minutes each on two cores, measured 2026-12-05), longest
# first. A file missing here only starts later than it could.
LONG_FILES = ("test_pipeline_local.py", "test_finetune.py", "test_run_concurrent.py", "test_evaluate.py",
              "test_compiled_step.py", "test_streaming.py", "test_decoder.py", "test_predict.py")


def pytest_collection_modifyitems(config, items):
    """The long files first (LONG_FILES, then any other file with whole-run (slow) tests), each file's own order
    kept. Workers take whole files (--dist loadfile) in this order, so the long files start early and the short
    ones fill in at the end, instead of one long file running alone at the end (test_streaming.py, started
    last, kept one worker busy 27 s after the others had finished)."""
    def path(item):
        return item.nodeid.split("::")[0]

    slow = {path(item) for item in items if item.get_closest_marker("slow")}

    def rank(item):
        name = path(item).rsplit("/", 1)[-1]
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES) + (path(item) not in slow)

    items.sort(key=rank)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM_MODELS", str(tmp_path / "sam_models"))


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A fresh dataset download folder and object cache for the test (ingest writes both)."""
    path = tmp_path / "data"
    monkeypatch.setenv("DATA_DIR", str(path))
    monkeypatch.setenv("SAM_DATA_CACHE", str(tmp_path / "objects"))
    return path


@pytest.fixture(scope="session")
def random_vit_t(tmp_path_factory):
    """(path, sha256) of a random vit_t checkpoint (no download): the real architecture, read-only."""
    from helpers import make_random_vit_t_checkpoint

    path = tmp_path_factory.mktemp("weights") / "vit_t_random.pt"
    return path, make_random_vit_t_checkpoint(path, seed=0)


@pytest.fixture(scope="session")
def pipeline_sources(tmp_path_factory):
    """What a whole local run fetches over HTTP: a synthetic Penn-Fudan zip and a random vit_t checkpoint
    (folder, checkpoint sha256)."""
    import torch

    from components.datasets.synthetic import make_pennfudan_zip
    from components.hashing import sha256_file
    from components.sam.model import atomic_torch_save, build_sam

    d = tmp_path_factory.mktemp("sources")
    make_pennfudan_zip(d / "PennFudanPed.zip", n_fudan=4, n_penn=4, seed=0, size_range=(64, 96))
    torch.manual_seed(0)
    atomic_torch_save(build_sam("vit_t").state_dict(), d / "vit_t_random.pth")
    return d, sha256_file(d / "vit_t_random.pth")


@pytest.fixture(scope="session")
def s3():
    """A real S3 server process (moto) on 127.0.0.1, shared by the session."""
    from components.s3server import embedded_s3

    with embedded_s3() as cfg:
        yield cfg


@pytest.fixture
def store(s3):
    """An ObjectStore on the shared server under a prefix of its own, so tests never see each other."""
    from components.storage import ObjectStore

    return ObjectStore(replace(s3, prefix=f"t-{uuid.uuid4().hex[:10]}/"))


@pytest.fixture
def s3_env(store, monkeypatch):
    """The store's settings as the environment variables the step functions read."""
    cfg = store.config
    for name, value in {"S3_ENDPOINT": cfg.endpoint, "S3_BUCKET": cfg.bucket, "S3_PREFIX": cfg.prefix,
                        "AWS_ACCESS_KEY_ID": cfg.access_key, "AWS_SECRET_ACCESS_KEY": cfg.secret_key,
                        "AWS_REGION": cfg.region}.items():
        monkeypatch.setenv(name, value)
    return cfg


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _serve(directory: Path, servers: list) -> str:
    handler = functools.partial(_QuietHandler, directory=str(directory))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    servers.append(srv)
    return f"http://127.0.0.1:{srv.server_address[1]}"


def _stop(servers: list) -> None:
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def http_server():
    """Serve a directory over real HTTP on 127.0.0.1: `base_url = http_server(directory)`."""
    servers: list = []
    yield functools.partial(_serve, servers=servers)
    _stop(servers)


@pytest.fixture(scope="module")
def module_http_server():
    """http_server for a module's shared fixtures (one whole run that several tests read)."""
    servers: list = []
    yield functools.partial(_serve, servers=servers)
    _stop(servers)


@pytest.fixture
def kfp_api():
    """A KFP v2beta1 API stand-in (tests/helpers.py KFPStandIn) on 127.0.0.1: `host, world = kfp_api`;
    set world["run_states"] / world["api_down"] to script it, read world["calls"] to see what was sent."""
    from helpers import KFPStandIn, kfp_world

    world = kfp_world()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("KFP", (KFPStandIn,), {"world": world}))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", world
    srv.shutdown()
    srv.server_close()
