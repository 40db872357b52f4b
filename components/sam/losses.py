"""Training loss per object: soft Dice on the mask plus MSE between predicted and actual IoU.

All functions take a `valid` mask of the low-res frame: SAM's logits cover the padded 256x256 square,
but only the part that maps back onto the image counts (the rest is cropped by postprocessing), so
padding never enters a loss. Using a mask instead of cropping lets images of different sizes share
one batched loss.
"""
from __future__ import annotations

import torch

from components.sam.prompt_batch import MULTIMASK


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
              eps: float = 1.0) -> torch.Tensor:
    """(N, [C,] H, W) logits, soft targets in [0, 1] (zero outside `valid`) -> (N, [C]) 1 - soft Dice,
    computed in float32. `eps` smooths tiny objects so a one-pixel miss does not dominate the batch."""
    p = torch.sigmoid(logits.float())
    if valid is not None:
        p = p * valid
    p, t = p.flatten(-2), target.float().flatten(-2)
    inter = (p * t).sum(-1)
    return 1.0 - (2.0 * inter + eps) / (p.sum(-1) + t.sum(-1) + eps)


def actual_iou(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(N, [C,] H, W) -> (N, [C]) IoU of the thresholded prediction (logit > 0) with the target (> 0.5);
    no gradient. Both empty counts as a perfect 1.0, matching metrics.dice_iou."""
    with torch.no_grad():
        p = logits > 0
        if valid is not None:
            p = p & valid
        p, t = p.flatten(-2), (target > 0.5).flatten(-2)
        inter = (p & t).sum(-1).float()
        union = (p | t).sum(-1).float()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def sam_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor,
             valid: torch.Tensor | None = None) -> torch.Tensor:
    """(N, H, W) logits, (N,) predicted IoU, (N, H, W) targets -> (N,) per-object loss."""
    return dice_loss(logits, target, valid) + (iou_pred.float() - actual_iou(logits, target, valid)) ** 2


def multi_output_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                      ambiguous: torch.Tensor) -> torch.Tensor:
    """All four outputs (N, 4, H, W), (N, 4) against (N, H, W) targets -> (N,) loss.

    Unambiguous prompts: Dice + IoU-MSE of output 0. A single point (ambiguous): the Dice loss of the
    best of outputs 1-3 (SAM's recipe: only the mask closest to the truth is pushed, so the three heads
    keep their whole/part/subpart roles) plus the IoU-MSE averaged over all three, so the IoU head can
    rank them at inference."""
    dice = dice_loss(logits, target.unsqueeze(1), valid.unsqueeze(1))
    mse = (iou_pred.float() - actual_iou(logits, target.unsqueeze(1), valid.unsqueeze(1))) ** 2
    single = dice[:, 0] + mse[:, 0]
    multi = dice[:, MULTIMASK].amin(dim=1) + mse[:, MULTIMASK].mean(dim=1)
    return torch.where(ambiguous, multi, single)
