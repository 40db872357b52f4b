"""`train()`: fine-tune SAM's mask decoder (and prompt encoder) with the image encoder frozen."""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from components.sam.device import resolve_device
from components.sam.embeddings import EmbeddingCache, encoder_batch
from components.sam.model import build_sam
from components.training.checkpoints import Checkpoints, Progress, StoreMirror, run_identity
from components.training.config import TrainConfig, resolve_amp
from components.training.data import split_items
from components.training.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    best_path: Path
    latest_path: Path
    model_path: Path  # plain state dict, loadable by the official sam_model_registry builders
    best_val_dice: float
    history: dict
    best_iteration: int = 0
    iterations: int = 0
    resumed_from: int | None = None
    device: str = "cpu"
    amp: str = "off"
    seconds: float = 0.0
    train_seconds: float = 0.0  # the loop: iterations, validations and checkpoints
    validation_seconds: float = 0.0  # of which validation passes (iteration 0's included)
    checkpoint_seconds: float = 0.0  # of which checkpoint writes and their copies to the store
    embedding_stats: dict = field(default_factory=dict)


def _record_validation(history: dict, iteration: int, metrics: dict) -> None:
    history["val_iteration"].append(iteration)
    history["val_dice"].append(metrics["dice"])
    history["val_iou"].append(metrics["iou"])


def train(cfg: TrainConfig, weights_path: str | Path, train_split, val_split, *, store, run_id: str | None = None,
          dataset_hash: str = "", weights_sha256: str = "") -> TrainResult:
    """Fine-tune from `weights_path` on two splits of a dataset version (`reader.SplitRefs`, or the in-memory
    `reader.SampleSplit`), their embeddings cached in `store`; memory does not grow with the dataset. Resumes
    from `checkpoints/<name>/latest.pt` (or the object store's copy under runs/<run_id>/) when it belongs to
    the same run; writes best.pt, latest.pt and model.pt there."""
    t_start = time.perf_counter()
    cfg.validate()
    train_split, val_split = _select(cfg, train_split, val_split)
    run = _prepare(cfg, weights_path, weights_sha256, train_split, val_split, store)
    mirror = StoreMirror(store, run_id) if run_id else None
    identity = run_identity(cfg, run.cache.weights_sha256, dataset_hash,
                            train_split.fingerprint() + val_split.fingerprint(), run_id)
    run.checkpoints = Checkpoints(Path(cfg.checkpoint_dir) / cfg.checkpoint_name, cfg, identity, mirror)
    try:
        _resume_or_score_the_start(run)
        t_train = time.perf_counter()
        _loop(run)
        train_seconds = time.perf_counter() - t_train
    finally:
        run.trainer.close()
    return _export(run, t_start, train_seconds)


@dataclass
class _Run:
    """What train()'s steps share."""
    cfg: TrainConfig
    device: torch.device
    amp: object
    model: torch.nn.Module
    cache: EmbeddingCache
    trainer: Trainer
    checkpoints: Checkpoints | None = None
    progress: Progress = field(default_factory=Progress)
    resumed_from: int | None = None
    seconds: dict = field(default_factory=lambda: {"validation": 0.0, "checkpoints": 0.0})  # not checkpointed

    def validate(self) -> dict:
        t = time.perf_counter()
        metrics = self.trainer.validate()
        self.seconds["validation"] += time.perf_counter() - t
        return metrics


def _select(cfg: TrainConfig, train_split, val_split):
    """The splits to train and validate on."""
    if not len(train_split):
        raise ValueError("no training samples")
    if cfg.debug_with_one_example:
        # The seed's fast check: one image, trained and validated on itself.
        train_split = val_split = train_split.head(1)
    if not len(val_split):
        raise ValueError("no validation samples: best.pt is chosen by validation Dice")
    return train_split, val_split


def _prepare(cfg: TrainConfig, weights_path, weights_sha256: str, train_split, val_split, store) -> _Run:
    """Seeds, the model, its embeddings (from the store, computed once where missing) and the trainer."""
    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg, device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    if not weights_sha256:
        from components.hashing import sha256_file
        weights_sha256 = sha256_file(weights_path)
    model = build_sam(cfg.model_type, weights_path, device)
    cache = EmbeddingCache(model, weights_sha256, store, batch_size=encoder_batch(device, cfg.embed_batch_size),
                           amp=amp.enabled)
    train_items = split_items(train_split, cache)
    val_items = train_items if val_split is train_split else split_items(val_split, cache)  # one-example check
    trainer = Trainer(cfg, model, train_items, val_items, device, amp)
    return _Run(cfg, device, amp, model, cache, trainer)


def _resume_or_score_the_start(run: _Run) -> None:
    """Continue this run's latest checkpoint, or score the untrained decoder: iteration 0 of every curve."""
    progress = run.checkpoints.resume(run.trainer)
    if progress is not None:
        run.progress, run.resumed_from = progress, progress.iteration
        log.info("resumed at iteration %d (best val Dice %.3f)", progress.iteration, progress.best_dice)
        return
    metrics = run.validate()
    _record_validation(run.progress.history, 0, metrics)
    tqdm.write(f"Before training: Dice Score = {metrics['dice']:.3f}")


def _loop(run: _Run) -> None:
    """The iterations, a validation (and checkpoints) every `val_every` and after the last."""
    cfg, trainer, history = run.cfg, run.trainer, run.progress.history
    start = run.progress.iteration
    bar = tqdm(range(start, cfg.n_iterations), initial=start, total=cfg.n_iterations, desc="finetune",
               disable=not cfg.show_progress, dynamic_ncols=True)
    # The bar names its numbers: the training loss, and the validation split's per-instance box Dice (the
    # summary's "box Dice" is the test split's), shown once a validation has given one.
    last_dice = history["val_dice"][-1] if history["val_dice"] else None
    for it in bar:
        iteration = it + 1
        loss = trainer.train_step(iteration)
        run.progress.iteration = iteration
        history["iteration"].append(iteration)
        history["loss"].append(loss)
        history["lr"].append(trainer.optimizer.param_groups[0]["lr"])
        if iteration % cfg.val_every == 0 or iteration == cfg.n_iterations:
            last_dice = _validate_and_save(run, iteration)
        shown = {"train loss": f"{loss:.4f}"}
        if last_dice is not None and math.isfinite(last_dice):
            shown["val box Dice"] = f"{last_dice:.3f}"
        bar.set_postfix(shown)
    bar.close()


def _validate_and_save(run: _Run, iteration: int) -> float:
    cfg, progress = run.cfg, run.progress
    metrics = run.validate()
    run.trainer.scheduler.step(metrics["dice"])
    _record_validation(progress.history, iteration, metrics)
    improved = metrics["dice"] > progress.best_dice
    if improved:
        progress.best_dice, progress.best_iteration = metrics["dice"], iteration
    epoch = iteration // cfg.val_every - 1 if iteration % cfg.val_every == 0 else iteration // cfg.val_every
    tqdm.write(f"Epoch {epoch}: Dice Score = {metrics['dice']:.3f} (best: {progress.best_dice:.3f})")
    t = time.perf_counter()
    run.checkpoints.save(progress, run.trainer, improved)
    run.seconds["checkpoints"] += time.perf_counter() - t
    return metrics["dice"]


def _export(run: _Run, t_start: float, train_seconds: float) -> TrainResult:
    """best.pt's weights as a plain state dict (model.pt), and what the run did."""
    best = run.checkpoints.export(run.model, run.device)
    start = run.resumed_from or 0
    done = run.cfg.n_iterations - start
    return TrainResult(
        best_path=run.checkpoints.best, latest_path=run.checkpoints.latest, model_path=run.checkpoints.model,
        best_val_dice=best.best_dice, history=run.progress.history, best_iteration=best.best_iteration,
        iterations=run.cfg.n_iterations, resumed_from=run.resumed_from, device=str(run.device), amp=run.amp.label,
        seconds=time.perf_counter() - t_start, train_seconds=train_seconds,
        validation_seconds=run.seconds["validation"], checkpoint_seconds=run.seconds["checkpoints"],
        embedding_stats=dict(run.cache.stats, it_per_s=(done / train_seconds) if done > 0 and train_seconds > 0
                             else None),
    )
