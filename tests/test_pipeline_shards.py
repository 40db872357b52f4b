"""A lost embed shard costs time only: one shard fails under the real kfp.local (its body raises, as a store
outage or a CUDA error would), and the run still trains, evaluates and says what happened."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from kfp_launcher_rules import check_run

from components.datasets.reader import shard_images
from pipelines.cli import main
from pipelines.sam_finetune import DEFAULT_YAML

FAULTS = Path(__file__).with_name("faults")  # sitecustomize.py: fails the shard named by the variable
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_failed_embed_shard_does_not_fail_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # kfp.local's SubprocessRunner starts each task in a fresh interpreter that inherits this environment.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAULTS), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("SAM_TEST_FAIL_EMBED_SHARD", "1")
    summary_path = tmp_path / "summary.json"
    code = main(["run", "--demo", "--demo-images", "6", "-i", "1", "-g", "cpu", "-n", "2", "--val-every", "1",
                 "--margin", "-1", "--embed-shards", "2", "--pipeline-root", str(tmp_path / "out"),
                 "--summary-json", str(summary_path)])
    out = capsys.readouterr()
    summary = json.loads(summary_path.read_text())
    assert code == 0 and summary["succeeded"], (out.out + out.err)[-3000:]
    states = {t: s["state"] for t, s in summary["tasks"].items()}
    # Registration is the gate's call on a random-weights model (components/gate.py), not this test's.
    assert states == {**dict.fromkeys(summary["tasks"], "SUCCEEDED"), "register-model": states["register-model"]}
    assert states["register-model"] in ("SUCCEEDED", "SKIPPED")
    shards = [s["artifacts"]["index"]["metadata"] for s in summary["tasks"]["embed"]["shards"]]
    assert [(m["shard"], m["failed"]) for m in shards] == [(0, False), (1, True)]
    assert shards[1]["error"] == "ConnectionError: injected: shard 1 lost its object store"
    # finetune computed shard 1's training and validation images itself, and says so in its metadata,
    # its metrics (the run summary's) and its report.
    run_dir = Path(summary["run_dir"])
    manifest = json.loads(Path(summary["tasks"]["ingest-dataset"]["artifacts"]["dataset"]["path"]).read_text())
    lost = {r["sha256"] for r in shard_images(manifest, 1, 2)}
    read = {it["image"]["sha256"] for it in manifest["items"] if it["split"] in ("train", "val") and it["instances"]}
    model = summary["model_metadata"]
    assert model["embeddings_computed"] == len(lost & read) >= 1
    assert model["embed_shards_failed"] == 1 and summary["metrics"]["embed_shards_failed"] == 1
    assert model["embed_failed_shards"] == "1 (ConnectionError: injected: shard 1 lost its object store)"
    report = Path(summary["reports"]["finetune"]).read_text()
    assert "embed_failed_shards" in report and "injected: shard 1" in report
    assert "finetuned_box_dice" in summary["metrics"]  # evaluate scored the model trained past the lost shard
    # What a 2.17 backend would record, the failed shard's outputs included.
    assert check_run(run_dir, DEFAULT_YAML) == 8 + (states["register-model"] == "SUCCEEDED")
