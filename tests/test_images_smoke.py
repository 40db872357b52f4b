"""`make images-smoke` (scripts/images-smoke.py, scripts/images-smoke-launcher.py): the light images built from their Dockerfiles on a
stand-in base, and each compiled step run inside its image the way the KFP 2.17 launcher runs it.

The run needs a Docker engine and debootstrap (CI installs both: .ci/run); without them it is skipped
with the reason. The checks on how the script rewrites a Dockerfile run everywhere.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import images

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "images-smoke.py"


def load_script():
    spec = importlib.util.spec_from_file_location("images_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def only_from_differs(original: str, rewritten: str, base: str) -> None:
    a, b = original.splitlines(keepends=True), rewritten.splitlines(keepends=True)
    assert len(a) == len(b)
    changed = [(x, y) for x, y in zip(a, b) if x != y]
    assert len(changed) == 1, changed
    assert changed[0][0].startswith("FROM python:3.11") and changed[0][1] == f"FROM {base}\n"


@pytest.mark.parametrize("kind", ["light", "torch"])
def test_standin_dockerfile_replaces_only_the_from_line(kind):
    smoke = load_script()
    original = (ROOT / "images" / kind / "Dockerfile").read_text()
    only_from_differs(original, smoke.standin_dockerfile(original, "localhost/base:x"), "localhost/base:x")


def test_standin_dockerfile_refuses_a_second_stage():
    smoke = load_script()
    with pytest.raises(RuntimeError, match="expected one FROM line, found 2"):
        smoke.standin_dockerfile("FROM a\nRUN true\nFROM b\n", "base")


def test_executor_input_is_what_the_driver_hands_the_launcher():
    """Shape from upstream backend/src/v2/driver/driver.go (2.17.0): typed parameter values, output
    URIs under the task root, parameter outputs under /tmp/kfp/outputs, the output file under /minio."""
    smoke = load_script().launcher
    compiled = smoke.Compiled(ROOT / "pipelines" / "sam_finetune.yaml")
    comp = compiled.component("register-model")
    params = {**compiled.defaults, "metrics_json": "{}", "run_id": "r", "s3_endpoint": "127.0.0.1:1",
              "weights_metadata": '{"sha256": "ab"}'}
    art = {"name": "x", "uri": "minio://b/k", "metadata": {}, "type": {"schemaTitle": "system.Model"}}
    data = smoke.executor_input(comp, params, {"model": art, "dataset": art}, "b/root/task/salt")
    assert data["outputs"]["outputFile"] == "/minio/b/root/task/salt/output_metadata.json"
    assert data["outputs"]["parameters"]["version"] == {"outputFile": "/tmp/kfp/outputs/version"}
    # register-model does not download the checkpoint: its metadata is a STRUCT parameter, read back from an
    # output parameter file's JSON text.
    assert set(data["inputs"]["artifacts"]) == {"model", "dataset"}
    assert data["inputs"]["parameterValues"]["weights_metadata"] == {"sha256": "ab"}
    ft = smoke.executor_input(compiled.component("finetune"), {**params, "device": "cpu"},
                              {"weights": art, "dataset": art, "embeddings": [art, art]}, "b/t")
    # dsl.Collected's artifact list (the embed shards' indexes) is handed over whole.
    assert ft["inputs"]["artifacts"]["embeddings"] == {"artifacts": [art, art]}
    assert ft["inputs"]["parameterValues"]["n_iterations"] == int(compiled.defaults["n_iterations"])
    assert isinstance(ft["inputs"]["parameterValues"]["n_iterations"], int)
    assert ft["outputs"]["artifacts"]["model"]["artifacts"][0]["uri"] == "minio://b/t/model"
    with pytest.raises(RuntimeError, match=r"no value for compiled input parameter\(s\) \['metrics_json'"):
        smoke.executor_input(comp, {k: v for k, v in params.items() if k != "metrics_json"}, {}, "b/t")


def engine_reason() -> str | None:
    """Why the smoke run cannot happen here, or None."""
    if not shutil.which("debootstrap"):
        return "debootstrap is not installed (apt-get install -y docker.io debootstrap)"
    try:
        load_script().pick_docker(os.environ.get("DOCKER"))
    except SystemExit as exc:
        return str(exc)
    return None


@pytest.mark.slow
def test_images_smoke_runs_the_compiled_steps_in_their_images(tmp_path):
    """The light path by default (about 1.5 min once the base is cached); SMOKE_TORCH=1 adds the torch
    images (a 6 GB build, finetune and evaluate on CPU), which `make images-smoke` runs by default."""
    reason = engine_reason()
    if reason:
        pytest.skip(reason)
    work = tmp_path / "work"
    torch = os.environ.get("SMOKE_TORCH", "0") != "0"
    env = {**os.environ, "SMOKE_WORK": str(work), "PYTHONPATH": str(ROOT), "SMOKE_TORCH": "1" if torch else "0"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=3600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "is a STAND-IN for python:3.11-slim-bookworm" in out
    ran = [s for s in images.STEPS if torch or images.image_kind(s) == "light"]
    for step in images.STEPS:
        assert (f"{step}: compiled command ok" in out) == (step in ran), step
        assert (work / "run" / step / "log.txt").is_file() == (step in ran), step
    assert "register-model: version v" in out
    # The tasks that run on another step's image: check-changes always, one embed shard with the torch images.
    assert "check-changes: compiled command ok" in out
    assert ("embed: compiled command ok" in out) == torch
    # What was built is the repository's Dockerfile with only FROM replaced.
    for kind in {images.image_kind(s) for s in ran}:
        built = (work / "dockerfiles" / kind / "Dockerfile").read_text()
        base = next(line for line in built.splitlines() if line.startswith("FROM ")).removeprefix("FROM ")
        only_from_differs((ROOT / "images" / kind / "Dockerfile").read_text(), built, base)
