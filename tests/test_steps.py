"""The steps' metadata on its way out (what a KFP 2.17 backend can record) and back (what it returns)."""
from __future__ import annotations

import json
import math

import pytest
from kfp_launcher_rules import check_executor_output, check_run

from components.card import build_card
from components.steps import artifact_metadata, publish, read_metadata


def _executor_output(task_dir, metadata: dict, parameters: dict | None = None) -> None:
    task_dir.mkdir(parents=True)
    out = {"artifacts": {"model": {"artifacts": [{"name": "model", "uri": str(task_dir / "model"),
                                                  "metadata": metadata}]}}}
    if parameters is not None:
        out["parameterValues"] = parameters
    (task_dir / "executor_output.json").write_text(json.dumps(out))


def test_launcher_rules_fail_on_a_null_naming_task_artifact_and_key(tmp_path):
    from pipelines.sam_finetune import DEFAULT_YAML

    _executor_output(tmp_path / "fetch-weights", {"sha256": "ab", "bytes": 3})
    _executor_output(tmp_path / "finetune", {"best_val_dice": 0.5, "resumed_from": None})
    with pytest.raises(AssertionError) as e:
        check_run(tmp_path, DEFAULT_YAML)
    assert "finetune: artifact 'model' metadata 'resumed_from' is null" in str(e.value)
    assert "fetch-weights" not in str(e.value)


def test_launcher_rules_on_parameters_and_non_json_numbers():
    types = {"passed": "BOOLEAN", "finetuned_box_dice": "NUMBER_DOUBLE", "version": "STRING"}
    ok = json.dumps({"parameterValues": {"passed": True, "finetuned_box_dice": 0.5, "version": "v1"}})
    assert check_executor_output("evaluate", ok, types) == []
    bad = json.dumps({"parameterValues": {"passed": None, "finetuned_box_dice": "0.5", "version": "v1"}})
    assert check_executor_output("evaluate", bad, types) == [
        "evaluate: output parameter 'passed' is null",
        "evaluate: output parameter 'finetuned_box_dice' is '0.5', not a NUMBER_DOUBLE"]
    nan = json.dumps({"artifacts": {"m": {"artifacts": [{"metadata": {"loss": float("nan")}}]}}})
    assert "not JSON" in check_executor_output("finetune", nan)[0]


class _Artifact:
    def __init__(self):
        self.metadata = {}


class _Metrics:
    def __init__(self):
        self.logged = {}

    def log_metric(self, key, value):
        self.logged[key] = value


def test_publish_leaves_out_what_the_backend_cannot_store():
    result = {"best_val_dice": 0.5, "resumed_from": None, "initial_val_dice": None, "final_loss": math.nan,
              "passed": True, "config": {"lr": 1e-5, "amp": None}, "hist": [1.0, None, math.inf]}
    artifact, metrics = _Artifact(), _Metrics()
    publish(result, artifact, metrics)
    assert artifact.metadata == {"best_val_dice": 0.5, "passed": True, "config": {"lr": 1e-5}, "hist": [1.0]}
    assert metrics.logged == {"best_val_dice": 0.5}
    assert check_executor_output("finetune", json.dumps(
        {"artifacts": {"model": {"artifacts": [{"metadata": artifact.metadata}]}}})) == []
    assert artifact_metadata({"a": None}) == {}


def _through_ml_metadata(meta: dict) -> dict:
    """What a downstream task reads back from a 2.17 backend: `StructValueToMLMDValue` then
    `toRuntimeArtifact` (backend/src/v2/metadata/converter.go): bools become 0/1, every number a double,
    a dict {"struct": dict}, a list {"list": list}."""
    def back(v):
        if isinstance(v, bool):
            return float(v)
        if isinstance(v, int):
            return float(v)
        if isinstance(v, dict):
            return {"struct": v}
        if isinstance(v, list):
            return {"list": v}
        return v
    return {k: back(v) for k, v in meta.items()}


def test_the_model_card_does_not_depend_on_the_metadata_shape():
    model = artifact_metadata({"model_type": "vit_t", "best_iteration": 3, "resumed_from": None,
                               "history_uri": "s3://b/runs/r/history.json",
                               "config": {"debug_with_one_example": True, "n_iterations": 3, "lr": 1e-5,
                                          "device": "cpu"}})
    dataset = {"content_hash": "abc", "train_images": 4}
    weights = {"sha256": "ff", "model_type": "vit_t"}
    metrics = {"finetuned_box_dice": 0.9, "zero_shot_box_dice": 0.8, "passed": True}

    def card(m, d, w):
        return build_card(metrics, run_id="r", model_metadata=read_metadata(m), dataset_metadata=read_metadata(d),
                          weights_metadata=read_metadata(w))

    local = card(model, dataset, weights)
    remote = card(_through_ml_metadata(model), _through_ml_metadata(dataset), _through_ml_metadata(weights))
    assert remote["training"]["config"] == local["training"]["config"] == model["config"]
    assert remote["training"]["config"]["debug_with_one_example"] is True
    assert remote["dataset"] == local["dataset"] and remote["model"] == local["model"]
    assert read_metadata(_through_ml_metadata(model))["history_uri"] == model["history_uri"]
