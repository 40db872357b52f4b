"""What the values of an instance-id mask mean, in every layout and every step.

0 is background, 1..254 are instances, 255 marks a region to ignore: COCO's crowd annotations (and
Pascal VOC's "void"). An ignored pixel is neither object nor background, so it is left out of the
training targets and the loss (trainer.prepare_items), of Dice/IoU (metrics.dice_iou) and of COCO AP
(as a crowd region). Masks are 8-bit, so an image holds at most 254 instances.
Light (numpy only): the ingest image imports it.
"""
from __future__ import annotations

import numpy as np

BACKGROUND = 0
IGNORE = 255
MAX_INSTANCES = 254


def instance_ids(label_mask) -> np.ndarray:
    """The instance ids present in an instance-id mask, ascending (background and ignore left out)."""
    values = np.unique(np.asarray(label_mask))
    return values[(values != BACKGROUND) & (values != IGNORE)]
