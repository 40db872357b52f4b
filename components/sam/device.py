"""The one device choice used by training, evaluation and the CLI."""
from __future__ import annotations

import logging
import warnings

import torch

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"device {name!r} requested but CUDA is not available; training on cpu", stacklevel=2)
        log.warning("CUDA is not available; falling back to cpu")
        return torch.device("cpu")
    return device
