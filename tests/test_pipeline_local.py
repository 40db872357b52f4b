"""The whole pipeline through kfp.local (SubprocessRunner, this interpreter), as `sam-pipeline run` runs it:
a synthetic Penn-Fudan zip and a random vit_t checkpoint served over HTTP, the S3 server on loopback.
The first run also loses an embed shard (tests/faults/sitecustomize.py makes its body raise, as a store
outage or a CUDA error would): that costs time only, and finetune says what it computed itself."""
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
LOST = "ConnectionError: injected: shard 1 lost its object store"
TASKS = ("fetch-weights", "ingest-dataset", "check-changes", "embed-shards", "embed", "finetune", "evaluate",
         "register-model")


def _run(tmp_path, capsys, *extra) -> tuple[int, dict, str]:
    summary = tmp_path / f"summary{len(list(tmp_path.glob('summary*')))}.json"
    code = main(["run", *extra, "--pipeline-root", str(tmp_path / "outputs"), "--summary-json", str(summary)])
    out, err = capsys.readouterr()
    return code, json.loads(summary.read_text()) if summary.is_file() else {}, out + err


@pytest.mark.slow
def test_run_end_to_end_then_gate_skips_register(pipeline_sources, http_server, store, s3_env, tmp_path,
                                                  monkeypatch, capsys):
    src, weights_sha = pipeline_sources
    base = http_server(src)
    monkeypatch.chdir(tmp_path)  # finetune leaves checkpoints/<name>/ in the working directory, like the seed
    common = ["-i", "3", "-g", "cpu", "-n", "4", "--val-every", "3", "--dataset-source", f"{base}/PennFudanPed.zip",
              "--weights-url", f"{base}/vit_t_random.pth", "--weights-sha256", weights_sha,
              "--s3-endpoint", s3_env.endpoint, "--prefix", s3_env.prefix, "--model-name", "sam-e2e"]

    # margin -1: any fine-tuned model beats the bar, so every task runs; three embed shards fan out first,
    # and shard 1 fails inside its body. kfp.local starts each task in a fresh interpreter with this environment.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAULTS), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("SAM_TEST_FAIL_EMBED_SHARD", "1")
    code, summary, log = _run(tmp_path, capsys, *common, "--margin", "-1", "--embed-shards", "3")
    assert code == 0, log[-3000:]
    assert {t: summary["tasks"][t]["state"] for t in TASKS} == dict.fromkeys(TASKS, "SUCCEEDED")
    # What a real KFP 2.17 backend would record: every artifact's metadata and every output parameter,
    # the failed shard's included.
    assert check_run(Path(summary["run_dir"]), DEFAULT_YAML) == len(TASKS) + 2  # embed ran three times
    shards = [s["artifacts"]["index"]["metadata"] for s in summary["tasks"]["embed"]["shards"]]
    assert [(m["shard"], m["failed"]) for m in shards] == [(0, False), (1, True), (2, False)]
    assert {m["shards"] for m in shards} == {3} and shards[1]["error"] == LOST
    manifest = json.loads((tmp_path / summary["tasks"]["ingest-dataset"]["artifacts"]["dataset"]["path"]).read_text())
    images = summary["tasks"]["ingest-dataset"]["artifacts"]["dataset"]["metadata"]["images"]
    lost = {r["sha256"] for r in shard_images(manifest, 1, 3)}
    ok = [m for m in shards if not m["failed"]]
    assert sum(m["computed"] for m in ok) == sum(m["images"] for m in ok) == images - len(lost)
    # finetune read what the other shards computed and computed only the lost shard's training and
    # validation images itself; it says so in its metadata, its metrics (the run summary's) and its report.
    read = {it["image"]["sha256"] for it in manifest["items"] if it["split"] in ("train", "val") and it["instances"]}
    finetuned = summary["tasks"]["finetune"]["artifacts"]["model"]["metadata"]
    assert finetuned["embeddings_computed"] == len(lost & read) >= 1
    assert finetuned["embeddings_from_store"] >= 1
    assert finetuned["embed_shards_failed"] == 1 and summary["metrics"]["embed_shards_failed"] == 1
    assert finetuned["embed_failed_shards"] == f"1 ({LOST})"
    report = (tmp_path / summary["reports"]["finetune"]).read_text()
    assert "embed_failed_shards" in report and "injected: shard 1" in report
    for task, output in (("fetch-weights", "weights"), ("ingest-dataset", "dataset"), ("finetune", "model"),
                         ("finetune", "report"), ("evaluate", "report")):
        art = summary["tasks"][task]["artifacts"][output]
        assert art["path"] and (tmp_path / art["path"]).is_file(), (task, output)
    assert summary["dataset"]["content_hash"] and summary["weights"]["sha256"] == weights_sha
    m = summary["metrics"]
    assert 0 <= m["finetuned_box_dice"] <= 1 and 0 <= m["zero_shot_box_dice"] <= 1
    assert summary["passed"] is True and summary["registered"]["version"] == "v1"
    assert {"best", "latest"} <= set(summary["checkpoints"])
    assert (tmp_path / "checkpoints" / "sam_instance_seg" / "best.pt").is_file()
    html = (tmp_path / summary["reports"]["evaluate"]).read_text()
    assert "data:image/png;base64," in html and "<svg" in html and "95 % bootstrap interval" in html
    # The gate's intervals: on the KFP Metrics artifact (what the UI shows), in the summary and on the card.
    logged = summary["tasks"]["evaluate"]["artifacts"]["metrics"]["metadata"]
    for key in ("gain_box_dice_vs_zero_shot", "gain_point_dice_vs_zero_shot"):
        assert logged[f"{key}_low"] <= logged[key] <= logged[f"{key}_high"] and logged[key] == m[key]
    assert "gain over zero-shot, 95 % interval: box " in log and "margin -1: passed" in log

    # The registered version loads with the official MobileSAM builder.
    from mobile_sam import sam_model_registry

    from components.registry import ObjectStoreRegistry

    reg = ObjectStoreRegistry(store)
    card = reg.card("sam-e2e", "v1")
    assert card["dataset"]["content_hash"] == summary["dataset"]["content_hash"]
    assert card["weights"]["sha256"] == weights_sha and card["run_id"]
    assert card["training"]["config"]["n_iterations"] == 3 and card["training"]["config"]["device"] == "cpu"
    assert card["zero_shot"]["box_dice"] == m["zero_shot_box_dice"]
    assert card["metrics"]["box_dice"] == m["finetuned_box_dice"]
    assert card["gate"]["gain_box_dice_vs_zero_shot_low"] == m["gain_box_dice_vs_zero_shot_low"]
    assert card["trained_on"]["split_rule"] == summary["dataset"]["split_rule"]
    # What the champion may never be scored on: its dataset version's train and val images, by content.
    seen = reg.extra("sam-e2e", "v1", "training_data.json")
    assert seen["content_hash"] == summary["dataset"]["content_hash"] and seen["train"] and seen["val"]
    path = reg.fetch("sam-e2e", "latest", tmp_path / "registered.pt")
    sam_model_registry["vit_t"](checkpoint=str(path))

    monkeypatch.delenv("SAM_TEST_FAIL_EMBED_SHARD")
    # An impossible margin: evaluate runs (against v1 as the champion too) and register-model is skipped.
    # --force: the data and settings are v1's, which alone would skip training (tests/test_nightly.py).
    code, summary, log = _run(tmp_path, capsys, *common, "--margin", "2.0", "--force")
    assert code == 0, log[-3000:]
    states = {t: summary["tasks"][t]["state"] for t in TASKS}
    assert states == {**dict.fromkeys(TASKS[:-1], "SUCCEEDED"), "register-model": "SKIPPED"}
    assert summary["tasks"]["check-changes"]["parameters"]["reason"] == "retraining forced (force_retrain)"
    assert check_run(Path(summary["run_dir"]), DEFAULT_YAML) == 7  # a resumed finetune, a champion in evaluate
    # The default: one shard, everything already in the store (finetune and evaluate stored what they computed).
    (shard,) = summary["tasks"]["embed"]["shards"]
    assert shard["artifacts"]["index"]["metadata"]["computed"] == 0
    assert summary["passed"] is False and summary["metrics"]["champion_version"] == "v1"
    assert reg.versions("sam-e2e") == ["v1"]
    assert "register-model skipped" in log


def test_run_stops_in_one_line_when_a_source_is_unreachable(tmp_path, capsys, monkeypatch):
    from components.s3server import free_port

    monkeypatch.chdir(tmp_path)
    url = f"http://127.0.0.1:{free_port()}/PennFudanPed.zip"
    code = main(["run", "-g", "cpu", "--dataset-source", url])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert url in err and "--dataset-source" in err and "--demo" in err
    assert not (tmp_path / "local_outputs").exists()  # stopped before anything ran
