"""Crowd regions (label_values.IGNORE = 255) are neither object nor background: out of the instances,
the training targets, the loss and Dice/IoU."""
from __future__ import annotations

import numpy as np
import torch

from components.datasets.reader import Sample
from components.label_values import IGNORE
from components.sam.losses import sam_loss
from components.sam.metrics import dice_iou
from components.sam.prompts import instance_masks
from components.training.trainer import prepare_items


def crowd_mask() -> np.ndarray:
    mask = np.zeros((32, 48), np.uint8)
    mask[4:14, 4:20] = 1
    mask[18:28, 6:16] = 2
    mask[:, 30:] = IGNORE
    return mask


def test_instance_masks_leave_out_the_ignore_value():
    ids, masks = instance_masks(crowd_mask())
    assert ids.tolist() == [1, 2] and masks.shape == (2, 32, 48)


def test_dice_iou_does_not_count_predictions_in_ignored_pixels():
    mask = crowd_mask()
    gt = mask[None] == 1
    spill = gt.copy()
    spill[0, :, 30:] = True  # the prediction spills over the whole crowd region
    assert dice_iou(spill, gt)[0].item() < 0.6
    dice, iou = dice_iou(spill, gt, mask == IGNORE)
    assert dice.item() == 1.0 and iou.item() == 1.0
    spill[0, 0, 0] = True  # a false positive outside the crowd still counts
    assert dice_iou(spill, gt, mask == IGNORE)[0].item() < 1.0


def test_training_targets_and_loss_leave_crowd_regions_out():
    mask = crowd_mask()
    sample = Sample("s", np.zeros((32, 48, 3), np.uint8), mask, "0" * 64)
    item, = prepare_items([sample], [torch.zeros(256, 64, 64)])
    assert len(item.boxes) == 2 and item.ignore is not None and item.ignore.sum() == 32 * 18
    plain, = prepare_items([Sample("p", sample.image, np.where(mask == IGNORE, 0, mask), "1" * 64)],
                           [torch.zeros(256, 64, 64)])
    # The crowd columns (x >= 30 of 48, i.e. low-res x >= 160 of the 256 frame's 0..255) are not valid.
    assert plain.valid[:, 170].any() and not item.valid[:, 170].any()
    assert item.valid.sum() < plain.valid.sum() and not item.target_low[:, ~item.valid].any()
    # Logits saying "object" all over the crowd region cost nothing; over true background they do.
    logits = torch.where(item.target_low > 0.5, 10.0, -10.0)
    crowd_on = logits.clone()
    crowd_on[:, :, 170:200] = 10.0
    iou = torch.ones(2)
    assert torch.allclose(sam_loss(crowd_on, iou, item.target_low, item.valid),
                          sam_loss(logits, iou, item.target_low, item.valid))
    assert (sam_loss(crowd_on, iou, plain.target_low, plain.valid)
            > sam_loss(logits, iou, plain.target_low, plain.valid) + 0.05).all()
