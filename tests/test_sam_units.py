"""SAM building blocks against hand-computed cases and against the official implementation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from components.sam.losses import actual_iou, dice_loss, sam_loss
from components.sam.metrics import dice_iou, summarize
from components.sam.prompts import (connected_components, corrective_clicks, deepest_points, instance_masks,
                                    jitter_boxes, largest_component, masks_to_boxes, sample_points)
from components.sam.transforms import Frame, masks_to_low_res, postprocess_masks, preprocess_image


# -- transforms ----------------------------------------------------------------------------------

def test_300x500_image_maps_to_1024_and_back():
    f = Frame.for_size(300, 500)
    assert f.input_size == (614, 1024)  # 300 * 1024/500 = 614.4
    assert f.low_res_valid_size == (154, 256)  # 614 / 4 = 153.5 low-res rows, the last one partly
    pts = np.array([[250.0, 150.0], [0.0, 0.0], [499.0, 299.0]])
    mapped = f.coords_to_input(pts)
    np.testing.assert_allclose(mapped[0], [512.0, 307.0])
    np.testing.assert_allclose(mapped[2], [499 * 1024 / 500, 299 * 614 / 300])
    np.testing.assert_allclose(f.coords_to_original(mapped), pts)
    box = np.array([[100.0, 50.0, 200.0, 150.0]])
    np.testing.assert_allclose(f.boxes_to_input(box), [[204.8, 50 * 614 / 300, 409.6, 150 * 614 / 300]])
    np.testing.assert_allclose(f.boxes_to_original(f.boxes_to_input(torch.tensor(box))).numpy(), box)


def test_preprocess_matches_segment_anything():
    from segment_anything.utils.transforms import ResizeLongestSide

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    ours, frame = preprocess_image(img)
    resized = ResizeLongestSide(1024).apply_image(img)
    x = torch.as_tensor(resized).permute(2, 0, 1).float()
    mean = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
    ref = torch.nn.functional.pad((x - mean) / std, (0, 1024 - x.shape[2], 0, 1024 - x.shape[1]))
    assert ours.shape == (3, 1024, 1024) and frame.input_size == tuple(resized.shape[:2])
    torch.testing.assert_close(ours, ref)
    assert ours[:, 614:, :].abs().sum() == 0  # padding


def test_preprocess_rejects_non_rgb():
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        preprocess_image(np.zeros((10, 10), dtype=np.uint8))


def test_postprocess_masks_goes_back_to_original_size():
    f = Frame.for_size(300, 500)
    low = torch.full((1, 1, 256, 256), -10.0)
    low[..., :77, :128] = 10.0  # top-left half of the unpadded 154x256 region
    out = postprocess_masks(low, f)
    assert out.shape == (1, 1, 300, 500)
    m = out[0, 0] > 0
    assert m[:148, :248].all() and not m[152:, :].any() and not m[:, 252:].any()


def test_masks_to_low_res_uses_the_same_frame():
    f = Frame.for_size(300, 500)
    mask = torch.zeros(1, 300, 500, dtype=torch.bool)
    mask[0, :150, :250] = True
    low, valid = masks_to_low_res(mask, f)
    assert low.shape == (1, 256, 256) and valid.shape == (256, 256)
    assert valid[:154, :].all() and not valid[154:, :].any()
    assert (low[0, :76, :127] > 0.99).all() and (low[0, 78:, :] < 0.01).all() and (low[0, :, 129:] < 0.01).all()
    with pytest.raises(ValueError, match="does not match image size"):
        masks_to_low_res(torch.zeros(1, 10, 10), f)


def _pedestrians(rng, h, w, n):
    """Penn-Fudan-like instances: upright people (a head ellipse on a torso-and-legs trapezoid)."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        ph = rng.uniform(0.35, 0.9) * h
        pw = min(rng.uniform(0.25, 0.45) * ph, 0.6 * w)
        top, cx = rng.uniform(0, h - ph), rng.uniform(pw / 2, w - pw / 2)
        head = ((yy - top - ph * 0.08) / (ph * 0.08)) ** 2 + ((xx - cx) / (pw * 0.22)) ** 2 <= 1
        rel = (yy - top - ph * 0.16) / (ph * 0.84)
        body = (rel >= 0) & (rel <= 1) & (np.abs(xx - cx) <= pw / 2 * (1 - 0.4 * rel))
        legs = (rel > 0.55) & (np.abs(xx - cx) < pw * 0.06)  # the gap between the legs
        out.append(head | (body & ~legs))
    return torch.from_numpy(np.stack(out))


def test_low_res_targets_round_trip_through_sams_postprocessing():
    """Targets land exactly where predictions are read back: a target used as logits (t - 0.5) and
    postprocessed like a prediction gives back the mask (issue 9: the old round(H*256/max) frame gave
    mean IoU 0.9917, worst 0.935 on Penn-Fudan)."""
    rng = np.random.default_rng(0)
    sizes = [(rng.integers(280, 560), rng.integers(250, 700)) for _ in range(10)] + \
        [(97, 523), (511, 83), (333, 1001), (1001, 333), (257, 255)]  # odd aspect ratios
    ious = []
    for h, w in sizes:
        frame = Frame.for_size(int(h), int(w))
        masks = _pedestrians(rng, int(h), int(w), 3)
        target, valid = masks_to_low_res(masks, frame)
        assert not (target[:, ~valid] > 0).any()  # nothing in the padding
        back = postprocess_masks((target - 0.5).unsqueeze(1), frame)[:, 0] > 0
        ious.append(dice_iou(back, masks)[1])
    ious = torch.cat(ious)
    assert ious.mean() >= 0.995 and ious.min() >= 0.97, (float(ious.mean()), float(ious.min()))


# -- prompts -------------------------------------------------------------------------------------

def test_box_of_a_known_mask():
    m = np.zeros((50, 60), dtype=bool)
    m[10:20, 20:40] = True
    np.testing.assert_array_equal(masks_to_boxes(m[None]), [[20, 10, 39, 19]])
    with pytest.raises(ValueError, match="empty masks at positions \\[1\\]"):
        masks_to_boxes(np.stack([m, np.zeros_like(m)]))


def test_instance_masks_splits_ids():
    lab = np.zeros((4, 4), dtype=np.uint8)
    lab[0, 0], lab[3, 3] = 1, 2
    ids, masks = instance_masks(lab)
    assert ids.tolist() == [1, 2] and masks.shape == (2, 4, 4) and masks[1, 3, 3] and not masks[0, 3, 3]


def test_jitter_is_bounded_seeded_and_clipped():
    boxes = np.array([[20.0, 10.0, 39.0, 19.0], [0.0, 0.0, 99.0, 49.0]])
    a = jitter_boxes(boxes, np.random.default_rng(3), (50, 100), fraction=0.1)
    b = jitter_boxes(boxes, np.random.default_rng(3), (50, 100), fraction=0.1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, boxes)
    assert np.all(np.abs(a[0] - boxes[0]) <= [2.0, 1.0, 2.0, 1.0])  # 10% of 20 wide, 10 tall
    # Symmetric: centred on the tight box that validation and evaluation prompt with.
    many = jitter_boxes(np.repeat(boxes[:1], 400, 0), np.random.default_rng(4), (50, 100), fraction=0.1)
    assert np.abs((many - boxes[0]).mean(axis=0)).max() < 0.15
    assert a[1, 0] >= 0 and a[1, 1] >= 0 and a[1, 2] <= 99 and a[1, 3] <= 49


def test_points_are_inside_their_object():
    m = np.zeros((30, 40), dtype=bool)
    m[5:9, 30:33] = True
    pts = sample_points([np.flatnonzero(m)], 40, np.random.default_rng(0), n=50)
    assert pts.shape == (1, 50, 2)
    assert m[pts[0, :, 1].astype(int), pts[0, :, 0].astype(int)].all()
    with pytest.raises(ValueError, match="empty object 0"):
        sample_points([np.array([], dtype=np.int64)], 40, np.random.default_rng(0))


def test_connected_components_handles_snakes_and_diagonals():
    m = torch.zeros(1, 40, 40, dtype=torch.bool)
    for r in range(0, 40, 4):  # a serpentine: one component with a long path
        m[0, r, :] = True
        if r + 4 < 40:
            col = 39 if (r // 4) % 2 == 0 else 0
            m[0, r:r + 4, col] = True
    lab = connected_components(m)
    assert len(torch.unique(lab[lab > 0])) == 1
    two = torch.zeros(1, 10, 10, dtype=torch.bool)
    two[0, 1:3, 1:3] = True
    two[0, 6:9, 6:9] = True
    two[0, 3, 3] = True  # diagonal neighbour of the first blob: 8-connected to it
    lab = connected_components(two)
    assert len(torch.unique(lab[lab > 0])) == 2 and lab[0, 3, 3] == lab[0, 1, 1]
    big = largest_component(two)
    assert big[0, 7, 7] and not big[0, 1, 1]


def test_deepest_point_of_a_rectangle():
    m = torch.zeros(1, 40, 40, dtype=torch.bool)
    m[0, 10:30, 20:30] = True  # 20 tall, 10 wide: depth 5 at cols 24-25, rows 14-25
    xy, valid = deepest_points(m)
    assert xy.tolist() == [[24, 14]] and valid.tolist() == [True]
    xy, valid = deepest_points(torch.zeros(1, 5, 5, dtype=torch.bool))
    assert valid.tolist() == [False]


def _deepest_over_the_whole_frame(masks):
    """The definition, unoptimised: erode the whole frame (its border is background) until nothing is left."""
    import torch.nn.functional as F

    n, h, w = masks.shape
    depth, cur = torch.zeros((n, h, w)), masks.float()
    while cur.any():
        depth += cur
        cur = (-F.max_pool2d(-F.pad(cur, (1, 1, 1, 1)).unsqueeze(1), 3, stride=1)).squeeze(1)
    flat = depth.view(n, -1).argmax(dim=1)
    return torch.stack([flat % w, flat // w], dim=1)


@pytest.mark.parametrize("seed", range(40))
def test_deepest_points_in_bounding_boxes_equal_the_whole_frame(seed):
    """Boxes of any size and place (touching the frame's edges, one pixel, several blobs, empty masks among
    them): the same pixel, first maximum included, as eroding the whole frame."""
    g = torch.Generator().manual_seed(seed)
    n, h, w = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 50, (1,), generator=g)), \
        int(torch.randint(1, 50, (1,), generator=g))
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        for _ in range(int(torch.randint(0, 4, (1,), generator=g))):  # 0-3 rectangles, maybe overlapping
            y, x = int(torch.randint(0, h, (1,), generator=g)), int(torch.randint(0, w, (1,), generator=g))
            dy, dx = int(torch.randint(1, h + 1, (1,), generator=g)), int(torch.randint(1, w + 1, (1,), generator=g))
            masks[i, y:y + dy, x:x + dx] = True
        if seed % 3 == 0:  # ragged: drop random pixels
            masks[i] &= torch.rand(h, w, generator=g) > 0.2
    xy, valid = deepest_points(masks)
    assert valid.tolist() == masks.flatten(1).any(1).tolist()
    expected = _deepest_over_the_whole_frame(masks)
    assert xy[valid].tolist() == expected[valid].tolist()
    assert xy[~valid].tolist() == [[0, 0]] * int((~valid).sum())


def test_corrective_clicks_on_a_hand_made_error():
    gt = torch.zeros(2, 60, 60, dtype=torch.bool)
    gt[:, 10:30, 10:30] = True
    pred = torch.zeros_like(gt)
    pred[0, 10:30, 10:20] = True  # missed the right half: cols 20-29
    pred[0, 40:50, 40:50] = True  # a false 10x10 blob
    pred[0, 55:57, 0:2] = True  # and a smaller false one, which must not win
    pred[1] = gt[1]  # perfect: nothing to correct
    for by_area in (False, True):
        coords, labels = corrective_clicks(pred, gt, by_area=by_area)
        assert labels.tolist() == [[1, 0], [-1, -1]]
        assert coords[0].tolist() == [[24.0, 14.0], [44.0, 44.0]]
    assert gt[0, 14, 24] and not pred[0, 14, 24] and pred[0, 44, 44] and not gt[0, 44, 44]


def test_corrective_click_deepest_versus_largest_region():
    gt = torch.zeros(1, 40, 60, dtype=torch.bool)
    pred = torch.zeros_like(gt)
    pred[0, 0:3, 0:60] = True  # a long thin false strip: 180 px, depth 2
    pred[0, 20:27, 20:27] = True  # a small thick false square: 49 px, depth 4
    coords, _ = corrective_clicks(pred, gt)
    assert coords[0, 1].tolist() == [23.0, 23.0]  # the thickest region
    coords, _ = corrective_clicks(pred, gt, by_area=True)
    assert coords[0, 1, 1] == 1.0  # inside the strip (rows 0-2), its middle row


# -- metrics and losses ---------------------------------------------------------------------------

def test_dice_and_iou_of_a_known_overlap():
    gt = torch.zeros(3, 20, 30, dtype=torch.bool)
    pred = torch.zeros_like(gt)
    gt[0, 0:10, 0:10] = True
    pred[0, 0:10, 5:15] = True  # overlap 50 of 100 + 100
    gt[1, 0:4, 0:4] = True  # nothing predicted
    dice, iou = dice_iou(pred, gt)  # object 2: both empty
    torch.testing.assert_close(dice, torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(iou, torch.tensor([1 / 3, 0.0, 1.0], dtype=torch.float64))
    assert summarize(dice)["mean"] == pytest.approx(0.5) and summarize([])["n"] == 0
    with pytest.raises(ValueError, match="differ in shape"):
        dice_iou(pred[:, :10], gt)


def test_losses():
    target = torch.zeros(2, 8, 8)
    target[:, 2:6, 2:6] = 1
    perfect = (target * 2 - 1) * 50
    assert dice_loss(perfect, target).max() < 1e-3
    assert dice_loss(-perfect, target).min() > 0.9
    torch.testing.assert_close(actual_iou(perfect, target), torch.ones(2))
    half = perfect.clone()
    half[:, 2:6, 4:6] = -50  # predicts the left half only: IoU 0.5
    torch.testing.assert_close(actual_iou(half, target), torch.full((2,), 0.5))
    loss = sam_loss(half, torch.tensor([0.5, 1.0]), target)
    assert loss[1] - loss[0] == pytest.approx(0.25, abs=1e-5)  # only the IoU-MSE term differs
    # Outside `valid` (the padding of the low-res frame) nothing counts.
    valid = torch.zeros(8, 8, dtype=torch.bool)
    valid[:, :6] = True
    spill = perfect.clone()
    spill[:, :, 6:] = 50
    torch.testing.assert_close(sam_loss(spill, torch.ones(2), target, valid), sam_loss(perfect, torch.ones(2), target))


def test_multi_output_loss_takes_the_best_of_three_for_single_points():
    from components.sam.losses import multi_output_loss

    target = torch.zeros(2, 8, 8)
    target[:, 2:6, 2:6] = 1
    good = (target * 2 - 1) * 50
    logits = torch.stack([-good, -good, good, -good], dim=1)  # only output 2 is right
    iou = torch.tensor([[0.0, 0.0, 1.0, 0.0]] * 2)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    loss = multi_output_loss(logits, iou, target, valid, torch.tensor([True, False]))
    assert loss[0] < 1e-3  # single point: output 2, and every IoU prediction right
    assert loss[1] > 0.9  # box: output 0, which is wrong
