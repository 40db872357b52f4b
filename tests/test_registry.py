"""register-model: object-store registry on the real embedded S3 server, Model Registry by contract."""
from __future__ import annotations

import json
import threading
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from components.registry import ObjectStoreRegistry, RegistryError, build_card
from components.steps import register_step
from helpers import JSONHandler

METRICS = {"finetuned_box_dice": 0.81, "zero_shot_box_dice": 0.70, "finetuned_point_dice": 0.6,
           "zero_shot_point_dice": 0.5, "passed": True, "margin": 0.0}


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"state dict bytes " * 100)
    return path


def _step(store, model_path, **kw):
    cfg = store.config
    args = dict(metrics_json=json.dumps(METRICS), model_name="sam-test", model_registry_url="",
                run_id="run-1", s3_endpoint=cfg.endpoint, bucket=cfg.bucket, prefix=cfg.prefix)
    args.update(kw)
    return register_step(str(model_path), **args)


def test_versions_increment_and_latest_moves(store, s3_env, model_file):
    first = _step(store, model_file, dataset_metadata={"content_hash": "abc", "name": "penn-fudan"},
                  weights_metadata={"sha256": "w" * 64, "model_type": "vit_t"},
                  model_metadata={"model_type": "vit_t", "n_iterations": 5, "history": {"loss": [1.0]}})
    second = _step(store, model_file, run_id="run-2")
    assert (first["version"], second["version"]) == ("v1", "v2")
    reg = ObjectStoreRegistry(store)
    assert reg.versions("sam-test") == ["v1", "v2"]
    assert reg.latest("sam-test")["version"] == "v2"
    card = reg.card("sam-test", "v1")
    assert card["run_id"] == "run-1"
    assert card["metrics"]["box_dice"] == 0.81 and card["zero_shot"]["box_dice"] == 0.70
    assert card["dataset"]["content_hash"] == "abc" and card["weights"]["sha256"] == "w" * 64
    assert card["training"] == {"model_type": "vit_t", "n_iterations": 5}  # history stays out of the card
    assert card["model"]["uri"] == first["model_uri"] and card["model"]["sha256"] == first["sha256"]
    assert card["created"]
    assert reg.fetch("sam-test", "latest", model_file.parent / "back.pt").read_bytes() == model_file.read_bytes()


def test_existing_version_is_never_overwritten(store, s3_env, model_file, tmp_path):
    _step(store, model_file, version="prod-1")
    other = tmp_path / "other.pt"
    other.write_bytes(b"different")
    with pytest.raises(RegistryError, match="already exists"):
        _step(store, other, version="prod-1")
    reg = ObjectStoreRegistry(store)
    assert reg.card("sam-test", "prod-1")["model"]["bytes"] == model_file.stat().st_size
    assert reg.latest("sam-test")["version"] == "prod-1"


def test_half_written_version_is_skipped_not_reused(store, s3_env, model_file):
    # A crash between model.pt and the card leaves v1 incomplete: it is not listed and not reused.
    store.put_bytes(store.key("models", "sam-test", "v1", "model.pt"), b"partial")
    assert ObjectStoreRegistry(store).versions("sam-test") == []
    assert _step(store, model_file)["version"] == "v2"


def test_bad_input_is_one_clear_error(store, s3_env, model_file, tmp_path):
    with pytest.raises(RegistryError, match="no such model file"):
        _step(store, tmp_path / "missing.pt")
    with pytest.raises(RegistryError, match="invalid model name"):
        _step(store, model_file, model_name="bad name/..")
    with pytest.raises(RegistryError, match="metrics_json is not valid JSON"):
        _step(store, model_file, metrics_json="{not json")
    assert not store.list(store.key("models"))


def test_card_prefixes():
    card = build_card({"finetuned_box_dice": 0.9, "zero_shot_box_dice": 0.8, "champion_box_dice": 0.85,
                       "passed": True}, run_id="r", model_metadata={}, dataset_metadata={}, weights_metadata={})
    assert card["champion"] == {"box_dice": 0.85}
    assert card["evaluation"]["passed"] is True


# -- Kubeflow Model Registry ---------------------------------------------------------------------------

class FakeModelRegistry(JSONHandler):
    """Serves the model-registry v1 REST endpoints that `ModelRegistry.register_model` calls."""
    state: dict

    def _new_id(self) -> str:
        self.state["next_id"] += 1
        return str(self.state["next_id"])

    def do_GET(self):
        url = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.state["calls"].append(("GET", url.path, q))
        base = "/api/model_registry/v1/"
        if url.path == base + "registered_models":
            items = list(self.state["models"].values())
            return self._send(200, {"items": items, "nextPageToken": "", "pageSize": 1, "size": len(items)})
        if url.path == base + "registered_model":
            found = [m for m in self.state["models"].values() if m["name"] == q.get("name")]
            return self._send(200, found[0]) if found else self._send(404, {"code": "404", "message": "not found"})
        if url.path == base + "model_version":
            found = [v for v in self.state["versions"].values()
                     if v["name"] == q.get("name") and v["registeredModelId"] == q.get("parentResourceId")]
            return self._send(200, found[0]) if found else self._send(404, {"code": "404", "message": "not found"})
        self._send(404, {"code": "404", "message": f"unexpected {url.path}"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        path = urlparse(self.path).path
        self.state["calls"].append(("POST", path, body))
        base = "/api/model_registry/v1/"
        obj = {**body, "id": self._new_id(), "createTimeSinceEpoch": "1", "lastUpdateTimeSinceEpoch": "1"}
        if path == base + "registered_models":
            self.state["models"][obj["id"]] = obj
        elif path == base + "model_versions":
            self.state["versions"][obj["id"]] = obj
        elif path.startswith(base + "model_versions/") and path.endswith("/artifacts"):
            self.state["artifacts"][obj["id"]] = {**obj, "modelVersionId": path.split("/")[-2]}
        else:
            return self._send(404, {"code": "404", "message": f"unexpected {path}"})
        self._send(201, obj)


@pytest.fixture
def model_registry():
    state = {"next_id": 0, "models": {}, "versions": {}, "artifacts": {}, "calls": []}
    handler = type("Handler", (FakeModelRegistry,), {"state": state})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", state
    srv.shutdown()
    srv.server_close()


def test_model_registry_contract(store, s3_env, model_file, model_registry):
    """Contract test: no Model Registry server can run here, so a loopback HTTP server stands in for the
    endpoints the real `model-registry` client calls (paths and JSON shapes of its v1 REST API)."""
    url, state = model_registry
    result = _step(store, model_file, model_registry_url=url, dataset_metadata={"content_hash": "abc"})
    assert result["version"] == "v1" and result["model_registry_version_id"]
    (model,) = state["models"].values()
    (version,) = state["versions"].values()
    (artifact,) = state["artifacts"].values()
    assert model["name"] == "sam-test"
    assert version["name"] == "v1" and version["registeredModelId"] == model["id"]
    props = version["customProperties"]
    assert props["metrics.box_dice"]["double_value"] == 0.81
    assert props["dataset.content_hash"]["string_value"] == "abc"
    assert artifact["uri"] == result["model_uri"] and artifact["uri"].startswith("s3://")
    assert artifact["modelFormatName"] == "pytorch"
    assert artifact["modelVersionId"] == version["id"]


def test_model_registry_unreachable_is_one_line(store, s3_env, model_file):
    from components.s3server import free_port

    with pytest.raises(RegistryError, match=r"Kubeflow Model Registry at http://127\.0\.0\.1:\d+: ") as err:
        _step(store, model_file, model_registry_url=f"http://127.0.0.1:{free_port()}")
    assert "\n" not in str(err.value)
