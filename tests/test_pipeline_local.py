"""The whole pipeline through kfp.local (SubprocessRunner, this interpreter), as `sam-pipeline run` runs it:
a synthetic Penn-Fudan zip and a random vit_t checkpoint served over HTTP, the S3 server on loopback.

One registered run is shared by the module, and each later test runs the pipeline again on what it left, the
way nightly retraining meets its own registry: the same run again does nothing after check-changes
(components/changes.py), and changed data (a COCO export of one image of the first dataset's test split) is
ingested as COCO, trains on the embedding the first run stored, evaluates against v1 (with COCO mask AP), but
its overlapping splits refuse registration (forcing a run and the gate's margin are decisions tested on their
own: tests/test_nightly.py, tests/test_gate.py) after a SIGKILL mid-training and `run --resume`; v1 then
segments the export's image from its boxes (`predict --model`). The first run also loses an embed shard
(tests/faults/sitecustomize.py makes its body raise, as a store outage or a CUDA error would): that costs time
only, and finetune says what it computed itself."""
from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from kfp_launcher_rules import check_run

from components.datasets import synthetic
from components.datasets.reader import shard_images
from components.registry import ObjectStoreRegistry
from pipelines import local_runs
from pipelines.cli import main
from pipelines.sam_finetune import DEFAULT_YAML

FAULTS = Path(__file__).with_name("faults")  # sitecustomize.py: fails the shard named by the variable
ROOT = Path(__file__).resolve().parents[1]
LOST = "ConnectionError: injected: shard 1 lost its object store"
TASKS = ("fetch-weights", "ingest-dataset", "check-changes", "embed-shards", "embed", "finetune", "evaluate",
         "register-model")
STAGES = ("finetune", "evaluate", "register-model")


@dataclass
class Chain:
    """The module's working folder, store and flags, and its first run's (exit code, summary, console text)."""
    tmp: Path
    store: object
    common: list
    first: tuple = ()
    one: tuple = ()  # the flags that name a one-image COCO export instead
    export: Path | None = None  # that export's folder (images/, annotations.json)
    print_kept: bool = False  # whether print was the same function after the first run as before it

    def run(self, *extra) -> tuple[int, dict, str]:
        summary = self.tmp / f"summary{len(list(self.tmp.glob('summary*')))}.json"
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["run", *self.common, *extra, "--pipeline-root", str(self.tmp / "outputs"),
                         "--summary-json", str(summary)])
        return code, json.loads(summary.read_text()) if summary.is_file() else {}, out.getvalue() + err.getvalue()


@pytest.fixture(scope="module")
def chain(pipeline_sources, module_http_server, s3, tmp_path_factory):
    from components.storage import ObjectStore

    src, weights_sha = pipeline_sources
    tmp = tmp_path_factory.mktemp("e2e")
    base = module_http_server(src)
    store = ObjectStore(replace(s3, prefix=f"t-e2e-{uuid.uuid4().hex[:8]}/"))
    common = ["--dataset-source", f"{base}/PennFudanPed.zip", "-i", "2", "-g", "cpu", "-n", "4", "--val-every", "2",
              "--weights-url", f"{base}/vit_t_random.pth", "--weights-sha256", weights_sha,
              "--s3-endpoint", s3.endpoint, "--prefix", store.config.prefix,
              "--model-name", "sam-e2e", "--embed-shards", "2"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # finetune leaves checkpoints/<name>/ in the working directory, like the seed
        for name, value in {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
                            "SAM_MODELS": str(tmp / "sam_models")}.items():
            mp.setenv(name, value)
        # kfp.local starts each task in a fresh interpreter with this environment.
        mp.setenv("PYTHONPATH", os.pathsep.join([str(FAULTS), str(ROOT), os.environ.get("PYTHONPATH", "")]))
        mp.setenv("SAM_TEST_FAIL_EMBED_SHARD", "1")
        chain = Chain(tmp, store, common)
        # margin -1: any fine-tuned model beats the bar, so every task runs; two embed shards fan out first,
        # and shard 1 fails inside its body.
        printer = builtins.print
        chain.first = chain.run("--margin", "-1")
        chain.print_kept = builtins.print is printer
        mp.delenv("SAM_TEST_FAIL_EMBED_SHARD")
        manifest = tmp / chain.first[1]["tasks"]["ingest-dataset"]["artifacts"]["dataset"]["path"]
        chain.export = _one_image_coco(src / "PennFudanPed.zip", json.loads(manifest.read_text()), tmp / "export")
        served = synthetic.zip_folder(chain.export, tmp / "sources" / "one.zip")
        chain.one = ("--dataset-source", f"{module_http_server(served.parent)}/{served.name}",
                     "--dataset-format", "coco", "--dataset-categories", "shape", "--dataset-name", "one")
        yield chain


def _one_image_coco(source: Path, manifest: dict, dest: Path) -> Path:
    """A COCO export of one image of `source`, the first of its test split (its bytes as they are: new data, a
    known image), with a crowd region and a "blob" instance that `--dataset-categories shape` leaves out."""
    import zipfile

    from PIL import Image

    from components.datasets.synthetic_coco import write_coco
    from components.label_values import IGNORE

    (name,) = [it["id"] for it in manifest["items"] if it["split"] == "test"][:1]
    with zipfile.ZipFile(source) as z:
        image, mask = (z.read(f"PennFudanPed/{folder}/{name}{tail}")
                       for folder, tail in (("PNGImages", ".png"), ("PedMasks", "_mask.png")))
    dest.mkdir(parents=True)
    (dest / f"{name}.png").write_bytes(image)
    mask = np.array(Image.open(io.BytesIO(mask)))
    mask[-8:, -8:] = 2  # instance 2 is a "blob" (write_coco: categories by instance id)
    mask[:3, :] = IGNORE  # a crowd region
    write_coco(dest, [(name, dest / f"{name}.png", mask)], "rle", categories=("shape", "blob"))
    (dest / f"{name}.png").unlink()
    return dest


@pytest.mark.slow
def test_run_end_to_end_registers_v1_and_loses_a_shard_only_in_time(chain, tmp_path):
    code, summary, log = chain.first
    assert code == 0, log[-3000:]
    tmp = chain.tmp
    assert {t: summary["tasks"][t]["state"] for t in TASKS} == dict.fromkeys(TASKS, "SUCCEEDED")
    assert summary["registered"]["version"] == "v1" and "skipped" not in summary
    # What a real KFP 2.17 backend would record: every artifact's metadata and every output parameter,
    # the failed shard's included.
    assert check_run(Path(summary["run_dir"]), DEFAULT_YAML) == len(TASKS) + 1  # embed ran twice
    # kfp.local swaps print around each task, and the fan-out's threads could leave it indenting for good.
    assert chain.print_kept
    shards = [s["artifacts"]["index"]["metadata"] for s in summary["tasks"]["embed"]["shards"]]
    assert [(m["shard"], m["failed"]) for m in shards] == [(0, False), (1, True)]
    assert {m["shards"] for m in shards} == {2} and shards[1]["error"] == LOST
    manifest = json.loads((tmp / summary["tasks"]["ingest-dataset"]["artifacts"]["dataset"]["path"]).read_text())
    images = summary["tasks"]["ingest-dataset"]["artifacts"]["dataset"]["metadata"]["images"]
    lost = {r["sha256"] for r in shard_images(manifest, 1, 2)}
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
    report = (tmp / summary["reports"]["finetune"]).read_text()
    assert "embed_failed_shards" in report and "injected: shard 1" in report
    for task, output in (("fetch-weights", "weights"), ("ingest-dataset", "dataset"), ("finetune", "model"),
                         ("finetune", "report"), ("evaluate", "report")):
        art = summary["tasks"][task]["artifacts"][output]
        assert art["path"] and (tmp / art["path"]).is_file(), (task, output)
    assert summary["dataset"]["content_hash"] and summary["weights"]["sha256"]
    m = summary["metrics"]
    assert 0 <= m["finetuned_box_dice"] <= 1 and 0 <= m["zero_shot_box_dice"] <= 1
    assert summary["passed"] is True
    assert {"best", "latest"} <= set(summary["checkpoints"])
    assert (tmp / "checkpoints" / "sam_instance_seg" / "best.pt").is_file()
    html = (tmp / summary["reports"]["evaluate"]).read_text()
    assert "data:image/png;base64," in html and "<svg" in html and "95 % bootstrap interval" in html
    # The gate's intervals: on the KFP Metrics artifact (what the UI shows), in the summary and on the card.
    logged = summary["tasks"]["evaluate"]["artifacts"]["metrics"]["metadata"]
    for key in ("gain_box_dice_vs_zero_shot", "gain_point_dice_vs_zero_shot"):
        assert logged[f"{key}_low"] <= logged[key] <= logged[f"{key}_high"] and logged[key] == m[key]
    assert "gain over zero-shot, 95 % interval: box " in log and "margin -1: passed" in log

    # The registered version loads with the official MobileSAM builder.
    from mobile_sam import sam_model_registry

    reg = ObjectStoreRegistry(chain.store)
    card = reg.card("sam-e2e", "v1")
    assert card["dataset"]["content_hash"] == summary["dataset"]["content_hash"]
    assert card["weights"]["sha256"] == summary["weights"]["sha256"] and card["run_id"]
    assert card["training"]["config"]["n_iterations"] == 2 and card["training"]["config"]["device"] == "cpu"
    assert card["zero_shot"]["box_dice"] == m["zero_shot_box_dice"]
    assert card["metrics"]["box_dice"] == m["finetuned_box_dice"]
    assert card["gate"]["gain_box_dice_vs_zero_shot_low"] == m["gain_box_dice_vs_zero_shot_low"]
    assert card["trained_on"]["split_rule"] == summary["dataset"]["split_rule"]
    # What the champion may never be scored on: its dataset version's train and val images, by content.
    seen = reg.extra("sam-e2e", "v1", "training_data.json")
    assert seen["content_hash"] == summary["dataset"]["content_hash"] and seen["train"] and seen["val"]
    path = reg.fetch("sam-e2e", "latest", tmp_path / "registered.pt")
    sam_model_registry["vit_t"](checkpoint=str(path))


@pytest.mark.slow
def test_the_same_run_again_stops_after_check_changes(chain):
    """Tonight's scheduled run on unchanged data and settings trains nothing (tests/test_nightly.py: the rule)."""
    code, summary, out = chain.run("--margin", "-1")
    assert code == 0, out[-3000:]
    states = {t: summary["tasks"][t]["state"] for t in ("check-changes", *STAGES)}
    assert states == {"check-changes": "SUCCEEDED", **dict.fromkeys(STAGES, "SKIPPED")}, summary["tasks"]
    assert summary["skipped"] == "nothing changed since sam-e2e v1"
    assert "skipped: nothing changed since sam-e2e v1" in out
    assert summary["succeeded"] is True and summary["registered"] is None


def _iteration(path: Path) -> int | None:
    from components.training.checkpoints import load_checkpoint

    try:
        return int(load_checkpoint(path)["iteration"]) if path.is_file() else None
    except ValueError:  # not written yet
        return None


def _killed_mid_training(chain: Chain, flags: list, name: str) -> tuple[int, dict]:
    """Start `sam-pipeline run` with `flags` in a process of its own and SIGKILL it, the task subprocesses with
    it (as a closed terminal would), once training wrote a checkpoint: (the iteration it stopped at, its run
    record)."""
    latest = chain.tmp / "checkpoints" / name / "latest.pt"
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from pipelines.cli import main; sys.exit(main())",
                             "run", *chain.common, *flags, "-i", "400", "--pipeline-root", str(chain.tmp / "outputs")],
                            cwd=chain.tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not _iteration(latest):
            assert proc.poll() is None, "the run ended before training wrote its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stopped = _iteration(latest)
    assert 1 <= stopped < 400
    (record,) = [r for r in map(json.loads, map(Path.read_text, (chain.tmp / "outputs" / "runs").glob("*.json")))
                 if r["checkpoint_name"] == name]
    assert record["state"] == local_runs.RUNNING  # nothing ran after SIGKILL
    return stopped, record


@pytest.mark.slow
def test_changed_data_trains_and_its_overlapping_splits_refuse_registration(chain):
    """A one-image COCO export serves all three splits: it is ingested as COCO (its crowd region ignored, the
    categories it names kept) and trains (the data changed) on the embedding the first run stored for that image
    (content-addressed, whichever dataset version and format it came in), evaluate scores champion v1 on it and
    says why it cannot pass, once, and the registry keeps v1 alone (evaluate_step's allow_overlap:
    tests/test_evaluate.py). The run is killed mid-training first, and `run --resume` continues it from its
    own latest.pt instead of starting from zero (pipelines/local_runs.py)."""
    flags = [*chain.one, "--margin", "-1", "--embed-shards", "1", "-c", "changed"]
    stopped, killed = _killed_mid_training(chain, flags, "changed")
    assert local_runs.unfinished(chain.tmp / "outputs", "changed")["run_id"] == killed["run_id"]
    assert local_runs.stopped_at("changed", killed["run_id"], chain.tmp / "checkpoints") == stopped
    code, summary, out = chain.run(*flags, "-i", str(stopped + 1), "--resume")
    assert code == 0, out[-3000:]
    assert f"resuming run {killed['run_id']}" in out
    assert summary["metrics"]["resumed_from"] == stopped and summary["model_metadata"]["run_id"] == killed["run_id"]
    assert local_runs.unfinished(chain.tmp / "outputs", "changed") is None
    manifest = json.loads((chain.tmp / summary["tasks"]["ingest-dataset"]["artifacts"]["dataset"]["path"])
                          .read_text())
    anns = json.loads((chain.export / "annotations.json").read_text())["annotations"]
    assert manifest["layout"] == "coco" and manifest["categories"] == [{"id": 1, "name": "shape"}]
    (item,) = manifest["items"]
    assert item["categories"] == ["shape"] * item["instances"] and any(a["category_id"] == 2 for a in anns)
    assert item["instances"] == sum(a["category_id"] == 1 and not a["iscrowd"] for a in anns) >= 1
    states = {t: summary["tasks"][t]["state"] for t in TASKS}
    assert states == {**dict.fromkeys(TASKS[:-1], "SUCCEEDED"), "register-model": "SKIPPED"}
    assert summary["tasks"]["check-changes"]["parameters"]["reason"].startswith(
        "changed since sam-e2e v1: dataset content hash")
    assert check_run(Path(summary["run_dir"]), DEFAULT_YAML) == 7  # a champion in evaluate, no register-model
    (shard,) = summary["tasks"]["embed"]["shards"]
    assert (shard["artifacts"]["index"]["metadata"]["computed"], summary["metrics"]["embeddings_computed"]) == (0, 0)
    m = summary["metrics"]
    assert m["champion_version"] == "v1" and 0 <= m["finetuned_mask_ap"] <= 1 and 0 <= m["zero_shot_mask_ap50"] <= 1
    verdict = summary["metrics"]["verdict"]
    assert verdict.startswith("not passed: the splits of one overlap") and verdict in summary["tasks"][
        "register-model"]["reason"]
    # One test image cannot be compared with v1 either: both reasons, each said once.
    assert "only 1 test image(s) can be compared with champion v1" in verdict
    assert summary["passed"] is False and summary["metrics"]["splits_overlap"] is True
    assert out.count("the splits of one overlap") == 1 and "WARNING" not in out
    # The evaluation report gives the same verdict as the gate, with the reason.
    assert "NOT PASSED: the splits of one overlap" in Path(summary["reports"]["evaluate"]).read_text()
    assert ObjectStoreRegistry(chain.store).versions("sam-e2e") == ["v1"]


@pytest.mark.slow
def test_the_registered_model_segments_a_coco_exports_boxes(chain):
    """`predict --model` fetches v1 from the registry and writes one COCO result per box (a crowd region is no
    prompt) and one mask image per image."""
    out_dir = chain.tmp / "pred"
    with contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(["predict", "--model", "sam-e2e", "--images", str(chain.export / "images"), "--prompts",
                     str(chain.export / "annotations.json"), "--output", str(out_dir), "--no-progress", "-g", "cpu",
                     "--s3-endpoint", chain.store.config.endpoint, "--prefix", chain.store.config.prefix])
    assert code == 0, err.getvalue()[-2000:]
    results = json.loads((out_dir / "predictions.json").read_text())
    export = json.loads((chain.export / "annotations.json").read_text())
    anns, (image,) = export["annotations"], export["images"]
    assert len(results) == sum(not a["iscrowd"] for a in anns) < len(anns)
    assert len(list((out_dir / "masks").iterdir())) == 1
    assert all(r["segmentation"]["size"] == [image["height"], image["width"]] for r in results)
    assert np.isfinite([r["score"] for r in results]).all() and all(0 <= r["score"] <= 1.5 for r in results)


def test_run_stops_in_one_line_when_a_source_is_unreachable(tmp_path, capsys, monkeypatch):
    from helpers import free_port

    monkeypatch.chdir(tmp_path)
    url = f"http://127.0.0.1:{free_port()}/PennFudanPed.zip"
    code = main(["run", "-g", "cpu", "--dataset-source", url])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert url in err and "--dataset-source" in err and "--demo" in err
    assert not (tmp_path / "local_outputs").exists()  # stopped before anything ran
