"""One training iteration against the straightforward way, on the real MobileSAM vit_t (random weights):
the batched step (every object of the iteration in one decoder call) gives the per-object loss and
gradients of the official prompt encoder and mask decoder; single points train SAM's multimask heads
and evaluation scores the head training selects; batches never hold an image twice."""
from __future__ import annotations

import pytest
import torch

from helpers import cpu_trainer, model_and_two_size_items

CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def model_and_items():
    return model_and_two_size_items(2)


def _reference_round(model, b, coords, labels, mask_input, n_points):
    """The straightforward path: each object alone through the official PromptEncoder.forward and
    MaskDecoder.predict_masks (mobile_sam/modeling/prompt_encoder.py, mask_decoder.py), logits and
    target cropped to the valid region, the loss written out per object."""
    official_predict = type(model.mask_decoder).predict_masks
    losses = []
    for n in range(coords.shape[0]):
        lab, c = labels[n], coords[n]
        has_box = bool((lab == 2).any())
        k0 = max(2, n_points + 1)  # the first round's tokens; clicks follow
        keep = (lab <= 1) & (lab >= -1)
        keep[:k0] &= lab[:k0] != -1  # first-round padding: the official encoder appends its own for points
        pts = (c[keep][None], lab[keep][None]) if keep.any() else None
        box = torch.cat([c[lab == 2], c[lab == 3]], dim=1) if has_box else None
        sparse, dense = model.prompt_encoder(points=pts, boxes=box,
                                             masks=None if mask_input is None else mask_input[n:n + 1])
        img = 0 if b.image_index is None else int(b.image_index[n])
        low, iou = official_predict(model.mask_decoder, b.embeddings[img:img + 1], model.prompt_encoder.get_dense_pe(),
                                    sparse, dense)
        rows, cols = b.valid[n].any(1).sum(), b.valid[n].any(0).sum()
        logit, t = low[0, :, :rows, :cols], b.target[n, :rows, :cols]
        p = torch.sigmoid(logit).flatten(1)
        dice = 1 - (2 * (p * t.flatten()).sum(1) + 1) / (p.sum(1) + t.sum() + 1)
        hard = (logit > 0).flatten(1)
        inter, union = (hard & (t > 0.5).flatten()).sum(1), (hard | (t > 0.5).flatten()).sum(1)
        mse = (iou[0] - torch.where(union > 0, inter / union.clamp(min=1), 1.0)) ** 2
        single_point = not has_box and int(((lab == 0) | (lab == 1)).sum()) == 1
        losses.append(dice[1:].min() + mse[1:].mean() if single_point else dice[0] + mse[0])
    return torch.stack(losses)


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("n_points", [1, 2])
def test_batched_step_equals_the_per_object_path(model_and_items, n_points):
    """Same loss and gradients, two prompting rounds (clicks and a mask prompt in the second), a batch
    of two images of different sizes, boxes and points mixed."""
    model, items = model_and_items
    t = cpu_trainer(model, items, batch_size=2, n_points=n_points)
    b = t.make_batch(1, t.sample_batch())
    assert b.image_index is not None and len(set(b.image_index.tolist())) == 2
    assert {2, 1} <= set(b.labels[:, 0].tolist())  # boxes and points in the same call

    coords, labels, mask_input = b.coords, b.labels, None
    for r in range(2):
        model.zero_grad(set_to_none=True)
        fast, low, chosen_index = t.round_loss(b, coords, labels, mask_input)
        fast.sum().backward()
        g_fast = _grads(model)
        model.zero_grad(set_to_none=True)
        ref = _reference_round(model, b, coords, labels, mask_input, n_points)
        ref.sum().backward()
        g_ref = _grads(model)
        torch.testing.assert_close(fast.detach(), ref.detach(), rtol=1e-4, atol=1e-5)
        assert g_fast.keys() == g_ref.keys()
        for k in g_ref:
            torch.testing.assert_close(g_fast[k], g_ref[k], rtol=1e-3, atol=1e-5, msg=k)
        coords, labels, chosen = t.corrections(b, coords, labels, low.detach().gather(
            1, chosen_index.view(-1, 1, 1, 1).expand(-1, 1, 256, 256)).squeeze(1))
        mask_input = chosen.unsqueeze(1)
    model.zero_grad(set_to_none=True)


def _decoder_heads(model):
    return [torch.cat([p.detach().flatten().clone() for p in mlp.parameters()])
            for mlp in model.mask_decoder.output_hypernetworks_mlps]


def test_single_points_train_the_multimask_heads_and_evaluation_scores_them(model_and_items):
    from components.sam.prompt_batch import decode_prompts
    from components.sam.prompt_batch import decode_all, first_round_tokens
    from components.sam.transforms import postprocess_masks

    model, items = model_and_items
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        # Boxes only: the gradient never reaches outputs 1-3.
        t = cpu_trainer(model, items, prompt_mode="box", n_sub_iteration=1)
        before = _decoder_heads(model)
        t.train_step(1)
        after = _decoder_heads(model)
        assert not torch.equal(before[0], after[0])
        assert all(torch.equal(before[i], after[i]) for i in (1, 2, 3))
        # Single points: the best of outputs 1-3 learns (and the IoU head on all three).
        t = cpu_trainer(model, items, prompt_mode="point", n_sub_iteration=1)
        for i in range(2):
            t.train_step(i + 1)
        moved = _decoder_heads(model)
        assert sum(not torch.equal(after[i], moved[i]) for i in (1, 2, 3)) >= 1

        # Evaluation: a point is scored on the output among 1-3 with the highest predicted IoU.
        item = items[0]
        pts = item.boxes[:, None, :2] + 2.0  # any point; what matters is which output is kept
        masks, chosen, _ = decode_prompts(model, item.embedding, item.frame, None, pts)
        with torch.no_grad():
            c, lab = first_round_tokens(None, torch.as_tensor(item.frame.coords_to_input(pts), dtype=torch.float32),
                                        len(pts), 2, CPU)
            low, iou = decode_all(model, item.embedding, None, c, lab)
        expect = iou[:, 1:].argmax(1) + 1
        assert torch.equal(chosen, expect)
        want = postprocess_masks(low[torch.arange(len(pts)), expect][:, None], item.frame)[:, 0] > 0
        assert torch.equal(masks, want)
        box_masks, box_chosen, _ = decode_prompts(model, item.embedding, item.frame, item.boxes, None)
        assert (box_chosen == 0).all()
    finally:
        model.load_state_dict(state)


def test_a_batch_never_holds_an_image_twice(model_and_items):
    from components.training.data import EpochSampler

    model, items = model_and_items
    sampler = EpochSampler(3, 2, seed=0)  # 3 images, batches of 2: every other batch straddles two epochs
    seen = []
    for _ in range(30):
        images = sampler.next_images()
        assert len(images) == len(set(images)) == 2, images
        seen += images
    # Still every image once per epoch: 60 draws over 3 images, 20 epochs.
    assert all(sorted(seen[3 * e:3 * e + 3]) == [0, 1, 2] for e in range(20))
    # sample_batch then holds each object at most once.
    t = cpu_trainer(model, items[:3], batch_size=2)
    try:
        pairs = [(i, k) for i, _, objs in t.sample_batch() for k in objs.tolist()]
    finally:
        t.close()
    assert len(pairs) == len(set(pairs))
