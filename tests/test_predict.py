"""predict: the project's decoder path against the official SamPredictor, the outputs users feed to the next
tool (instance PNGs, COCO results that pycocotools reads and scores), and the CLI from a file and from the
registry (real S3 server)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from components import predict as P
from components.datasets.synthetic_coco import make_coco
from components.registry import ObjectStoreRegistry
from components.sam.model import build_sam
from components.sam.transforms import Frame
from pipelines.cli import main


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("coco") / "export", 3, seed=5, size=(56, 72), categories=("a", "b"))


@pytest.fixture(scope="module")
def model(random_vit_t):
    return build_sam("vit_t", random_vit_t[0])


@pytest.fixture(scope="module")
def official(model, coco_set):
    """The official SamPredictor with each image of `coco_set` set (one encoder pass per image per module)."""
    from segment_anything import SamPredictor

    out = {}
    for path in sorted((coco_set / "images").iterdir()):
        out[path.name] = SamPredictor(model)
        out[path.name].set_image(np.asarray(Image.open(path).convert("RGB")))
    return out


@pytest.fixture(scope="module")
def predicted(model, coco_set, tmp_path_factory):
    """(prompts, summary, output folder) of one P.predict over `coco_set` in batches of 2 (3 images: the
    last batch is partial)."""
    prompts = P.prompts_from_coco(coco_set / "annotations.json", coco_set / "images")
    out = tmp_path_factory.mktemp("predicted") / "out"
    return prompts, P.predict(model, prompts, out, batch_size=2, progress=False), out


def gt_boxes(coco_set) -> dict[str, np.ndarray]:
    doc = json.loads((coco_set / "annotations.json").read_text())
    names = {im["id"]: im["file_name"] for im in doc["images"]}
    out: dict[str, list] = {}
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        out.setdefault(names[a["image_id"]], []).append([x, y, x + w - 1, y + h - 1])
    return {k: np.array(v) for k, v in out.items()}


def test_box_predictions_equal_the_official_sam_predictor(model, coco_set, official):
    name, boxes = sorted(gt_boxes(coco_set).items())[0]
    image = np.asarray(Image.open(coco_set / "images" / name).convert("RGB"))
    predictor = official[name]
    expected = [predictor.predict(box=b, multimask_output=False) for b in boxes]
    # The same embedding through the project's decoder path: the same masks and scores.
    masks, scores = P.decode_boxes(model, predictor.features[0], Frame.for_size(*image.shape[:2]), boxes)
    for k, (m, s, _) in enumerate(expected):
        assert np.array_equal(masks[k], m[0]), k
        assert scores[k] == pytest.approx(float(s[0]), abs=1e-5)


def test_predict_end_to_end_matches_the_predictor_and_writes_usable_outputs(predicted, official):
    from pycocotools import mask as mask_utils

    prompts, summary, out = predicted
    results = json.loads((out / "predictions.json").read_text())
    assert summary["images"] == 3 and summary["instances"] == len(results) == sum(len(p.boxes) for p in prompts)
    for p in prompts:
        predictor = official[p.path.name]
        label = np.asarray(Image.open(out / "masks" / f"{p.path.stem}.png"))
        mine = [r for r in results if r["image_id"] == p.image_id]
        assert [r["category_id"] for r in mine] == p.category_ids
        assert (out / "overlays" / f"{p.path.stem}.png").is_file()
        for k, (box, r) in enumerate(zip(p.boxes, mine)):
            m, s, _ = predictor.predict(box=box, multimask_output=False)
            ours = mask_utils.decode({**r["segmentation"], "counts": r["segmentation"]["counts"].encode()}).astype(bool)
            # Embeddings are stored fp16-rounded (embeddings.compute_embeddings): a few edge pixels may flip.
            assert (ours != m[0]).mean() < 0.01 and r["score"] == pytest.approx(float(s[0]), abs=0.02)
            assert np.array_equal(label == k + 1, ours & ~np.isin(label, [j + 1 for j in range(len(mine))
                                                                           if mine[j]["score"] > r["score"]]))


def test_coco_results_load_in_pycocotools_and_score_against_their_ground_truth(coco_set, predicted):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(coco_set / "annotations.json"))
    ev = COCOeval(gt, gt.loadRes(str(predicted[2] / "predictions.json")), iouType="segm")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert 0.0 <= ev.stats[0] <= 1.0 and len(ev.evalImgs) > 0
    # The ground truth written as results through the same encoder scores AP 1.
    perfect = []
    for img_id in gt.getImgIds():
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[img_id]))
        masks = np.stack([gt.annToMask(a).astype(bool) for a in anns])
        perfect += P.coco_results(img_id, masks, np.ones(len(anns)), [a["category_id"] for a in anns])
    ev = COCOeval(gt, gt.loadRes(perfect), iouType="segm")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_automatic_mask_generation_without_prompts(model, coco_set):
    image = np.asarray(Image.open(sorted((coco_set / "images").iterdir())[0]).convert("RGB"))
    masks, scores = P.automatic_masks(model, image, points_per_side=4, pred_iou_thresh=0.0,
                                      stability_score_thresh=0.0)
    assert masks.shape[1:] == image.shape[:2] and len(masks) == len(scores)


def test_instance_png_gives_overlaps_to_the_higher_score():
    masks = np.zeros((3, 4, 4), bool)
    masks[0, :2], masks[1, 1:3], masks[2, 3] = True, True, True
    label = P.instance_png(masks, np.array([0.2, 0.9, 0.5]))
    assert label[0].tolist() == [1] * 4 and label[1].tolist() == [2] * 4 and label[3].tolist() == [3] * 4


def test_bad_prompts_are_one_line_each_and_nothing_is_written(coco_set, tmp_path, capsys):
    boxes = tmp_path / "boxes.txt"
    boxes.write_text("synthetic00000.png 1 2 30 40\nnope.png 1 2 3 4\nsynthetic00001.png 5 5 1 1\n# fine\n")
    code = main(["predict", "--checkpoint", str(tmp_path / "missing.pt"), "--images", str(coco_set / "images"),
                 "--boxes", str(boxes), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "boxes.txt:2: nope.png not in" in err and "boxes.txt:3: expected 'file x0 y0 x1 y1" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("a user's file")
    with pytest.raises(P.PredictError, match="used: exists and is not empty"):
        P.predict(None, [], tmp_path / "used")
    boxes.write_text("synthetic00001.png,1,2,30,40,7\n")
    ok = P.prompts_from_boxes_file(boxes, coco_set / "images")
    assert ok[0].category_ids == [7] and ok[0].boxes.tolist() == [[1, 2, 30, 40]]


def test_cli_predicts_with_a_registered_model_from_the_store_and_the_local_runs_store(
        random_vit_t, coco_set, store, s3_env, tmp_path, capsys, monkeypatch):
    reg = ObjectStoreRegistry(store)
    reg.register("sam-test", random_vit_t[0], {"model": {"model_type": "vit_t"}})
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(sorted((coco_set / "images").iterdir())[1], one)
    boxes = tmp_path / "boxes.txt"
    boxes.write_text(f"{next(one.iterdir()).name} 5 5 40 40\n")
    args = ["predict", "--images", str(one), "--boxes", str(boxes), "--no-progress", "-g", "cpu",
            "--bucket", store.config.bucket, "--prefix", store.config.prefix]
    assert main([*args, "--model", "sam-test", "--output", str(tmp_path / "a")]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "sam-test:v1"
    assert main([*args, "--model", "sam-test:v7", "--output", str(tmp_path / "b")]) == 1
    assert "model 'sam-test' has no version 'v7' (it has: v1)" in capsys.readouterr().err
    # The store the local runs of a folder keep (`sam-pipeline run`), read with no store given.
    from components.storage import ObjectStore
    from pipelines.local_store import shared_store

    with shared_store(tmp_path / "runs", bucket="mlpipeline", prefix="sam-pipeline/") as cfg:
        ObjectStoreRegistry(ObjectStore(cfg)).register("sam-test", random_vit_t[0], {"model": {"model_type": "vit_t"}})
    s3_env_free = [a for a in args if a not in ("--bucket", "--prefix", store.config.bucket, store.config.prefix)]
    monkeypatch.delenv("S3_ENDPOINT")
    assert main([*s3_env_free, "--model", "sam-test", "--pipeline-root", str(tmp_path / "runs"),
                 "--output", str(tmp_path / "c")]) == 0
    assert np.array_equal(np.asarray(Image.open(next((tmp_path / "a" / "masks").iterdir()))),
                          np.asarray(Image.open(next((tmp_path / "c" / "masks").iterdir()))))
    assert torch.cuda.is_available() or "on cpu" in capsys.readouterr().err


def test_a_malformed_coco_prompt_file_lists_every_problem(coco_set, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"file_name": "synthetic00000.png"}, {"id": 2, "file_name": "gone.png"},
                                          {"id": 3, "file_name": "synthetic00001.png"}],
                               "annotations": [7, {"id": 5, "image_id": 3, "bbox": [1, 1, 3]}]}))
    with pytest.raises(P.PredictError) as err:
        P.prompts_from_coco(bad, coco_set / "images")
    assert [p.split(": ", 1)[1] for p in err.value.problems] == [
        "image {'file_name': 'synthetic00000.png'} has no integer 'id'", f"image id 2: gone.png not in {coco_set / 'images'}",
        "annotation 7 is not an object", "annotation 5: no bbox [x, y, width, height]"]
    bad.write_text("[1, 2]")
    with pytest.raises(P.PredictError, match="not a COCO file"):
        P.prompts_from_coco(bad, coco_set / "images")
