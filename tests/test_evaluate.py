"""evaluate and the HTML reports: real (random-weight) MobileSAM models on small synthetic images."""
from __future__ import annotations

import base64
import io
import json
import math
import re

import numpy as np
import pytest
import torch

from components.evaluate import EvaluationError, centre_points, encoder_fingerprint, evaluate
from components.report import Report, line_chart_svg, overlay
from components.steps import evaluate_step


# -- report -----------------------------------------------------------------------------------------

def test_chart_is_inline_svg_and_skips_nan():
    svg = line_chart_svg({"loss": ([1, 2, 3, 4], [1.0, float("nan"), 0.5, 0.25])}, title="Training loss")
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    (points,) = re.findall(r'<polyline[^>]*points="([^"]+)"', svg)
    assert len(points.split()) == 3
    # Every point lies inside the plot frame, also when the data do not end on a tick.
    svg = line_chart_svg({"loss": ([1, 2, 3], [0.8201, 0.8172, 0.8185])})
    x, y, w, h = map(float, re.search(r'<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)"',
                                      svg).groups())
    (points,) = re.findall(r'<polyline[^>]*points="([^"]+)"', svg)
    for px, py in (map(float, p.split(",")) for p in points.split()):
        assert x <= px <= x + w and y <= py <= y + h
    assert "no data" in line_chart_svg({"x": ([], [])}, title="empty")


def test_report_is_self_contained(tmp_path):
    img = np.zeros((40, 60, 3), np.uint8)
    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 10:30] = 1
    mask[25:35, 40:55] = 2
    over = overlay(img, mask)
    assert over[15, 15].any() and not over[2, 2].any()  # coloured inside instances only
    assert not np.array_equal(over[15, 20], over[30, 45])  # instances get different colours
    path = Report("r <&> t").kv({"Dice": 0.5}).history(
        {"iteration": [1, 2], "loss": [1.0, 0.5], "val_iteration": [0, 2], "val_dice": [0.1, 0.4]}
    ).image_grid([[("image", img), ("gt", over)]]).write(tmp_path / "r.html")
    html = path.read_text()
    assert "r &lt;&amp;&gt; t" in html
    assert html.count("<svg") == 2  # loss and validation Dice
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing to fetch
    from PIL import Image

    (b64,) = re.findall(r'src="data:image/png;base64,([^"]+)"', html)[:1]
    assert Image.open(io.BytesIO(base64.b64decode(b64))).size == (60, 40)


# -- prompts and the gate ---------------------------------------------------------------------------

def test_centre_point_is_inside_concave_masks():
    m = torch.zeros((1, 40, 40), dtype=torch.bool)
    m[0, 5:35, 5:12] = True   # a U: its centroid lies outside the mask
    m[0, 5:35, 28:35] = True
    m[0, 28:35, 5:35] = True
    x, y = centre_points(m)[0].astype(int)
    assert m[0, y, x]
    with pytest.raises(EvaluationError, match="empty"):
        centre_points(torch.zeros((1, 5, 5), dtype=torch.bool))


# -- evaluate ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A random vit_t (the 'zero-shot' weights) and a copy whose decoder moved (the 'fine-tuned' one)."""
    from components.sam.model import atomic_torch_save, build_sam

    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = build_sam("vit_t")
    atomic_torch_save(model.state_dict(), d / "zero_shot.pt")
    with torch.no_grad():
        for p in model.mask_decoder.parameters():
            p.add_(0.02 * torch.randn_like(p))
    atomic_torch_save(model.state_dict(), d / "finetuned.pt")
    return d / "zero_shot.pt", d / "finetuned.pt"


def test_fine_tuning_keeps_the_encoder_fingerprint(checkpoints):
    zs, ft = (torch.load(p, weights_only=True) for p in checkpoints)
    assert encoder_fingerprint(zs) == encoder_fingerprint(ft)
    zs["image_encoder.neck.0.weight"] = zs["image_encoder.neck.0.weight"] + 1
    assert encoder_fingerprint(zs) != encoder_fingerprint(ft)


def test_evaluate_scores_every_instance_and_writes_the_report(checkpoints, tmp_path, store):
    from components.datasets.reader import SampleSplit
    from components.datasets.synthetic import make_samples

    samples = make_samples(2, seed=3, size=(48, 64))
    n_instances = sum(int(s.mask.max()) for s in samples)
    zs, ft = checkpoints
    m = evaluate("vit_t", zs, ft, SampleSplit(samples, "test"), store=store, champion_weights=zs, champion_name="v7", margin=0.0, device="cpu",
                 report_path=tmp_path / "eval.html",
                 history={"iteration": [1, 2], "loss": [0.9, 0.7], "val_iteration": [0, 2], "val_dice": [.2, .3]})
    assert m["test_images"] == 2 and m["test_instances"] == n_instances
    for label in ("zero_shot", "finetuned", "champion"):
        for key in ("box_dice", "box_iou", "point_dice", "point_iou"):
            assert 0.0 <= m[f"{label}_{key}"] <= 1.0 and 0.0 <= m[f"{label}_{key}_median"] <= 1.0
            assert m[f"{label}_{key.replace('dice', 'iou')}"] <= m[f"{label}_{key.replace('iou', 'dice')}"] + 1e-9
    # The champion is the zero-shot file: identical weights must score identically.
    assert m["champion_box_dice"] == m["zero_shot_box_dice"]
    assert m["gain_box_dice_vs_champion"] == pytest.approx(m["gain_box_dice_vs_zero_shot"])
    for key in ("gain_box_dice_vs_zero_shot", "gain_point_dice_vs_champion"):
        assert m[f"{key}_low"] <= m[key] <= m[f"{key}_high"]
    # Two test images cannot show the fine-tuned model beats a champion: the gate says so, not a coin flip.
    assert m["passed"] is False and m["champion_test_images"] == 2 and m["champion_excluded_images"] == 0
    assert "only 2 test image(s) can be compared with champion v7" in m["verdict"]
    html = (tmp_path / "eval.html").read_text()
    assert html.count("data:image/png;base64,") == 2 * 5  # image, truth, zero-shot, fine-tuned, champion
    # Training curves (2) and the gate's intervals (1).
    assert "champion v7" in html and html.count("<svg") == 3 and "95 % bootstrap interval" in html
    assert "NOT PASSED: only 2 test image(s)" in html
    json.dumps(m)  # the KFP wrapper passes it on as JSON

    with pytest.raises(EvaluationError, match="no annotated instance"):
        evaluate("vit_t", zs, ft, SampleSplit([type(samples[0])("empty", samples[0].image, samples[0].mask * 0, "x")],
                                              "test", annotated_only=True), store=store)


def test_evaluate_step_finds_the_champion(checkpoints, store, s3_env, tmp_path):
    """The step reads the test split through the manifest, and the bar rises to the registered champion."""
    from components.datasets.ingest import ingest
    from components.datasets.synthetic import make_folder
    from components.steps import register_step

    cfg = store.config
    folder = make_folder(tmp_path / "data", [f"img{i}" for i in range(4)], seed=1, size=(48, 64))
    result = ingest(str(folder), "folder", "tiny", store)
    manifest_path = tmp_path / "manifest.json"
    manifest_path.write_text(json.dumps(result.manifest))
    zs, ft = checkpoints
    args = dict(weights_path=str(zs), model_path=str(ft), manifest_path=str(manifest_path), model_type="vit_t",
                margin=0.0, model_name="sam-eval-test", device="cpu", s3_endpoint=cfg.endpoint,
                bucket=cfg.bucket, prefix=cfg.prefix,
                model_metadata={"history_uri": store.uri(store.put_json(
                    store.key("runs", "r0", "history.json"), {"iteration": [1, 2], "loss": [0.5, 0.4]}).key)})
    first = evaluate_step(**args, out_report_path=str(tmp_path / "r1.html"))
    assert first["champion_box_dice"] is None and first["champion_version"] is None
    assert first["test_instances"] > 0 and first["dataset_content_hash"] == result.content_hash
    assert "<svg" in (tmp_path / "r1.html").read_text()

    # Register the zero-shot weights as the champion, trained on this very dataset version: the test split is
    # all it may be scored on, and one test image is too few to compare with it.
    register_step(str(zs), json.dumps({"finetuned_box_dice": first["zero_shot_box_dice"]}), "sam-eval-test", "",
                  "run-0", cfg.endpoint, cfg.bucket, cfg.prefix, manifest_path=str(manifest_path))
    second = evaluate_step(**{**args, "margin": 0.001}, out_report_path=str(tmp_path / "r2.html"))
    assert second["champion_version"] == "v1" and second["champion_excluded_images"] == 0
    assert math.isclose(second["champion_box_dice"], first["zero_shot_box_dice"])
    assert second["passed"] is False and "can be compared with champion v1" in second["verdict"]


def test_overlapping_splits_pass_only_with_allow_overlap(checkpoints, store, s3_env, tmp_path, caplog):
    """One image serves train, val and test: the gate refuses it (the scores are of a trained-on image) unless
    allow_overlap (`run --allow-overlap`), which passes and says so; the pipeline wires the flag to this step
    (tests/test_pipeline.py) and the whole run's refusal is in tests/test_pipeline_local.py."""
    from components.datasets.ingest import ingest
    from components.datasets.synthetic import make_folder

    cfg = store.config
    folder = make_folder(tmp_path / "data", ["only"], seed=3, size=(48, 64))
    manifest_path = tmp_path / "manifest.json"
    manifest_path.write_text(json.dumps(ingest(str(folder), "folder", "one", store).manifest))
    zs, ft = checkpoints
    args = dict(weights_path=str(zs), model_path=str(ft), manifest_path=str(manifest_path), model_type="vit_t",
                margin=-1.0, model_name="sam-overlap", device="cpu", s3_endpoint=cfg.endpoint, bucket=cfg.bucket,
                prefix=cfg.prefix)
    refused = evaluate_step(**args, out_report_path=str(tmp_path / "r1.html"))
    assert refused["passed"] is False and refused["verdict"].startswith("not passed: the splits of one overlap")
    assert refused["splits_overlap"] is True and "allow_overlap" in refused["verdict"]
    with caplog.at_level("WARNING"):
        allowed = evaluate_step(**args, allow_overlap=True, out_report_path=str(tmp_path / "r2.html"))
    assert allowed["passed"] is True and allowed["splits_overlap"] is True
    assert "registering anyway (allow_overlap)" in caplog.text


def test_the_champion_is_never_scored_on_images_it_trained_or_validated_on(checkpoints, store, s3_env, tmp_path):
    """A champion trained on another dataset version (here: the same images split with another seed, as a
    change of split rule would) is compared only on the test images outside its train and val splits, and
    the metrics and the report say how many were left out."""
    from components.datasets.ingest import ingest
    from components.datasets.synthetic import make_folder
    from components.steps import register_step

    cfg = store.config
    # Eight images: seed 23 puts two in the test split, one of which seed 0 had trained on.
    folder = make_folder(tmp_path / "data", [f"img{i:02d}" for i in range(8)], seed=2, size=(40, 48))
    old, new = (ingest(str(folder), "folder", "moved", store, seed=seed).manifest for seed in (0, 23))
    paths = {}
    for name, manifest in (("old", old), ("new", new)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(manifest))
    zs, ft = checkpoints
    register_step(str(zs), "{}", "sam-moved", "", "run-0", cfg.endpoint, cfg.bucket, cfg.prefix,
                  manifest_path=str(paths["old"]))
    seen = {it["image"]["sha256"] for it in old["items"] if it["split"] in ("train", "val")}
    test = [it for it in new["items"] if it["split"] == "test"]
    left_out = [it["id"] for it in test if it["image"]["sha256"] in seen]
    assert 0 < len(left_out) < len(test)
    m = evaluate_step(weights_path=str(zs), model_path=str(ft), manifest_path=str(paths["new"]), model_type="vit_t",
                      margin=0.0, model_name="sam-moved", device="cpu", s3_endpoint=cfg.endpoint, bucket=cfg.bucket,
                      prefix=cfg.prefix, out_report_path=str(tmp_path / "r.html"))
    assert (m["test_images"], m["champion_excluded_images"]) == (len(test), len(left_out))
    assert m["champion_test_images"] == len(test) - len(left_out) == m["gain_vs_champion_images"]
    assert m["gain_vs_zero_shot_images"] == len(test)
    html = (tmp_path / "r.html").read_text()
    assert f"{len(left_out)} left out because they were in its training or validation data" in html
    # The per-image table: the champion's cells of exactly those images say so.
    for image in left_out:
        row = re.search(f"<tr><td>{image}</td>.*?</tr>", html).group(0)
        assert row.count("left out") == 2  # box and point Dice
