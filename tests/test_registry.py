"""register-model: object-store registry on the real embedded S3 server, Model Registry by contract."""
from __future__ import annotations

import json
import re
import threading
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from components.card import build_card
from components.registry import ObjectStoreRegistry, RegistryError
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

# The REST API of the server release paired with the client pin (docs/kubernetes.md, "Model Registry"):
# kubeflow/hub api/openapi/model-registry.yaml at v0.3.18, the spec the installed client's generated
# mr_openapi package is built from. Paths moved from /api/model_registry/v1alpha3/ to /v1/ in that
# line (kubeflow/hub#2992); a v0.3.5 server answers /v1/ with 404.
MR_BASE = "/api/model_registry/v1/"
MR_ID = re.compile(r"^[1-9][0-9]{0,8}$")  # every *Id field and path id: `pattern: "^[1-9][0-9]{0,8}$"`
MR_INT32 = re.compile(r"^-?([1-9][0-9]{0,8}|0)$")  # MetadataIntValue.int_value (int32, as a string)
# MetadataValue is a oneOf on metadataType; each variant has additionalProperties: false.
MR_METADATA = {"MetadataStringValue": ("string_value", str), "MetadataDoubleValue": ("double_value", (int, float)),
               "MetadataIntValue": ("int_value", str), "MetadataBoolValue": ("bool_value", bool)}
MR_ARTIFACT_TYPES = {"model-artifact", "doc-artifact", "dataset-artifact", "metric", "parameter"}


def mr_problems(kind: str, body: dict) -> list[str]:
    """What the server's OpenAPI validation would reject in a create body (the fields this client sends)."""
    problems = []
    required = {"registered_model": ["name"], "model_version": ["name", "registeredModelId"], "artifact": []}[kind]
    for field in required:
        if not isinstance(body.get(field), str) or not body[field]:
            problems.append(f"{kind}: required {field} missing or empty")
    if kind == "model_version" and not MR_ID.match(str(body.get("registeredModelId", ""))):
        problems.append(f"{kind}: registeredModelId {body.get('registeredModelId')!r} is not an id")
    if kind == "artifact" and body.get("artifactType") not in MR_ARTIFACT_TYPES:
        problems.append(f"{kind}: artifactType {body.get('artifactType')!r} is not one of {sorted(MR_ARTIFACT_TYPES)}")
    for key, value in (body.get("customProperties") or {}).items():
        variant = MR_METADATA.get(value.get("metadataType") if isinstance(value, dict) else None)
        if variant is None or set(value) != {"metadataType", variant[0]} or not isinstance(value[variant[0]], variant[1]):
            problems.append(f"{kind}: customProperties[{key!r}] = {value!r} is not a MetadataValue")
        elif variant[0] == "int_value" and not MR_INT32.match(value["int_value"]):
            problems.append(f"{kind}: customProperties[{key!r}] int_value {value['int_value']!r} is not an int32")
    return problems


class FakeModelRegistry(JSONHandler):
    """Stand-in for the Model Registry REST server (MR_BASE): the endpoints `ModelRegistry.register_model`
    and `get_model_version` call, with the server's required fields, id patterns and MetadataValue shapes.
    What the server would reject gets its 400 and is recorded in state["rejected"]."""
    state: dict
    base = MR_BASE

    def _new_id(self) -> str:
        self.state["next_id"] += 1
        return str(self.state["next_id"])

    def _error(self, status: int, message: str):
        self._send(status, {"code": str(status), "message": message})  # the spec's Error: code, message

    def do_GET(self):
        url = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.state["calls"].append(("GET", url.path, q))
        if url.path == self.base + "registered_models":
            items = list(self.state["models"].values())
            return self._send(200, {"items": items, "nextPageToken": "", "pageSize": 1, "size": len(items)})
        if url.path == self.base + "registered_model":
            found = [m for m in self.state["models"].values() if m["name"] == q.get("name")]
            return self._send(200, found[0]) if found else self._error(404, "not found")
        if url.path == self.base + "model_version":
            found = [v for v in self.state["versions"].values()
                     if v["name"] == q.get("name") and v["registeredModelId"] == q.get("parentResourceId")]
            return self._send(200, found[0]) if found else self._error(404, "not found")
        self._error(404, f"unexpected {url.path}")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        path = urlparse(self.path).path
        self.state["calls"].append(("POST", path, body))
        version_id = path[len(self.base + "model_versions/"):-len("/artifacts")] if path.endswith("/artifacts") else ""
        if path == self.base + "registered_models":
            kind, table = "registered_model", "models"
        elif path == self.base + "model_versions":
            kind, table = "model_version", "versions"
        elif path.startswith(self.base + "model_versions/") and MR_ID.match(version_id):
            kind, table = "artifact", "artifacts"
        else:
            return self._error(404, f"unexpected {path}")
        problems = mr_problems(kind, body)
        if kind == "model_version" and body.get("registeredModelId") not in self.state["models"]:
            problems.append(f"model_version: registered model {body.get('registeredModelId')!r} does not exist")
        if kind == "artifact" and version_id not in self.state["versions"]:
            return self._error(404, f"model version {version_id} not found")
        if problems:
            self.state["rejected"] += problems
            return self._error(400, "; ".join(problems))
        # Server-set fields of BaseResource (ids and epoch millis are strings in this API).
        obj = {**body, "id": self._new_id(), "createTimeSinceEpoch": "1", "lastUpdateTimeSinceEpoch": "1"}
        if kind != "artifact":
            obj.setdefault("state", "LIVE")
        else:
            obj["modelVersionId"] = version_id
        self.state[table][obj["id"]] = obj
        self._send(201, obj)


@pytest.fixture
def model_registry(request):
    """(url, state) of a stand-in server; parametrize indirectly with an API base path to stand in for
    a server of another API line."""
    state = {"next_id": 0, "models": {}, "versions": {}, "artifacts": {}, "calls": [], "rejected": []}
    handler = type("Handler", (FakeModelRegistry,), {"state": state, "base": getattr(request, "param", MR_BASE)})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", state
    srv.shutdown()
    srv.server_close()


def test_model_registry_contract(store, s3_env, model_file, model_registry):
    """Contract test: no Model Registry server can run here, so a loopback HTTP server stands in for the
    endpoints the real `model-registry` client calls, with the paths, required fields and value shapes of
    kubeflow/hub api/openapi/model-registry.yaml at v0.3.18 (the server paired with the client pin)."""
    url, state = model_registry
    result = _step(store, model_file, model_registry_url=url, dataset_metadata={"content_hash": "abc"})
    assert state["rejected"] == []
    assert {path for _, path, _ in state["calls"]} <= {MR_BASE + p for p in (
        "registered_models", "registered_model", "model_versions", "model_version",
        f"model_versions/{next(iter(state['versions']))}/artifacts")}
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
    from helpers import free_port

    with pytest.raises(RegistryError, match=r"Kubeflow Model Registry at http://127\.0\.0\.1:\d+: ") as err:
        _step(store, model_file, model_registry_url=f"http://127.0.0.1:{free_port()}")
    assert "\n" not in str(err.value)


def test_model_registry_stand_in_rejects_what_the_server_would():
    """The stand-in's checks are what make the contract test meaningful: they must reject bodies the
    v0.3.18 server's OpenAPI validation rejects."""
    assert mr_problems("registered_model", {"name": "m"}) == []
    assert mr_problems("registered_model", {"name": ""})
    assert mr_problems("model_version", {"name": "v1", "registeredModelId": "model-1"})
    assert mr_problems("artifact", {"artifactType": "model", "uri": "s3://b/k"})
    ok = {"a": {"metadataType": "MetadataDoubleValue", "double_value": 0.5},
          "b": {"metadataType": "MetadataIntValue", "int_value": "7"}}
    assert mr_problems("registered_model", {"name": "m", "customProperties": ok}) == []
    for bad in ({"metadataType": "MetadataDoubleValue", "string_value": "0.5"},
                {"metadataType": "MetadataIntValue", "int_value": "4294967296"},
                {"metadataType": "MetadataStringValue", "string_value": "x", "extra": 1}):
        assert mr_problems("registered_model", {"name": "m", "customProperties": {"k": bad}}), bad


@pytest.mark.parametrize("model_registry", ["/api/model_registry/v1alpha3/"], indirect=True)
def test_model_registry_of_another_api_line_is_named(store, s3_env, model_file, model_registry):
    """A v0.3.5 server (the pair this project shipped before) serves only /api/model_registry/v1alpha3/:
    the user gets one line that says the server does not speak this client's API, not a bare 404."""
    from importlib.metadata import version

    url, state = model_registry
    client = re.escape(version("model-registry"))
    with pytest.raises(RegistryError, match=rf"does not serve the REST API of client model-registry {client}") as err:
        _step(store, model_file, model_registry_url=url)
    assert "\n" not in str(err.value)
    assert state["calls"][0][1] == MR_BASE + "registered_models"


def _register_in_subprocess(cfg, name: str, model: str) -> str:
    """Register from a separate interpreter (what two pipeline pods do) and return the version."""
    import os
    import subprocess
    import sys

    code = ("import sys; from components.storage import ObjectStore, S3Config; "
            "from components.registry import ObjectStoreRegistry; "
            "c = S3Config(endpoint=sys.argv[1], bucket=sys.argv[2], prefix=sys.argv[3], "
            "access_key=sys.argv[4], secret_key=sys.argv[5]); "
            "print(ObjectStoreRegistry(ObjectStore(c)).register(sys.argv[6], sys.argv[7], {}).version)")
    out = subprocess.run([sys.executable, "-c", code, cfg.endpoint, cfg.bucket, cfg.prefix, cfg.access_key,
                          cfg.secret_key, name, model], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return out.stdout.strip()


def test_parallel_registrations_get_distinct_versions(store, tmp_path):
    """Six registrations at once (threads, as parallel pipeline runs do) and three from other processes:
    every one gets its own version and every version holds the model that claimed it."""
    from concurrent.futures import ThreadPoolExecutor

    from components.hashing import sha256_file

    models = []
    for i in range(9):
        p = tmp_path / f"m{i}.pt"
        p.write_bytes(f"model {i} ".encode() * 50)
        models.append(p)
    reg = ObjectStoreRegistry(store)
    with ThreadPoolExecutor(9) as pool:
        threads = [pool.submit(reg.register, "race", m, {"run_id": m.name}) for m in models[:6]]
        procs = [pool.submit(_register_in_subprocess, store.config, "race", str(m)) for m in models[6:]]
        got = [f.result().version for f in threads] + [f.result() for f in procs]
    assert sorted(got, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 10)]
    for model, version in zip(models, got):
        assert reg.card("race", version)["model"]["sha256"] == sha256_file(model)
    assert reg.versions("race") == [f"v{i}" for i in range(1, 10)]


def test_named_version_claimed_by_another_writer_is_refused(store, model_file):
    # Another registration has claimed prod-1 (its claim is written first) but not yet uploaded anything else.
    reg = ObjectStoreRegistry(store)
    assert store.put_bytes_if_absent(store.key("models", "sam-test", "prod-1", ".claim"), b"{}")
    with pytest.raises(RegistryError, match="already exists"):
        reg.register("sam-test", model_file, {}, "prod-1")
