"""Building SAM from a checkpoint, choosing what trains, exporting, and decoding prompts.

`vit_t` comes from `mobile_sam`, `vit_b`/`vit_h` from `segment_anything`; both packages share the
prompt encoder / mask decoder code, so everything below works for all three.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from components.errors import first_line
from components.files import atomic_path
from components.sam.decoder import predict_masks
from components.sam.transforms import Frame, postprocess_masks
from components.weights import MODEL_TYPES

ENCODER_PREFIX = "image_encoder."


def _registry(model_type: str):
    if model_type == "vit_t":
        import warnings

        # mobile_sam registers its tiny_vit models with timm under names timm already has, through timm
        # modules timm has deprecated: five "Overwriting tiny_vit_... in registry" and two "Importing from
        # timm.models... is deprecated" warnings per process, all about MobileSAM's own code.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Overwriting tiny_vit", category=UserWarning)
            warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)
            from mobile_sam import sam_model_registry
    elif model_type in ("vit_b", "vit_h"):
        from segment_anything import sam_model_registry
    else:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    return sam_model_registry[model_type]


def load_state_dict_file(path: str | Path) -> dict:
    """A plain SAM state dict from `path`, on CPU, loaded without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/non-torch files
        raise ValueError(f"checkpoint {path} is not a readable torch file: {first_line(e)}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} is not a plain state dict of tensors")
    return state


def build_sam(model_type: str = "vit_t", checkpoint_path: str | Path | None = None,
              device: str | torch.device = "cpu") -> nn.Module:
    """The official architecture for `model_type`, weights from `checkpoint_path` (random when None),
    in eval mode on `device`. A checkpoint of the wrong architecture is a clear error."""
    model = _registry(model_type)(checkpoint=None)
    if checkpoint_path is not None:
        load_strict(model, load_state_dict_file(checkpoint_path), f"checkpoint {checkpoint_path}", model_type)
    return model.to(device).eval()


def load_strict(model: nn.Module, state: dict, what: str, model_type: str) -> nn.Module:
    """Load a complete state dict; any missing or unexpected key is a clear error naming `what`."""
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{what} does not fit SAM {model_type}: "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:2]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]})")
    return model


def set_trainable(model: nn.Module, freeze_prompt_encoder: bool = False) -> list[nn.Parameter]:
    """Freeze the image encoder (and optionally the prompt encoder); return the parameters to train."""
    model.image_encoder.requires_grad_(False)
    model.prompt_encoder.requires_grad_(not freeze_prompt_encoder)
    model.mask_decoder.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything except the frozen image encoder, as CPU copies (what training checkpoints carry)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
            if not k.startswith(ENCODER_PREFIX)}


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = {k for k in model.state_dict() if not k.startswith(ENCODER_PREFIX)}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"trainable state does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    model.load_state_dict(state, strict=False)


def atomic_torch_save(obj, path: str | Path) -> Path:
    """torch.save to a temp file beside `path`, then rename: readers never see half a file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # A file object, not the path: torch names the archive's records after the file, and the temp
        # name is random; the same state must give the same bytes (model_sha256 of a resumed run).
        torch.save(obj, f)
    return Path(path)


def export_state_dict(model: nn.Module, path: str | Path) -> Path:
    """A plain, complete CPU state dict that the official `sam_model_registry[...]` builders load
    unchanged (they call torch.load without map_location, so no CUDA tensors)."""
    return atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


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
