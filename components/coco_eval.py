"""COCO mask AP, by pycocotools' own evaluator, so a result can be set beside published numbers.

Ground truth comes as instance-id masks (the pipeline's format) with their ignore regions, which become
COCO crowd annotations: a prediction over a crowd region is neither a hit nor a false positive, exactly
as COCO scores crowds. Every instance is one category ("object"): SAM segments what it is prompted
with, it does not classify.
"""
from __future__ import annotations

import contextlib
import io
from typing import Iterable, Sequence

import numpy as np

from components.datasets.coco import encode_rle
from components.label_values import IGNORE, instance_ids

# pycocotools' summary order (COCOeval.summarize, segm): the ones worth a metric name.
STATS = {"mask_ap": 0, "mask_ap50": 1, "mask_ap75": 2, "mask_ap_small": 3, "mask_ap_medium": 4,
         "mask_ap_large": 5, "mask_ar100": 8}


def _box(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    if not len(xs):
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def ground_truth(images: Iterable[tuple[int, np.ndarray, np.ndarray | None]]) -> dict:
    """(image_id, HxW instance-id mask, HxW ignore mask or None) -> a COCO ground-truth dataset dict."""
    doc = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "object"}]}
    for image_id, label, ignore in images:
        label = np.asarray(label)
        h, w = label.shape
        doc["images"].append({"id": int(image_id), "width": int(w), "height": int(h)})
        ignore = (label == IGNORE) if ignore is None else np.asarray(ignore, dtype=bool)
        regions = [(label == k, 0) for k in instance_ids(label)] + ([(ignore, 1)] if ignore.any() else [])
        for m, crowd in regions:
            doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": int(image_id),
                                       "category_id": 1, "iscrowd": crowd, "area": float(m.sum()),
                                       "bbox": _box(m), "segmentation": encode_rle(m)})
    return doc


def results(predictions: Iterable[tuple[int, np.ndarray, Sequence[float]]]) -> list[dict]:
    """(image_id, (K, H, W) bool masks, (K,) scores) -> COCO results entries."""
    out = []
    for image_id, masks, scores in predictions:
        for m, s in zip(np.asarray(masks, dtype=bool), scores):
            out.append({"image_id": int(image_id), "category_id": 1, "segmentation": encode_rle(m),
                        "bbox": _box(m), "score": float(s)})
    return out


def coco_mask_ap(images: Sequence[tuple[int, np.ndarray, np.ndarray | None]],
                 predictions: Sequence[tuple[int, np.ndarray, Sequence[float]]]) -> dict[str, float]:
    """COCO mask AP (0.5:0.95), AP50, AP75, AP by size and AR@100 of `predictions` against `images`
    (see ground_truth). pycocotools' -1 ("no ground truth of this kind") is kept as -1."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = ground_truth(images)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and its summary table
        gt.createIndex()
        dets = results(predictions)
        if not dets or not gt.dataset["annotations"]:
            return {k: (0.0 if gt.dataset["annotations"] else -1.0) for k in STATS}
        ev = COCOeval(gt, gt.loadRes(dets), iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(ev.stats[i]) for k, i in STATS.items()}


def box_prompted_ap(model, embeddings: Iterable, samples: Iterable) -> dict[str, float]:
    """COCO mask AP of `model` prompted with every ground-truth instance's tight box (score = predicted
    IoU), on samples with their embeddings: the evaluation's box prompts, in the field's metric."""
    from components.predict import decode_boxes
    from components.sam.prompts import instance_masks, masks_to_boxes
    from components.sam.transforms import Frame

    images, predictions = [], []
    for image_id, (sample, emb) in enumerate(zip(samples, embeddings), 1):
        label = np.asarray(sample.mask)
        ids, gt = instance_masks(label)
        images.append((image_id, label, None))
        if len(ids):
            masks, scores = decode_boxes(model, emb, Frame.for_size(*label.shape), masks_to_boxes(gt))
            predictions.append((image_id, masks, scores))
    return coco_mask_ap(images, predictions)
