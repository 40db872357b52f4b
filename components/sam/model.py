"""Building SAM from a checkpoint, choosing what trains, and exporting it (decoding: prompt_batch.py).

`vit_t` comes from `mobile_sam`, `vit_b`/`vit_h` from `segment_anything`; both packages share the
prompt encoder / mask decoder code, so everything below works for all three.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from components.errors import first_line
from components.files import atomic_path
from components.sam.device import freeze_objects_at_exit, keep_freed_host_memory
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
    keep_freed_host_memory()  # every process that runs SAM builds it here first
    freeze_objects_at_exit()
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
