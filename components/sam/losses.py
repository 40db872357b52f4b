"""Training loss per object: soft Dice on the mask plus MSE between predicted and actual IoU."""
from __future__ import annotations

import torch


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """(N, H, W) logits and soft targets in [0, 1] -> (N,) 1 - soft Dice, computed in float32.

    `eps` smooths tiny objects so a one-pixel miss does not dominate the batch.
    """
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    inter = (p * t).sum(1)
    return 1.0 - (2.0 * inter + eps) / (p.sum(1) + t.sum(1) + eps)


def actual_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) IoU of the thresholded prediction (logit > 0) with the target (> 0.5); no gradient.

    Both empty counts as a perfect 1.0, matching metrics.dice_iou.
    """
    with torch.no_grad():
        p = (logits > 0).flatten(1)
        t = (target > 0.5).flatten(1)
        inter = (p & t).sum(1).float()
        union = (p | t).sum(1).float()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def sam_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, H, W) logits, (N,) predicted IoU, (N, H, W) targets -> (N,) per-object loss."""
    iou = actual_iou(logits, target)
    return dice_loss(logits, target) + (iou_pred.float() - iou) ** 2
