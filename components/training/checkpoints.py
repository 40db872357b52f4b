"""Training checkpoints: best.pt / latest.pt / model.pt in a local folder, optionally mirrored to the
object store under runs/<run_id>/checkpoints/ so a retry on a fresh pod resumes where the last one stopped.

A checkpoint resumes only the run that wrote it: its identity (weights, dataset, samples, the settings
that shape the trajectory, the run id) must match.
"""
from __future__ import annotations

import hashlib
import logging
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from components.errors import first_line
from components.sam.embeddings import image_key
from components.sam.model import atomic_torch_save
from components.training.config import NOT_TRAJECTORY, TrainConfig, trajectory_settings

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
# Config fields that do not change the training trajectory: a checkpoint written under other values
# of these may be resumed (e.g. more iterations, or a retry that landed on another device).
_RESUMABLE_ACROSS = NOT_TRAJECTORY | {"n_iterations"}


def samples_fingerprint(samples: Sequence) -> str:
    """Content hash of a list of samples (ids, image hashes, mask bytes): what resume must match."""
    h = hashlib.sha256()
    for s in samples:
        mask = np.ascontiguousarray(s.mask)
        h.update(f"{s.id}|{image_key(s)}|{mask.shape}|".encode())
        h.update(hashlib.sha256(mask.tobytes()).digest())
    return h.hexdigest()


def trajectory_config(cfg: TrainConfig) -> dict:
    return {k: v for k, v in trajectory_settings(cfg).items() if k not in _RESUMABLE_ACROSS}


def load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is unreadable: {first_line(e)}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a sam-pipeline training checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def canonical(obj):
    """The same checkpoint content as the same bytes. Pickle writes a str it has seen before (the same
    object) as a back-reference, so whether two equal strings are one object (two code literals) or two
    (one read back from a resumed checkpoint, e.g. the optimizer's param-group keys) shows in the file.
    Interning every string makes the bytes depend on the content only, so a resumed run's best.pt and
    latest.pt equal an uninterrupted run's byte for byte."""
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, dict):
        out = {canonical(k): canonical(v) for k, v in obj.items()}
        return OrderedDict(out) if isinstance(obj, OrderedDict) else out
    if isinstance(obj, list):
        return [canonical(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(canonical(v) for v in obj)
    return obj


class StoreMirror:
    """The object-store copy of one run's checkpoints (runs/<run_id>/checkpoints/<name>)."""

    def __init__(self, store, run_id: str):
        self.store, self.run_id = store, run_id

    def key(self, name: str) -> str:
        return self.store.key("runs", self.run_id, "checkpoints", name)

    def uri(self, name: str) -> str:
        return self.store.uri(self.key(name))

    def fetch(self, name: str, dest: Path) -> None:
        if self.store.stat(self.key(name)) is not None:
            log.info("fetching %s", self.uri(name))
            self.store.get_file(self.key(name), dest)

    def push(self, path: Path) -> None:
        self.store.put_file(self.key(path.name), path)


class Checkpoints:
    """best.pt (the best validation Dice so far), latest.pt (where to resume) and model.pt (the export)
    in `directory`; every save also goes to `mirror` when there is one."""

    def __init__(self, directory: Path, mirror: StoreMirror | None = None):
        directory.mkdir(parents=True, exist_ok=True)
        self.best, self.latest, self.model = directory / "best.pt", directory / "latest.pt", directory / "model.pt"
        self.mirror = mirror

    def find_resume(self, identity: dict) -> dict | None:
        """The latest checkpoint of this same run (fetched from the mirror when not here), or None."""
        if not self.latest.exists() and self.mirror is not None:
            # A retry on a fresh pod: both checkpoints come back from the store (best.pt is what gets exported).
            for path in (self.best, self.latest):
                self.mirror.fetch(path.name, path)
        if not self.latest.exists():
            return None
        ckpt = load_checkpoint(self.latest)
        mismatched = [k for k, v in identity.items() if ckpt.get(k) != v]
        if mismatched:
            log.warning("not resuming from %s: it belongs to another run (different %s); starting fresh",
                        self.latest, ", ".join(mismatched))
            return None
        return ckpt

    def discard_best(self) -> None:
        """A stale best.pt from another run must not be exported."""
        self.best.unlink(missing_ok=True)

    def save(self, state: dict, improved: bool) -> None:
        state = canonical(state)
        for path in ([self.best] if improved else []) + [self.latest]:
            atomic_torch_save(state, path)
            if self.mirror is not None:
                self.mirror.push(path)

    def load_best(self) -> dict:
        if not self.best.exists():
            raise RuntimeError(f"no best checkpoint at {self.best}: it should have been written beside latest.pt "
                               f"(or fetched with it from the object store)")
        return load_checkpoint(self.best)
