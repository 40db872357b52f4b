"""COCO mask AP through pycocotools' evaluator, on masks whose IoU with the truth is known by construction."""
from __future__ import annotations

import numpy as np
import pytest

from components.coco_eval import coco_mask_ap
from components.label_values import IGNORE


def truth() -> np.ndarray:
    label = np.zeros((40, 60), np.uint8)
    label[2:12, 2:12] = 1  # 100 pixels
    label[20:30, 30:40] = 2
    return label


def test_perfect_masks_score_ap_1():
    label = truth()
    ap = coco_mask_ap([(7, label, None)], [(7, np.stack([label == 1, label == 2]), [0.9, 0.8])])
    assert ap["mask_ap"] == pytest.approx(1.0) and ap["mask_ar100"] == pytest.approx(1.0)


def test_ap_follows_the_iou_thresholds():
    label = truth()
    partial = np.zeros_like(label, bool)
    partial[2:10, 2:10] = True  # 64 of instance 1's 100 pixels: IoU 0.64, a hit at 0.50, 0.55 and 0.60 only
    ap = coco_mask_ap([(1, label, None)], [(1, np.stack([partial, label == 2]), [0.9, 0.9])])
    assert ap["mask_ap50"] == pytest.approx(1.0) and ap["mask_ap75"] < 0.6
    # Instance 2 is found at every threshold, instance 1 at 3 of 10: AP is the mean over thresholds.
    single = coco_mask_ap([(1, label == 1, None)], [(1, partial[None], [0.9])])
    assert single["mask_ap"] == pytest.approx(0.3, abs=1e-6)


def test_a_false_positive_costs_ap_but_not_over_a_crowd_region():
    label = truth()
    label[32:40, 0:20] = IGNORE
    hits = [label == 1, label == 2]
    on_crowd, on_background = np.zeros_like(label, bool), np.zeros_like(label, bool)
    on_crowd[33:39, 2:18] = True
    on_background[0:8, 40:58] = True
    base = coco_mask_ap([(1, label, None)], [(1, np.stack(hits), [0.5, 0.5])])["mask_ap"]
    crowd = coco_mask_ap([(1, label, None)], [(1, np.stack([on_crowd, *hits]), [0.9, 0.5, 0.5])])["mask_ap"]
    fp = coco_mask_ap([(1, label, None)], [(1, np.stack([on_background, *hits]), [0.9, 0.5, 0.5])])["mask_ap"]
    assert base == pytest.approx(1.0) and crowd == pytest.approx(base) and fp < base - 0.2


def test_nothing_predicted_and_nothing_to_find():
    assert coco_mask_ap([(1, truth(), None)], [])["mask_ap"] == 0.0
    assert coco_mask_ap([(1, np.zeros((5, 5), np.uint8), None)], [])["mask_ap"] == -1.0


def test_evaluation_reports_the_coco_mask_ap_of_its_box_prompts(random_vit_t):
    import torch

    from components.datasets.synthetic import make_samples
    from components.sam.embeddings import compute_embeddings
    from components.sam.model import build_sam

    model = build_sam("vit_t", random_vit_t[0])
    samples = make_samples(2, seed=3, size=(48, 48))
    with torch.no_grad():
        embs = compute_embeddings(model, [s.image for s in samples])
    from components.evaluate import score_model
    from components.training.data import Scored

    ap = score_model(model, [Scored(s, e) for s, e in zip(samples, embs)])["coco"]  # evaluation's box prompts, in the field's metric
    assert 0.0 <= ap["mask_ap"] <= ap["mask_ap50"] <= 1.0
