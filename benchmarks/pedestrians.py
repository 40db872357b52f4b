"""Benchmark inputs: Penn-Fudan-like images at one fixed size, and a random `vit_t` checkpoint.

The images are `components.datasets.synthetic.render`'s pedestrians (1..8 per image, the real set's
count distribution from `plan_pennfudan`), drawn straight at the requested size instead of the real
set's widths, so that every trainer in a comparison sees the same pixels and the same objects.
Only numpy, pillow and torch (plus mobile_sam for the checkpoint) are needed: the GPU check imports this.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from components.datasets.reader import Sample
from components.datasets.synthetic import plan_pennfudan, render
from components.hashing import sha256_bytes


def pedestrian_samples(n: int, size: tuple[int, int] = (304, 304), seed: int = 0) -> list[Sample]:
    """`n` samples of `size` (H, W) with 1..8 pedestrians each (the real set's proportions)."""
    h, w = size
    n_fudan = round(n * 74 / 170)
    specs = plan_pennfudan(n_fudan, n - n_fudan, seed)
    out = []
    for spec in specs:
        image, mask, _ = render(replace(spec, width=w, height=h), seed)
        out.append(Sample(spec.id, image, mask, sha256_bytes(image.tobytes())))
    return out


def random_vit_t(path: str | Path, seed: int = 0) -> Path:
    """A state dict of a randomly initialised MobileSAM vit_t (the real architecture, seeded)."""
    import torch
    from mobile_sam import sam_model_registry

    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sam_model_registry["vit_t"]().state_dict(), path)
    return path


def instances(samples) -> int:
    return int(sum(len(np.unique(s.mask)) - 1 for s in samples))
