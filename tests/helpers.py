"""Builders shared by several test files."""
from __future__ import annotations

import json
import re
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import yaml

from components.hashing import sha256_file


def wait_until(condition, limit: float, every: float = 0.2) -> bool:
    """Poll `condition()` until it is true (True) or `limit` seconds have passed (False): for a process or a
    server that ends on its own."""
    import time

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return False


def read_until(proc, needle: str, limit: float = 300) -> list[str]:
    """The lines `proc` printed (text stdout) up to the first that contains `needle`."""
    import time

    seen, deadline = [], time.monotonic() + limit
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} never came: {''.join(seen)[-3000:]}")


def free_port() -> int:
    """A loopback port nothing listens on (a moment ago): where a test needs a refused connection."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_and_two_size_items(n_tall: int):
    """A random vit_t and training items of two image sizes (two 120x200 images, `n_tall` 210x90 ones, up to 3
    objects each) with seeded random embeddings: a batch mixes frames and valid regions in one call."""
    import torch

    from components.datasets.synthetic import make_samples
    from components.sam.model import build_sam
    from components.training.data import prepare_items

    torch.manual_seed(0)
    model = build_sam("vit_t")
    samples = make_samples(2, seed=5, size=(120, 200), max_instances=3) + \
        make_samples(n_tall, seed=6, size=(210, 90), max_instances=3)
    gen = torch.Generator().manual_seed(1)
    return model, prepare_items(samples, [torch.randn((256, 64, 64), generator=gen) for _ in samples])


def cpu_trainer(model, items, **settings):
    """A CPU Trainer on `items` (validating on the first), with the seed's 25 objects per batch at lr 1e-3 unless
    `settings` say otherwise."""
    import torch

    from components.training.config import TrainConfig, resolve_amp
    from components.training.trainer import Trainer

    cpu = torch.device("cpu")
    cfg = TrainConfig(device="cpu", **{"n_objects_per_batch": 25, "lr": 1e-3, **settings})
    return Trainer(cfg, model, items, items[:1], cpu, resolve_amp(cfg, cpu))


def make_random_vit_t_checkpoint(path: str | Path, seed: int = 0) -> str:
    """A randomly initialised state dict of the real MobileSAM vit_t architecture (same keys and shapes
    as mobile_sam.pt, so every loader accepts it); returns its sha256."""
    import torch
    from mobile_sam import sam_model_registry

    torch.manual_seed(seed)
    model = sam_model_registry["vit_t"]()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return sha256_file(path)


class JSONHandler(BaseHTTPRequestHandler):
    """Base for the stand-in REST servers of contract tests: quiet, answers JSON."""

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class KFPStandIn(JSONHandler):
    """Contract stand-in for the KFP v2beta1 REST API (the calls kfp 2.17's kfp.Client makes for experiments,
    runs, recurring runs and pipeline uploads; shapes from upstream kubeflow/pipelines backend/api/v2beta1/*.proto
    and backend/src/apiserver/server/pipeline_upload_server.go). A subclass carries `world`, a dict:

    calls           every request as (method, path, query-or-body)
    run_states      the states successive GETs of a run answer; the last one repeats. "DROP" closes the
                    connection without an answer (a dropped port-forward).
    api_down        answer like the KFP UI's server with its API server down (frontend/server/handlers/
                    healthz.ts: healthz 200 with apiServerReady false; proxied calls 502)
    experiments, pipelines, versions, recurring_runs: what the server holds
    """
    world: dict

    # -- plumbing
    def _query(self) -> tuple[str, dict]:
        url = urlparse(self.path)
        return url.path, {k: v[0] for k, v in parse_qs(url.query).items()}

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _named(self, items: list, query: dict) -> list:
        """The display_name EQUALS filter of backend/api/v2beta1/filter.proto (operation as name or number)."""
        for p in json.loads(query.get("filter", "{}")).get("predicates", []):
            assert p["key"] == "display_name" and p["operation"] in ("EQUALS", 1), p
            value = p.get("stringValue", p.get("string_value"))
            items = [i for i in items if i["display_name"] == value]
        return items

    def _new_id(self, kind: str) -> str:
        self.world["ids"] = self.world.get("ids", 0) + 1
        return f"{kind}-{self.world['ids']}"

    def _proxy_down(self) -> bool:
        if not self.world.get("api_down"):
            return False
        if self.path.startswith("/apis/v2beta1/healthz"):
            self._send(200, {"apiServerReady": False, "buildDate": "", "frontendCommitHash": "0" * 40})
        else:
            data = b"Error occurred while trying to proxy: ml-pipeline.kubeflow:8888"
            self.send_response(502)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        return True

    # -- verbs
    def do_GET(self):
        path, query = self._query()
        self.world["calls"].append(("GET", path, query))
        if self._proxy_down():
            return
        w = self.world
        if path == "/apis/v2beta1/healthz":
            # backend/src/apiserver/main.go healthzResponse
            return self._send(200, {"commit_sha": "0" * 40, "tag_name": "2.17.0", "multi_user": False,
                                    "pipeline_store": "database"})
        if path == "/apis/v2beta1/experiments":
            return self._send(200, {"experiments": self._named(w["experiments"], query)})
        if path.startswith("/apis/v2beta1/runs/"):
            states = w["run_states"]
            state = states.pop(0) if len(states) > 1 else states[0]
            if state == "DROP":
                self.close_connection = True
                return  # no status line at all: the client sees the connection go away
            return self._send(200, {"run_id": path.rsplit("/", 1)[1], "state": state})
        if path == "/apis/v2beta1/recurringruns":
            found = [r for r in w["recurring_runs"] if r["experiment_id"] == query.get("experiment_id")]
            return self._send(200, {"recurringRuns": self._named(found, query)})
        if path == "/apis/v2beta1/pipelines":
            return self._send(200, {"pipelines": self._named(w["pipelines"], query)})
        m = re.fullmatch(r"/apis/v2beta1/pipelines/([^/]+)/versions", path)
        if m:
            found = self._named([v for v in w["versions"] if v["pipeline_id"] == m[1]], query)
            if query.get("sort_by") == "created_at desc":
                found = found[::-1]
            return self._send(200, {"pipeline_versions": found[:int(query.get("page_size", 10))]})
        self._send(404, {"message": f"unexpected GET {path}", "code": 5})

    def do_POST(self):
        path, query = self._query()
        raw = self._body()
        if self._proxy_down():
            return
        w = self.world
        if path == "/apis/v2beta1/pipelines/upload_version":
            self.world["calls"].append(("POST", path, query))
            # Stored as the API server returns a version compiled with a platform spec (both documents).
            docs = list(yaml.safe_load_all(_multipart_file(self.headers["Content-Type"], raw)))
            spec = {"pipeline_spec": docs[0], "platform_spec": docs[1]} if len(docs) > 1 else docs[0]
            pid, name = query["pipelineid"], query["name"]
            if any(v["pipeline_id"] == pid and v["display_name"] == name for v in w["versions"]):
                return self._send(409, {"message": f"pipeline version {name} already exists", "code": 6})
            version = {"pipeline_id": pid, "pipeline_version_id": self._new_id("version"), "display_name": name,
                       "pipeline_spec": spec}
            w["versions"].append(version)
            return self._send(200, version)
        body = json.loads(raw or b"{}")
        self.world["calls"].append(("POST", path, body))
        if path == "/apis/v2beta1/experiments":
            w["experiments"].append({**body, "experiment_id": self._new_id("exp")})
            return self._send(200, w["experiments"][-1])
        if path == "/apis/v2beta1/runs":
            return self._send(200, {**body, "run_id": self._new_id("run"), "state": "PENDING"})
        if path == "/apis/v2beta1/recurringruns":
            w["recurring_runs"].append({**body, "recurring_run_id": self._new_id("rr")})
            return self._send(200, w["recurring_runs"][-1])
        if path == "/apis/v2beta1/pipelines":
            w["pipelines"].append({**body, "pipeline_id": self._new_id("pipeline")})
            return self._send(200, w["pipelines"][-1])
        self._send(404, {"message": f"unexpected POST {path}", "code": 5})

    def do_DELETE(self):
        path, query = self._query()
        self.world["calls"].append(("DELETE", path, query))
        rr_id = path.rsplit("/", 1)[1]
        before = len(self.world["recurring_runs"])
        self.world["recurring_runs"][:] = [r for r in self.world["recurring_runs"] if r["recurring_run_id"] != rr_id]
        if len(self.world["recurring_runs"]) == before:
            return self._send(404, {"message": f"recurring run {rr_id} not found", "code": 5})
        self._send(200, {})


def _multipart_file(content_type: str, raw: bytes) -> bytes:
    from email.parser import BytesParser

    message = BytesParser().parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    (part,) = [p for p in message.get_payload() if p.get_filename()]
    return part.get_payload(decode=True)


def kfp_world() -> dict:
    return {"calls": [], "run_states": ["SUCCEEDED"], "api_down": False, "experiments": [], "pipelines": [],
            "versions": [], "recurring_runs": []}
