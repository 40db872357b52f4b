"""Prompts from ground truth: boxes, points inside objects, and corrective clicks.

Coordinates are (x, y) pixel indices of whatever frame the masks are in; boxes are XYXY with
inclusive max (SAM's convention in `batched_mask_to_box`). Randomness only comes from the
`np.random.Generator` passed in, so a training run is reproducible and resumable.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from components.label_values import instance_ids


def instance_masks(label_mask: np.ndarray, ids=None) -> tuple[np.ndarray, np.ndarray]:
    """HxW instance-id mask (0 = background, 255 = ignore) -> (ids, N x H x W bool masks), ids ascending."""
    if label_mask.ndim != 2:
        raise ValueError(f"expected an HxW instance mask, got shape {label_mask.shape}")
    if ids is None:
        ids = instance_ids(label_mask)
    ids = np.asarray(ids)
    return ids, label_mask[None, :, :] == ids[:, None, None]


def masks_to_boxes(masks) -> np.ndarray:
    """(N, H, W) bool -> (N, 4) float XYXY, inclusive max; an empty mask gives an error."""
    masks = masks.cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    if masks.shape[0] and not rows.any(axis=1).all():
        empty = np.flatnonzero(~rows.any(axis=1)).tolist()
        raise ValueError(f"cannot make a box for empty masks at positions {empty}")
    boxes = np.zeros((masks.shape[0], 4), dtype=np.float64)
    for i in range(masks.shape[0]):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        boxes[i] = (xs[0], ys[0], xs[-1], ys[-1])
    return boxes


def jitter_boxes(boxes: np.ndarray, rng: np.random.Generator, image_size: tuple[int, int],
                 fraction: float = 0.05) -> np.ndarray:
    """Move each edge by up to `fraction` of the box's width/height, either way, clipped to the image.

    Users draw boxes loosely; a model trained only on tight boxes degrades on them. Symmetric, unlike
    micro-sam's grow-only jitter (factor 0.025): validation and the evaluation gate prompt with the
    tight box, and symmetric jitter is centred on it, while grow-only shifts every training box away
    from it. Measured on test_it_learns' run (random encoder, box prompts, 24 iterations, one run
    each): best validation Dice 0.23 with grow-only jitter at 0.05 and at 0.025 (the test fails), 0.31
    without jitter; with this one the test passes (it needs +0.15 over the untrained 0.11).
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    if fraction <= 0 or len(boxes) == 0:
        return boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    scale = np.stack([w, h, w, h], axis=1) * fraction
    out = boxes + rng.uniform(-1.0, 1.0, size=boxes.shape) * scale
    H, W = image_size
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, W - 1)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, H - 1)
    # A jitter must never invert a box.
    out[:, 2] = np.maximum(out[:, 2], out[:, 0])
    out[:, 3] = np.maximum(out[:, 3], out[:, 1])
    return out


def sample_points(flat_indices: list[np.ndarray], width: int, rng: np.random.Generator,
                  n: int = 1) -> np.ndarray:
    """n points drawn uniformly inside each object, given its np.flatnonzero indices -> (N, n, 2) x/y."""
    out = np.zeros((len(flat_indices), n, 2), dtype=np.float64)
    for i, idx in enumerate(flat_indices):
        if len(idx) == 0:
            raise ValueError(f"cannot sample a point inside empty object {i}")
        pick = idx[rng.integers(0, len(idx), size=n)]
        out[i, :, 0] = pick % width
        out[i, :, 1] = pick // width
    return out


def connected_components(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, H, W) long labels, 0 = background, 8-connectivity.

    Label propagation with max-pooling plus pointer jumping (each pixel also takes the label of the
    pixel its label names), which converges in a few dozen steps even for long snakes; no scipy/cv2.
    """
    n, h, w = masks.shape
    if n == 0 or h * w == 0:
        return torch.zeros(masks.shape, dtype=torch.long, device=masks.device)
    if h * w >= 2**24:
        raise ValueError(f"mask of {h}x{w} is too large for float32 labels")
    fg = masks.to(torch.float32)
    idx = torch.arange(1, h * w + 1, dtype=torch.float32, device=masks.device).view(1, h, w)
    lab = fg * idx
    flat_fg = fg.view(n, -1)
    while True:
        new = F.max_pool2d(lab.unsqueeze(1), 3, stride=1, padding=1).squeeze(1) * fg
        flat = new.view(n, -1)
        jumped = flat.gather(1, (flat.long() - 1).clamp_(min=0)) * flat_fg
        new = torch.maximum(flat, jumped).view(n, h, w)
        if torch.equal(new, lab):
            return lab.long()
        lab = new


def largest_component(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> the largest 8-connected region of each mask (empty stays empty)."""
    labels = connected_components(masks)
    out = torch.zeros_like(masks, dtype=torch.bool)
    for i in range(masks.shape[0]):
        lab = labels[i][labels[i] > 0]
        if lab.numel() == 0:
            continue
        values, counts = torch.unique(lab, return_counts=True)
        out[i] = labels[i] == values[counts.argmax()]
    return out


def deepest_points(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) bool -> ((N, 2) long x/y of the pixel farthest from the region's border, (N,) valid).

    Depth is the number of 3x3 erosions a pixel survives (a chessboard distance transform), with the
    image border counting as background so a click never lands on the edge of the frame. The erosions run
    on each mask's bounding box with a one-pixel margin (all of a mask's depth is decided there: everything
    outside it is background), in one window as large as the largest box: a full-size Penn-Fudan person
    otherwise cost tens of whole-frame erosions (evaluate's point prompts spent 65 % of their time here).
    """
    n, h, w = masks.shape
    valid = masks.reshape(n, -1).any(dim=1)
    if n == 0 or not bool(valid.any()):
        return torch.zeros((n, 2), dtype=torch.long, device=masks.device), valid
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (N, H), (N, W)
    y0, x0 = rows.to(torch.uint8).argmax(dim=1), cols.to(torch.uint8).argmax(dim=1)
    y1 = h - 1 - rows.flip(1).to(torch.uint8).argmax(dim=1)
    x1 = w - 1 - cols.flip(1).to(torch.uint8).argmax(dim=1)
    # The largest box and its margin; an empty mask has no box (its argmaxes span the frame) and stays all zeros.
    wh, ww = int((y1 - y0)[valid].max()) + 3, int((x1 - x0)[valid].max()) + 3
    # In the zero-padded frame, row y0 is the margin above the box; indices past the frame land on padding.
    padded = F.pad(masks.to(torch.float32), (1, 1, 1, 1), value=0.0)
    ri = (y0[:, None] + torch.arange(wh, device=masks.device)).clamp_(max=h + 1)
    ci = (x0[:, None] + torch.arange(ww, device=masks.device)).clamp_(max=w + 1)
    cur = padded[torch.arange(n, device=masks.device)[:, None, None], ri[:, :, None], ci[:, None, :]]
    depth = torch.zeros_like(cur)
    while cur.any():
        depth += cur
        cur = (-F.max_pool2d(-F.pad(cur, (1, 1, 1, 1), value=0.0).unsqueeze(1), 3, stride=1)).squeeze(1)
    # The first maximum in row-major order, as over the whole frame: a box keeps its pixels' order.
    flat = depth.view(n, -1).argmax(dim=1)
    coords = torch.stack([flat % ww + x0 - 1, flat // ww + y0 - 1], dim=1)
    return torch.where(valid[:, None], coords, torch.zeros_like(coords)), valid


def corrective_clicks(pred: torch.Tensor, gt: torch.Tensor, *, by_area: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One positive click in the missed region (false negatives) and one negative click in the false
    region (false positives) of each object, each at the pixel deepest inside its region.

    By default the click goes to the deepest pixel of the whole error mask, i.e. into the error region
    with the largest inscribed square (RITM's click simulation): one erosion loop, a few ms. With
    `by_area=True` it goes into the connected region with the most pixels, which needs connected
    components and costs 0.1-0.5 s per call on two cores for the fragmented errors of an untrained
    decoder; both agree whenever the biggest region is also the thickest.

    pred, gt: (N, H, W) bool. Returns coords (N, 2, 2) float x/y and labels (N, 2) long: column 0 is
    the positive click (label 1), column 1 the negative (label 0); -1 where there is nothing to fix,
    which SAM's prompt encoder reads as "not a point".
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(gt.shape)} differ in shape")
    pred, gt = pred.bool(), gt.bool()
    n = pred.shape[0]
    regions = torch.cat([gt & ~pred, pred & ~gt], dim=0)
    if by_area:
        regions = largest_component(regions)
    xy, valid = deepest_points(regions)
    coords = torch.stack([xy[:n], xy[n:]], dim=1).to(torch.float32)
    labels = torch.stack([torch.ones(n, dtype=torch.long, device=pred.device),
                          torch.zeros(n, dtype=torch.long, device=pred.device)], dim=1)
    labels = torch.where(torch.stack([valid[:n], valid[n:]], dim=1), labels, torch.full_like(labels, -1))
    coords = coords * (labels >= 0).unsqueeze(-1)
    return coords, labels
