"""Every prompt of a training iteration (or of an evaluated image) in one decoder call, and the one rule
for which of SAM's outputs a prompt is scored on.

SAM's prompt encoder turns a box into two corner tokens (labels 2 and 3) and a point into one token
(label 1 positive, 0 negative), and pads point-only prompts with one "not a point" token (label -1).
So boxes, clicks and padding fit one (N, K, 2) coordinate tensor with (N, K) labels, and objects with
different prompts share one call. Token order does not matter to the two-way transformer (tokens carry
no position of their own), so `[box, clicks]` here equals the official `[clicks, box]`, and a point
object's `[point, pad, clicks]` the official `[point, clicks, pad]`: each object sees exactly the
tokens the official `PromptEncoder.forward` would give it (checked in tests/test_prompt_batch.py).

The decoder always computes all four masks (`multimask_output` only slices them), so a single-point
object can take the best of outputs 1-3 and every other object output 0 from the same call.
"""
from __future__ import annotations

import torch
from torch import nn

from components.sam.decoder import predict_masks

BOX_LABELS = (2, 3)  # SAM's point_embeddings[2] / [3]: the box's top-left and bottom-right corners
PAD = -1  # "not a point"
MULTIMASK = slice(1, 4)  # the three outputs for ambiguous prompts


def first_round_tokens(boxes: torch.Tensor | None, points: torch.Tensor | None, n: int, k: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates (N, K, 2) and labels (N, K) for N objects prompted either by a box (boxes (N, 4),
    NaN rows for point objects) or by positive points (points (N, P, 2), NaN for box objects), in the
    1024 input frame; K >= max(2, P + 1) tokens, the rest padding."""
    coords = torch.zeros((n, k, 2), dtype=torch.float32, device=device)
    labels = torch.full((n, k), PAD, dtype=torch.long, device=device)
    if points is not None:
        is_pt = ~torch.isnan(points[:, 0, 0])
        p = points.shape[1]
        coords[:, :p] = torch.where(is_pt[:, None, None], points.nan_to_num(0.0), coords[:, :p])
        labels[:, :p] = torch.where(is_pt[:, None], 1, labels[:, :p])
    if boxes is not None:
        is_box = ~torch.isnan(boxes[:, 0])
        coords[:, :2] = torch.where(is_box[:, None, None], boxes.nan_to_num(0.0).view(-1, 2, 2), coords[:, :2])
        labels[:, :2] = torch.where(is_box[:, None], torch.tensor(BOX_LABELS, device=device), labels[:, :2])
    return coords, labels


def is_ambiguous(labels: torch.Tensor) -> torch.Tensor:
    """(N, K) labels -> (N,) bool: the prompt is one point and nothing else, the case SAM answers with
    three masks (whole, part, subpart). Boxes and several points are unambiguous: output 0."""
    n_points = ((labels == 0) | (labels == 1)).sum(1)
    has_box = (labels == BOX_LABELS[0]).any(1)
    return (n_points == 1) & ~has_box


def embed_tokens(prompt_encoder: nn.Module, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PromptEncoder._embed_points/_embed_boxes for the mixed layout: (N, K, 2), (N, K) -> (N, K, C).

    The official code adds each label's embedding through boolean-mask indexing, which costs a host
    synchronisation per label on a GPU; a gather over a small table does the same with none."""
    pe = prompt_encoder.pe_layer.forward_with_coords(coords + 0.5, prompt_encoder.input_image_size)
    table = torch.cat([prompt_encoder.not_a_point_embed.weight]
                      + [e.weight for e in prompt_encoder.point_embeddings])  # rows: label + 1
    pe = pe * (labels != PAD).unsqueeze(-1).to(pe.dtype)
    return pe + table[labels + 1]


def decode_all(model: nn.Module, embeddings: torch.Tensor, image_index: torch.Tensor | None,
               coords: torch.Tensor, labels: torch.Tensor, mask_input: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder call for N prompts over B images: embeddings (B, 256, 64, 64), image_index (N,)
    (None when B == 1), mask_input (N, 1, 256, 256) logits or None -> all four outputs:
    ((N, 4, 256, 256) low-res logits, (N, 4) predicted IoU)."""
    enc = model.prompt_encoder
    sparse = embed_tokens(enc, coords, labels)
    n = coords.shape[0]
    if mask_input is not None:
        dense = enc.mask_downscaling(mask_input)
    else:
        dense = enc.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, *enc.image_embedding_size)
    if embeddings.dim() == 3:
        embeddings = embeddings.unsqueeze(0)
    return predict_masks(model.mask_decoder, embeddings, enc.get_dense_pe(), sparse, dense, image_index=image_index)


def decode_groups(model: nn.Module, embeddings: torch.Tensor, image_index: torch.Tensor | None,
                  coords: torch.Tensor, labels: torch.Tensor, mask_input: torch.Tensor | None,
                  groups: list[tuple[torch.Tensor, torch.Tensor]] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode_all`, split where objects need different token counts.

    A padding token is not free: the transformer attends to it. So an object must carry exactly the
    tokens the official encoder gives it; with one point per object (the default) boxes and points
    both have two and `groups` is None: one call. With P > 1 points, a box has 2 first-round tokens and
    a point object P + 1, so each group (objects, first-round columns to keep) gets its own call; the
    columns after the first round (clicks) are kept for all."""
    if groups is None:
        return decode_all(model, embeddings, image_index, coords, labels, mask_input)
    k0 = max(int(cols.max()) + 1 for _, cols in groups)
    later = torch.arange(k0, coords.shape[1], device=coords.device)
    low = iou = None
    for objs, cols in groups:
        cols = torch.cat([cols, later])
        lo, io = decode_all(model, embeddings, None if image_index is None else image_index[objs],
                            coords[objs][:, cols], labels[objs][:, cols],
                            None if mask_input is None else mask_input[objs])
        if low is None:
            low = lo.new_zeros((coords.shape[0], *lo.shape[1:]))
            iou = io.new_zeros((coords.shape[0], *io.shape[1:]))
        low, iou = low.index_copy(0, objs, lo), iou.index_copy(0, objs, io)
    return low, iou


def choose_output(iou_pred: torch.Tensor, ambiguous: torch.Tensor) -> torch.Tensor:
    """(N, 4) predicted IoU, (N,) ambiguous -> (N,) index of the output an object is taken as.

    Unambiguous prompts: output 0. Ambiguous ones: among outputs 1-3, the highest predicted IoU, as SamPredictor
    users do at inference. Training's next prompting round builds on the same choice (micro-sam's trainer does
    too, `SamTrainer._get_best_masks`), so the corrective clicks it learns from are the ones a user would give
    after seeing that mask; the loss itself still pushes the best of the three (losses.multi_output_loss)."""
    best = iou_pred[:, MULTIMASK].argmax(dim=1) + MULTIMASK.start
    return torch.where(ambiguous, best, torch.zeros_like(best))


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(N, 4, ...) -> (N, ...): each object's chosen output."""
    return x.gather(1, index.view(-1, *([1] * (x.dim() - 1))).expand(-1, 1, *x.shape[2:])).squeeze(1)
