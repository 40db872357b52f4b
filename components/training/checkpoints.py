"""Training checkpoints: best.pt / latest.pt / model.pt in a local folder, optionally mirrored to the
object store under runs/<run_id>/checkpoints/ so a retry on a fresh pod resumes where the last one stopped.

A checkpoint resumes only the run that wrote it: its identity (weights, dataset, samples, the settings
that shape the trajectory, the run id) must match. `Checkpoints` builds a checkpoint from the run's
`Progress` and the trainer's state, and restores both from one: the file's layout lives here alone.
"""
from __future__ import annotations

import logging
import math
import random
import sys
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from components.errors import first_line
from components.sam.model import atomic_torch_save, export_state_dict, load_trainable_state_dict
from components.training.config import NOT_TRAJECTORY, TrainConfig, trajectory_settings

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # 2: the sampler draws from its own seeded stream (training.data.EpochSampler)
# Config fields that do not change the training trajectory: a checkpoint written under other values
# of these may be resumed (e.g. more iterations, or a retry that landed on another device).
_RESUMABLE_ACROSS = NOT_TRAJECTORY | {"n_iterations"}


def _new_history() -> dict:
    return {"iteration": [], "loss": [], "lr": [], "val_iteration": [], "val_dice": [], "val_iou": []}


@dataclass
class Progress:
    """Where a run stands: its last iteration, its curves and its best validation so far."""
    iteration: int = 0
    history: dict = field(default_factory=_new_history)
    best_dice: float = -math.inf
    best_iteration: int = 0


def run_identity(cfg: TrainConfig, weights_sha256: str, dataset_hash: str, samples_fingerprint: str,
                 run_id: str | None) -> dict:
    """What a checkpoint must match to be resumed. A run id, when given, is part of it: resume is for
    retries of the same run; a new run (a second `sam-pipeline run`, tonight's scheduled retraining)
    starts fresh even when everything else matches."""
    identity = {"weights_sha256": weights_sha256, "dataset_hash": dataset_hash,
                "samples_fingerprint": samples_fingerprint, "trajectory_config": trajectory_config(cfg)}
    if run_id:
        identity["run_id"] = run_id
    return identity


def _global_rng_state() -> dict:
    np_state = np.random.get_state()
    rng = {"python": random.getstate(), "numpy_global": [np_state[0], np_state[1].tolist(), *np_state[2:]],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _restore_global_rng(rng: dict) -> None:
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    g = rng["numpy_global"]
    np.random.set_state((g[0], np.array(g[1], dtype=np.uint32), *g[2:]))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


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

    def copy(self, src: Path, dst: Path) -> None:
        self.store.copy(self.key(src.name), self.key(dst.name))


class Checkpoints:
    """best.pt (the best validation Dice so far), latest.pt (where to resume) and model.pt (the export)
    in `directory` for the run `identity` names; every save also goes to `mirror` when there is one."""

    def __init__(self, directory: Path, cfg: TrainConfig, identity: dict, mirror: StoreMirror | None = None):
        directory.mkdir(parents=True, exist_ok=True)
        self.best, self.latest, self.model = directory / "best.pt", directory / "latest.pt", directory / "model.pt"
        self.cfg, self.identity, self.mirror = cfg, identity, mirror

    def resume(self, trainer) -> Progress | None:
        """Restore `trainer` and the process's random states from this run's latest checkpoint and return
        where it stood; None (and no stale best.pt left to export) when there is none to resume."""
        ckpt = self._find_resume() if self.cfg.resume else None
        if ckpt is None:
            self.best.unlink(missing_ok=True)  # a stale best.pt from another run must not be exported
            return None
        trainer.load_state(ckpt)
        _restore_global_rng(ckpt["rng"])
        return Progress(int(ckpt["iteration"]), ckpt["history"], float(ckpt["best_val_dice"]),
                        int(ckpt["best_iteration"]))

    def _find_resume(self) -> dict | None:
        """The latest checkpoint of this same run (fetched from the mirror when not here), or None."""
        if not self.latest.exists() and self.mirror is not None:
            # A retry on a fresh pod: both checkpoints come back from the store (best.pt is what gets exported).
            for path in (self.best, self.latest):
                self.mirror.fetch(path.name, path)
        if not self.latest.exists():
            return None
        try:
            ckpt = load_checkpoint(self.latest)
        except ValueError as e:  # e.g. written by an earlier version of this format
            log.warning("not resuming: %s; starting fresh", e)
            return None
        mismatched = [k for k, v in self.identity.items() if ckpt.get(k) != v]
        if mismatched:
            log.warning("not resuming from %s: it belongs to another run (different %s); starting fresh",
                        self.latest, ", ".join(mismatched))
            return None
        return ckpt

    def save(self, progress: Progress, trainer, improved: bool) -> None:
        """latest.pt, and best.pt too when this validation `improved` on the best so far."""
        state = canonical({"format_version": CHECKPOINT_FORMAT, "iteration": progress.iteration,
                           "config": asdict(self.cfg), "best_val_dice": progress.best_dice,
                           "best_iteration": progress.best_iteration, "history": progress.history,
                           "model_type": self.cfg.model_type, **self.identity, **trainer.state(),
                           "rng": _global_rng_state()})
        paths = ([self.best] if improved else []) + [self.latest]
        for path in paths:
            atomic_torch_save(state, path)
        if self.mirror is not None:
            # best.pt before latest.pt, as on disk. Both hold the same bytes: one upload (49 MB for vit_t with its
            # optimizer state, at every validation) and a copy made by the store.
            self.mirror.push(paths[0])
            if len(paths) == 2:
                self.mirror.copy(self.best, self.latest)

    def export(self, model: torch.nn.Module, device: torch.device) -> Progress:
        """best.pt's weights into `model`, written as a plain state dict (model.pt); best.pt's progress."""
        if not self.best.exists():
            raise RuntimeError(f"no best checkpoint at {self.best}: it should have been written beside latest.pt "
                               f"(or fetched with it from the object store)")
        best = load_checkpoint(self.best)
        load_trainable_state_dict(model, {k: v.to(device) for k, v in best["trainable_state"].items()})
        export_state_dict(model, self.model)
        return Progress(int(best["iteration"]), best["history"], float(best["best_val_dice"]),
                        int(best["best_iteration"]))
