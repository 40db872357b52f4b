"""SAM's own geometry: resize the longest side to 1024, normalise, pad to 1024x1024, and back.

Everything the model sees (image, boxes, points, mask prompts) lives in the padded 1024 "input
frame"; the decoder's low-resolution logits live in the same frame at 256x256. A `Frame` carries the
sizes needed to go between the original image and these frames, so prompts and predictions always
pass through one transform.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_SIZE = 1024  # the encoder's input side
LOW_RES = 256  # the decoder's output side (IMAGE_SIZE / 4)
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def resize_longest_side_shape(h: int, w: int, long_side: int = IMAGE_SIZE) -> tuple[int, int]:
    """(new_h, new_w) with the longest side equal to `long_side`, rounded as SAM's ResizeLongestSide."""
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


@dataclass(frozen=True)
class Frame:
    """Sizes of one image: original (H, W) and resized-before-padding (h, w) in the 1024 frame."""

    original_size: tuple[int, int]
    input_size: tuple[int, int]

    @classmethod
    def for_size(cls, h: int, w: int) -> "Frame":
        return cls((int(h), int(w)), resize_longest_side_shape(int(h), int(w), IMAGE_SIZE))

    @property
    def low_res_valid_size(self) -> tuple[int, int]:
        """Rows/cols of the 256x256 logits that postprocessing reads: SAM crops the 1024 upsampling to
        `input_size`, i.e. `input_size / 4` low-res pixels, rounded up (a partly covered pixel counts)."""
        scale = IMAGE_SIZE // LOW_RES
        return tuple(-(-s // scale) for s in self.input_size)

    def _scale(self) -> tuple[float, float]:
        (oh, ow), (nh, nw) = self.original_size, self.input_size
        return nw / ow, nh / oh

    def coords_to_input(self, coords):
        """(..., 2) x/y in original pixels -> input frame (numpy or torch, returns float copy)."""
        sx, sy = self._scale()
        out = coords.astype(np.float64) if isinstance(coords, np.ndarray) else coords.float().clone()
        out[..., 0] = out[..., 0] * sx
        out[..., 1] = out[..., 1] * sy
        return out

    def coords_to_original(self, coords):
        sx, sy = self._scale()
        out = coords.astype(np.float64) if isinstance(coords, np.ndarray) else coords.float().clone()
        out[..., 0] = out[..., 0] / sx
        out[..., 1] = out[..., 1] / sy
        return out

    def boxes_to_input(self, boxes):
        """(N, 4) XYXY in original pixels -> input frame."""
        return self.coords_to_input(boxes.reshape(-1, 2, 2)).reshape(-1, 4)

    def boxes_to_original(self, boxes):
        return self.coords_to_original(boxes.reshape(-1, 2, 2)).reshape(-1, 4)


def preprocess_image(image: np.ndarray) -> tuple[torch.Tensor, Frame]:
    """HxWx3 uint8 RGB -> (3x1024x1024 float32 normalised and padded, its Frame).

    Resizing goes through PIL bilinear exactly as SAM's ResizeLongestSide.apply_image, so embeddings
    match what SamPredictor computes for the same image.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    frame = Frame.for_size(image.shape[0], image.shape[1])
    h, w = frame.input_size
    resized = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float()
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    x = (x - mean) / std
    return F.pad(x, (0, IMAGE_SIZE - w, 0, IMAGE_SIZE - h)), frame


def masks_to_low_res(masks: torch.Tensor, frame: Frame) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) binary masks at original size -> ((N, 256, 256) soft targets, (256, 256) valid region).

    The exact inverse of `postprocess_masks`' geometry: resize to the 1024 frame's `input_size`, pad to
    1024x1024, average 4x4 blocks. (Resizing straight to `round(H * 256 / max(H, W))` rows instead
    squeezes the target by up to half a low-res pixel against where predictions are read back.)
    Padding is 0 in the target and outside `valid`, so it never enters a loss.
    """
    if masks.shape[-2:] != torch.Size(frame.original_size):
        raise ValueError(f"mask size {tuple(masks.shape[-2:])} does not match image size {frame.original_size}")
    h, w = frame.input_size
    valid = torch.zeros((LOW_RES, LOW_RES), dtype=torch.bool)
    vh, vw = frame.low_res_valid_size
    valid[:vh, :vw] = True
    if masks.shape[0] == 0:
        return torch.zeros((0, LOW_RES, LOW_RES)), valid
    out = []
    for m in masks.split(8):  # 8 masks at 1024x1024 float are 32 MB: bounded memory for crowded images
        x = F.interpolate(m.float().unsqueeze(1), (h, w), mode="bilinear", align_corners=False,
                          antialias=bool(h < m.shape[-2] or w < m.shape[-1]))
        x = F.pad(x, (0, IMAGE_SIZE - w, 0, IMAGE_SIZE - h))
        out.append(F.avg_pool2d(x, IMAGE_SIZE // LOW_RES).squeeze(1))
    return torch.cat(out).clamp_(0.0, 1.0), valid


def postprocess_masks(low_res_logits: torch.Tensor, frame: Frame) -> torch.Tensor:
    """(N, C, 256, 256) logits -> (N, C, H, W) logits at original size, as Sam.postprocess_masks."""
    x = F.interpolate(low_res_logits, (IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = x[..., : frame.input_size[0], : frame.input_size[1]]
    return F.interpolate(x, frame.original_size, mode="bilinear", align_corners=False)
