"""`train()`: fine-tune SAM's mask decoder (and prompt encoder) with the image encoder frozen."""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from components.sam.device import resolve_device
from components.sam.embeddings import EmbeddingCache, encoder_batch
from components.sam.model import build_sam, export_state_dict, load_trainable_state_dict
from components.training.checkpoints import (CHECKPOINT_FORMAT, Checkpoints, StoreMirror, samples_fingerprint,
                                             trajectory_config)
from components.training.config import TrainConfig, resolve_amp
from components.training.data import stream_split
from components.training.trainer import Trainer, prepare_items

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
    train_seconds: float = 0.0
    embedding_stats: dict = field(default_factory=dict)


def _record_validation(history: dict, iteration: int, metrics: dict) -> None:
    history["val_iteration"].append(iteration)
    history["val_dice"].append(metrics["dice"])
    history["val_iou"].append(metrics["iou"])


def train(cfg: TrainConfig, weights_path: str | Path, train_samples: Sequence, val_samples: Sequence, *,
          store=None, run_id: str | None = None, dataset_hash: str = "", weights_sha256: str = "") -> TrainResult:
    """Fine-tune from `weights_path` on samples (objects with id, image HxWx3 uint8, mask HxW ids,
    image_sha256), or two `reader.SplitRefs` of a dataset version in `store` (streamed: memory does not grow
    with the dataset). Resumes from `checkpoints/<name>/latest.pt` (or the object store's copy under
    runs/<run_id>/) when it belongs to the same run; writes best.pt, latest.pt and model.pt there."""
    t_start = time.perf_counter()
    cfg.validate()
    train_samples, val_samples, streaming = _select(cfg, train_samples, val_samples)
    run = _prepare(cfg, weights_path, weights_sha256, dataset_hash, train_samples, val_samples, streaming, store)
    if run_id:
        # Resume is for retries of the same run; a new run (a second `sam-pipeline run`, tonight's
        # scheduled retraining) starts fresh even when everything else matches.
        run.identity["run_id"] = run_id
    mirror = StoreMirror(store, run_id) if store is not None and run_id else None
    run.checkpoints = Checkpoints(Path(cfg.checkpoint_dir) / cfg.checkpoint_name, mirror)
    _resume_or_score_the_start(run)
    t_train = time.perf_counter()
    _loop(run)
    return _export(run, t_start, train_seconds=time.perf_counter() - t_train)


@dataclass
class _Run:
    """What train()'s steps share."""
    cfg: TrainConfig
    device: torch.device
    amp: object
    model: torch.nn.Module
    cache: EmbeddingCache
    train_items: Sequence
    val_items: Sequence
    identity: dict  # what a checkpoint must match to be resumed
    trainer: Trainer
    checkpoints: Checkpoints | None = None
    history: dict = field(default_factory=lambda: {"iteration": [], "loss": [], "lr": [], "val_iteration": [],
                                                   "val_dice": [], "val_iou": []})
    best: dict = field(default_factory=lambda: {"dice": -math.inf, "iteration": 0})
    start: int = 0
    resumed_from: int | None = None


def _select(cfg: TrainConfig, train_samples, val_samples) -> tuple[Sequence, Sequence, bool]:
    """The samples to train and validate on, and whether they are streamed from the store."""
    streaming = hasattr(train_samples, "load") and not cfg.debug_with_one_example
    if not streaming:
        if hasattr(train_samples, "load"):  # the one-example check needs one image, not a stream
            train_samples = [train_samples.load(0)] if len(train_samples) else []
        train_samples = list(train_samples)
        val_samples = list(val_samples)
    if not len(train_samples):
        raise ValueError("no training samples")
    if cfg.debug_with_one_example:
        # The seed's fast check: one image, trained and validated on itself.
        train_samples = train_samples[:1]
        val_samples = train_samples
    if not len(val_samples):
        raise ValueError("no validation samples: best.pt is chosen by validation Dice")
    return train_samples, val_samples, streaming


def _prepare(cfg: TrainConfig, weights_path, weights_sha256: str, dataset_hash: str, train_samples, val_samples,
             streaming: bool, store) -> _Run:
    """Seeds, the model, its embeddings (from the store or computed once) and the items the trainer reads."""
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
    if streaming:
        # A dataset version in the store (reader.SplitRefs): bounded memory, whatever its size.
        train_items = stream_split(train_samples, cache, device)
        val_items = stream_split(val_samples, cache, device)
        fingerprint = train_samples.fingerprint() + val_samples.fingerprint()
    else:
        train_items = prepare_items(train_samples, cache.get(train_samples), device)
        val_items = prepare_items(val_samples, cache.get(val_samples), device)
        fingerprint = samples_fingerprint(train_samples) + samples_fingerprint(val_samples)
    if not len(train_items):
        raise ValueError("no training sample has any instance")
    identity = {"weights_sha256": weights_sha256, "dataset_hash": dataset_hash, "samples_fingerprint": fingerprint,
                "trajectory_config": trajectory_config(cfg)}
    return _Run(cfg, device, amp, model, cache, train_items, val_items, identity,
                Trainer(cfg, model, train_items, val_items, device, amp))


def _resume_or_score_the_start(run: _Run) -> None:
    """Continue this run's latest checkpoint, or score the untrained decoder: iteration 0 of every curve."""
    ckpt = run.checkpoints.find_resume(run.identity) if run.cfg.resume else None
    if ckpt is not None:
        run.trainer.load_state(ckpt)
        if hasattr(run.train_items, "prefetch"):  # the restored epoch's remaining order
            run.train_items.prefetch(run.trainer.order[run.trainer.pos:])
        run.start = run.resumed_from = int(ckpt["iteration"])
        run.history = ckpt["history"]
        run.best = {"dice": float(ckpt["best_val_dice"]), "iteration": int(ckpt["best_iteration"])}
        log.info("resumed at iteration %d (best val Dice %.3f)", run.start, run.best["dice"])
        return
    run.checkpoints.discard_best()
    metrics = run.trainer.validate()
    _record_validation(run.history, 0, metrics)
    tqdm.write(f"Before training: Dice Score = {metrics['dice']:.3f}")


def _loop(run: _Run) -> None:
    """The iterations, a validation (and checkpoints) every `val_every` and after the last."""
    cfg, trainer, history = run.cfg, run.trainer, run.history
    bar = tqdm(range(run.start, cfg.n_iterations), initial=run.start, total=cfg.n_iterations, desc="finetune",
               disable=not cfg.show_progress, dynamic_ncols=True)
    # The bar names its numbers: the training loss, and the validation split's per-instance box Dice (the
    # summary's "box Dice" is the test split's), shown once a validation has given one.
    last_dice = history["val_dice"][-1] if history["val_dice"] else None
    for it in bar:
        iteration = it + 1
        loss = trainer.train_step(iteration)
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
    for items in (run.train_items, run.val_items):
        if hasattr(items, "close"):  # a stream's loader threads
            items.close()


def _validate_and_save(run: _Run, iteration: int) -> float:
    cfg, history = run.cfg, run.history
    metrics = run.trainer.validate()
    run.trainer.scheduler.step(metrics["dice"])
    _record_validation(history, iteration, metrics)
    improved = metrics["dice"] > run.best["dice"]
    if improved:
        run.best = {"dice": metrics["dice"], "iteration": iteration}
    epoch = iteration // cfg.val_every - 1 if iteration % cfg.val_every == 0 else iteration // cfg.val_every
    tqdm.write(f"Epoch {epoch}: Dice Score = {metrics['dice']:.3f} (best: {run.best['dice']:.3f})")
    state = {"format_version": CHECKPOINT_FORMAT, "iteration": iteration, "config": asdict(cfg),
             "best_val_dice": run.best["dice"], "best_iteration": run.best["iteration"], "history": history,
             "model_type": cfg.model_type, **run.identity, **run.trainer.state()}
    run.checkpoints.save(state, improved)
    return metrics["dice"]


def _export(run: _Run, t_start: float, train_seconds: float) -> TrainResult:
    """best.pt's weights as a plain state dict (model.pt), and what the run did."""
    best_state = run.checkpoints.load_best()
    load_trainable_state_dict(run.model, {k: v.to(run.device) for k, v in best_state["trainable_state"].items()})
    export_state_dict(run.model, run.checkpoints.model)
    done = run.cfg.n_iterations - run.start
    return TrainResult(
        best_path=run.checkpoints.best, latest_path=run.checkpoints.latest, model_path=run.checkpoints.model,
        best_val_dice=float(best_state["best_val_dice"]), history=run.history,
        best_iteration=int(best_state["best_iteration"]), iterations=run.cfg.n_iterations,
        resumed_from=run.resumed_from, device=str(run.device), amp=run.amp.label,
        seconds=time.perf_counter() - t_start,
        train_seconds=train_seconds,
        embedding_stats=dict(run.cache.stats, it_per_s=(done / train_seconds) if done > 0 and train_seconds > 0
                             else None),
    )
