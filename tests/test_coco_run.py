"""A COCO export through the whole local pipeline (`sam-pipeline run`, kfp.local, the S3 server on loopback):
ingested, trained, evaluated (with COCO mask AP) and registered, then segmenting with `predict --model`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from kfp_launcher_rules import check_run

from components.datasets import synthetic
from components.datasets.synthetic_coco import write_coco
from components.label_values import IGNORE
from components.registry import ObjectStoreRegistry
from pipelines.cli import main
from pipelines.sam_finetune import DEFAULT_YAML


@pytest.mark.slow
def test_a_coco_export_ingests_trains_evaluates_registers_and_predicts(pipeline_sources, http_server, store,
                                                                       s3_env, tmp_path, monkeypatch, capsys):
    src, weights_sha = pipeline_sources
    base = http_server(src)
    monkeypatch.chdir(tmp_path)
    samples = [(s.id, s.image, s.mask.copy()) for s in synthetic.make_samples(8, seed=9, size=(64, 64))]
    samples[0][2][:, :6] = IGNORE  # a crowd region
    export = tmp_path / "export"
    write_coco(export, samples, "rle", categories=("shape", "blob"))
    synthetic.zip_folder(export, tmp_path / "export.zip")
    summary_path = tmp_path / "summary.json"
    code = main(["run", "-i", "2", "-g", "cpu", "-n", "4", "--val-every", "2", "--margin", "-1",
                 "--dataset-source", str(tmp_path / "export.zip"), "--dataset-format", "coco",
                 "--dataset-categories", "shape", "--dataset-name", "coco-e2e",
                 "--weights-url", f"{base}/vit_t_random.pth", "--weights-sha256", weights_sha,
                 "--s3-endpoint", s3_env.endpoint, "--prefix", s3_env.prefix, "--model-name", "sam-coco",
                 "--pipeline-root", str(tmp_path / "outputs"), "--summary-json", str(summary_path)])
    out = capsys.readouterr()
    assert code == 0, (out.out + out.err)[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["registered"]["version"] == "v1"
    check_run(Path(summary["run_dir"]), DEFAULT_YAML)  # what a KFP 2.17 backend would accept
    m = summary["metrics"]
    assert 0 <= m["finetuned_mask_ap"] <= 1 and 0 <= m["zero_shot_mask_ap50"] <= 1
    manifest = json.loads((tmp_path / summary["tasks"]["ingest-dataset"]["artifacts"]["dataset"]["path"]).read_text())
    assert manifest["layout"] == "coco" and manifest["categories"] == [{"id": 1, "name": "shape"}]
    assert all(set(it["categories"]) <= {"shape"} and len(it["categories"]) == it["instances"]
               for it in manifest["items"])
    card = ObjectStoreRegistry(store).card("sam-coco", "v1")
    assert card["dataset"]["content_hash"] == manifest["content_hash"]

    # The registered version segments the export's images from its boxes.
    code = main(["predict", "--model", "sam-coco", "--images", str(export / "images"), "--prompts",
                 str(export / "annotations.json"), "--output", str(tmp_path / "pred"), "--no-progress",
                 "-g", "cpu", "--s3-endpoint", s3_env.endpoint, "--prefix", s3_env.prefix])
    assert code == 0, capsys.readouterr().err[-2000:]
    results = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    anns = json.loads((export / "annotations.json").read_text())["annotations"]
    n_boxes = sum(not a["iscrowd"] for a in anns)  # a crowd region is no prompt
    assert n_boxes < len(anns)
    assert len(results) == n_boxes and len(list((tmp_path / "pred" / "masks").iterdir())) == 8
    assert all(0 <= r["score"] <= 1.5 and r["segmentation"]["size"] == [64, 64] for r in results)
    assert np.isfinite([r["score"] for r in results]).all()
