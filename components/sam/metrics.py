"""Per-instance Dice and IoU at the original image resolution (higher is better)."""
from __future__ import annotations

import numpy as np
import torch


def dice_iou(pred, gt, ignore=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) binary prediction and ground truth -> ((N,) Dice, (N,) IoU) as float64.

    An object with both masks empty scores 1.0 (nothing to find, nothing found). `ignore` (H, W): pixels
    that count neither way (crowd regions, label_values.IGNORE): a prediction spilling there is no error.
    """
    pred = torch.as_tensor(pred).bool()
    if ignore is not None:
        pred = pred & ~torch.as_tensor(np.asarray(ignore)).bool()
    pred = pred.flatten(1)
    gt = torch.as_tensor(gt).bool().flatten(1)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape")
    inter = (pred & gt).sum(1).double()
    total = pred.sum(1).double() + gt.sum(1).double()
    union = total - inter
    empty = total == 0
    dice = torch.where(empty, torch.ones_like(total), 2 * inter / total.clamp(min=1))
    iou = torch.where(empty, torch.ones_like(total), inter / union.clamp(min=1))
    return dice, iou


def summarize(values) -> dict:
    """Mean, median and count of per-instance scores (a list/array/tensor); NaN mean when empty."""
    arr = np.asarray(torch.as_tensor(values).cpu(), dtype=np.float64).ravel()
    if arr.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "n": 0}
    return {"mean": float(arr.mean()), "median": float(np.median(arr)), "n": int(arr.size)}
