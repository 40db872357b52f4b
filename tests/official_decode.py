"""The official decoding path, for comparisons only: prompts through the official PromptEncoder and MaskDecoder
modules (what SamPredictor does), optionally with components/sam/decoder.py's predict_masks swapped in on one
model instance. The product decodes one way, components/sam/prompt_batch.py; the tests hold it to this."""
from __future__ import annotations

import types
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from components.sam.decoder import predict_masks
from components.sam.transforms import Frame, postprocess_masks


def use_fast_decoder(model: nn.Module) -> nn.Module:
    """Swap this model's MaskDecoder.predict_masks for components/sam/decoder.py's (same numbers, less
    work per prompt). Instance-level only: the class, other models and the exported state dict are
    untouched."""
    model.mask_decoder.predict_masks = types.MethodType(predict_masks, model.mask_decoder)
    return model


@dataclass
class Decoded:
    low_res_logits: torch.Tensor  # (N, C, 256, 256) in the padded input frame; feed back as mask prompt
    iou_pred: torch.Tensor  # (N, C)
    masks: torch.Tensor | None  # (N, C, H, W) bool at original size (None when upscale=False)


def _as_tensor(x, device, dtype=torch.float32):
    if x is None:
        return None
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(device, dtype)


def decode_input_frame(model: nn.Module, embedding: torch.Tensor, *, boxes=None, points=None,
                       point_labels=None, mask_input=None, multimask_output: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts already in the 1024 input frame -> ((N, C, 256, 256) logits, (N, C) predicted IoU).

    All prompts of one image go through the decoder in one call; the decoder repeats the image
    embedding once per prompt internally (MaskDecoder.predict_masks), which is inherent to SAM's
    two-way attention (each prompt rewrites its own copy of the image tokens).
    """
    device = embedding.device
    if embedding.dim() == 3:
        embedding = embedding.unsqueeze(0)
    if embedding.shape[0] != 1:
        raise ValueError(f"decode takes one image embedding at a time, got a batch of {embedding.shape[0]}")
    boxes = _as_tensor(boxes, device)
    pts = None
    if points is not None:
        if point_labels is None:
            raise ValueError("points need point_labels (1 positive, 0 negative, -1 padding)")
        pts = (_as_tensor(points, device), _as_tensor(point_labels, device, torch.long))
    masks = _as_tensor(mask_input, device)
    if masks is not None and masks.dim() == 3:
        masks = masks.unsqueeze(1)
    if boxes is None and pts is None and masks is None:
        raise ValueError("decode needs at least one prompt (boxes, points or mask_input)")
    sparse, dense = model.prompt_encoder(points=pts, boxes=boxes, masks=masks)
    return model.mask_decoder(
        image_embeddings=embedding,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
    )


def decode(model: nn.Module, embedding: torch.Tensor, frame: Frame | tuple[int, int], *, boxes=None,
           points=None, point_labels=None, mask_input=None, multimask_output: bool = False,
           upscale: bool = True) -> Decoded:
    """Prompts in ORIGINAL image pixels for N instances of one image -> logits, masks, predicted IoU.

    frame: the image's `Frame` or its original (H, W). boxes (N, 4) XYXY; points (N, K, 2) x/y with
    point_labels (N, K); mask_input (N, 1, 256, 256) low-res logits from a previous decode.
    Masks are upscaled to the original size and thresholded at 0 as SamPredictor does.
    """
    if not isinstance(frame, Frame):
        frame = Frame.for_size(*frame)
    if boxes is not None:
        boxes = frame.boxes_to_input(_as_tensor(boxes, "cpu"))
    if points is not None:
        points = frame.coords_to_input(_as_tensor(points, "cpu"))
    low_res, iou = decode_input_frame(model, embedding, boxes=boxes, points=points, point_labels=point_labels,
                                      mask_input=mask_input, multimask_output=multimask_output)
    masks = postprocess_masks(low_res.float(), frame) > 0 if upscale else None
    return Decoded(low_res, iou, masks)
