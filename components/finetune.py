"""Fine-tune SAM's mask decoder (and prompt encoder) on instance masks, with the encoder frozen.

Per iteration: sample up to `n_objects_per_batch` objects from `batch_size` images, prompt each with
its jittered box or a point inside it (alternating), then `n_sub_iteration - 1` corrective rounds
(a positive click deep in the largest missed region, a negative one deep in the largest false region,
and the previous low-res logits as mask prompt). Loss per object: Dice + MSE(predicted IoU, IoU),
averaged over rounds and objects.

The loss is computed at the decoder's 256x256 resolution, against the ground truth mapped through
SAM's transform (resize longest side to 256, padding cropped away): SAM's postprocessing is a fixed
bilinear upsampling, so this is the same objective without upsampling N masks to 1024 and back each
step. Validation Dice/IoU is always at the original image resolution.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from components.sam.embeddings import EmbeddingCache, image_key
from components.sam.losses import sam_loss
from components.sam.metrics import dice_iou
from components.sam.model import (atomic_torch_save, build_sam, decode, decode_input_frame, export_state_dict,
                                  load_trainable_state_dict, set_trainable, trainable_state_dict,
                                  use_broadcast_decoder)
from components.sam.prompts import corrective_clicks, instance_masks, jitter_boxes, masks_to_boxes, sample_points
from components.sam.transforms import LOW_RES, IMAGE_SIZE, Frame, crop_low_res, masks_to_low_res

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
MAX_NONFINITE_IN_A_ROW = 5
# Config fields that do not change the training trajectory: a checkpoint written under other values
# of these may be resumed (e.g. more iterations, or a retry that landed on another device).
_RESUMABLE_ACROSS = {"n_iterations", "device", "checkpoint_dir", "checkpoint_name", "resume", "embed_batch_size",
                     "show_progress"}


@dataclass
class TrainConfig:
    debug_with_one_example: bool = False
    checkpoint_name: str = "sam_instance_seg"
    model_type: str = "vit_t"
    batch_size: int = 1
    n_objects_per_batch: int = 25
    device: str = "cuda"
    n_iterations: int = 200
    n_sub_iteration: int = 2
    lr: float = 1e-5
    seed: int = 0
    val_every: int = 10
    amp: bool | None = None  # None: on for CUDA, off for CPU
    amp_dtype: str = "fp16"  # "fp16" (CUDA, with GradScaler) or "bf16" (CUDA where supported, CPU)
    freeze_prompt_encoder: bool = False
    checkpoint_dir: str = "checkpoints"
    prompt_mode: str = "alternate"  # "alternate" box/point per object, or only "box" / only "point"
    box_jitter: float = 0.05  # fraction of the box's size each edge may move
    n_points: int = 1  # positive points for point-prompted objects
    click_largest_area: bool = False  # corrective clicks in the largest-area region, not the thickest (slower)
    embed_batch_size: int = 4
    resume: bool = True
    show_progress: bool = True

    def validate(self) -> None:
        problems = []
        for name in ("batch_size", "n_objects_per_batch", "n_iterations", "n_sub_iteration", "val_every",
                     "n_points", "embed_batch_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.amp_dtype not in ("fp16", "bf16"):
            problems.append(f"amp_dtype must be 'fp16' or 'bf16' (got {self.amp_dtype!r})")
        if self.prompt_mode not in ("alternate", "box", "point"):
            problems.append(f"prompt_mode must be alternate, box or point (got {self.prompt_mode!r})")
        if self.model_type not in ("vit_t", "vit_b", "vit_h"):
            problems.append(f"model_type must be vit_t, vit_b or vit_h (got {self.model_type!r})")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))


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


# -- setup helpers -------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"device {name!r} requested but CUDA is not available; training on cpu", stacklevel=2)
        log.warning("CUDA is not available; falling back to cpu")
        return torch.device("cpu")
    return device


@dataclass(frozen=True)
class AmpSettings:
    enabled: bool
    dtype: torch.dtype
    scaler: bool

    @property
    def label(self) -> str:
        if not self.enabled:
            return "off"
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype] + ("+scaler" if self.scaler else "")

    def autocast(self, device: torch.device):
        if not self.enabled:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def resolve_amp(cfg: TrainConfig, device: torch.device) -> AmpSettings:
    enabled = (device.type == "cuda") if cfg.amp is None else bool(cfg.amp)
    if not enabled:
        return AmpSettings(False, torch.float32, False)
    if device.type != "cuda":
        if cfg.amp_dtype != "bf16":
            log.warning("fp16 autocast is CUDA-only; using bf16 autocast on %s", device.type)
        return AmpSettings(True, torch.bfloat16, False)
    if cfg.amp_dtype == "bf16":
        if torch.cuda.is_bf16_supported():
            return AmpSettings(True, torch.bfloat16, False)
        log.warning("this GPU does not support bf16; using fp16 with GradScaler")
    return AmpSettings(True, torch.float16, True)


def samples_fingerprint(samples: Sequence) -> str:
    """Content hash of a list of samples (ids, image hashes, mask bytes): what resume must match."""
    h = hashlib.sha256()
    for s in samples:
        mask = np.ascontiguousarray(s.mask)
        h.update(f"{s.id}|{image_key(s)}|{mask.shape}|".encode())
        h.update(hashlib.sha256(mask.tobytes()).digest())
    return h.hexdigest()


@dataclass
class _Item:
    """One image, ready for training/validation: its embedding, boxes, and targets in both frames."""
    id: str
    frame: Frame
    embedding: torch.Tensor  # (256, 64, 64)
    boxes: np.ndarray  # (K, 4) original pixels
    flat_idx: list  # per object, np.flatnonzero of its mask (for point sampling)
    target_low: torch.Tensor  # (K, h256, w256) soft targets in the logits' frame, padding cropped
    masks: torch.Tensor  # (K, H, W) bool at original size (metrics)


def _prepare(samples: Sequence, embeddings: list[torch.Tensor], device: torch.device) -> list[_Item]:
    items = []
    for s, emb in zip(samples, embeddings):
        mask = np.asarray(s.mask)
        if mask.shape != s.image.shape[:2]:
            raise ValueError(f"sample {s.id}: mask {mask.shape} does not match image {s.image.shape[:2]}")
        ids, masks = instance_masks(mask)
        if len(ids) == 0:
            log.warning("sample %s has no instances; skipped", s.id)
            continue
        frame = Frame.for_size(*mask.shape)
        masks_t = torch.from_numpy(masks)
        items.append(_Item(
            id=s.id, frame=frame, embedding=emb, boxes=masks_to_boxes(masks),
            flat_idx=[np.flatnonzero(m) for m in masks],
            target_low=masks_to_low_res(masks_t, frame).to(device),
            masks=masks_t,
        ))
    return items


# -- the trainer ---------------------------------------------------------------------------------

@dataclass
class _Group:
    """The objects of one image prompted the same way: one decoder call per round."""
    idx: int  # index into the trainer's train_items
    item: _Item
    objs: np.ndarray
    boxes: torch.Tensor | None
    points: torch.Tensor | None
    labels: torch.Tensor | None
    target: torch.Tensor
    mask_input: torch.Tensor | None = None


class Trainer:
    """The training state and one iteration of it; `train()` drives it, benchmarks reuse it."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, train_items: list[_Item],
                 val_items: list[_Item], device: torch.device, amp: AmpSettings, *, broadcast_decoder: bool = True):
        self.cfg, self.model, self.device, self.amp = cfg, model, device, amp
        if broadcast_decoder:
            use_broadcast_decoder(model)
        self.train_items, self.val_items = train_items, val_items
        self.params = set_trainable(model, cfg.freeze_prompt_encoder)
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode="max", factor=0.9,
                                                                    patience=10)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp.scaler)
        self.rng = np.random.default_rng(cfg.seed)
        self.order: list[int] = []
        self.pos = 0
        self.nonfinite_in_a_row = 0

    # sampling ---------------------------------------------------------------------------------
    def _next_images(self) -> list[int]:
        out = []
        for _ in range(min(self.cfg.batch_size, len(self.train_items))):
            if self.pos >= len(self.order):  # a new epoch: every image once, in a seeded order
                self.order = self.rng.permutation(len(self.train_items)).tolist()
                self.pos = 0
            out.append(self.order[self.pos])
            self.pos += 1
        return out

    def sample_batch(self) -> list[tuple[int, np.ndarray]]:
        images = self._next_images()
        pairs = [(i, k) for i in images for k in range(len(self.train_items[i].boxes))]
        if len(pairs) > self.cfg.n_objects_per_batch:
            keep = np.sort(self.rng.choice(len(pairs), self.cfg.n_objects_per_batch, replace=False))
            pairs = [pairs[j] for j in keep]
        out = []
        for i in images:
            objs = np.array([k for (j, k) in pairs if j == i], dtype=np.int64)
            if len(objs):
                out.append((i, objs))
        return out

    def _use_box(self, iteration: int, n: int) -> np.ndarray:
        if self.cfg.prompt_mode == "box":
            return np.ones(n, dtype=bool)
        if self.cfg.prompt_mode == "point":
            return np.zeros(n, dtype=bool)
        return (iteration + np.arange(n)) % 2 == 0

    def make_groups(self, iteration: int, batch: list[tuple[int, np.ndarray]]) -> list[_Group]:
        groups, offset = [], 0
        for i, objs in batch:
            item = self.train_items[i]
            use_box = self._use_box(iteration + offset, len(objs))
            offset += len(objs)
            for is_box in (True, False):
                sel = objs[use_box == is_box]
                if len(sel) == 0:
                    continue
                target = item.target_low[torch.from_numpy(sel).to(item.target_low.device)]
                if is_box:
                    boxes = jitter_boxes(item.boxes[sel], self.rng, item.frame.original_size, self.cfg.box_jitter)
                    groups.append(_Group(i, item, sel, self._t(item.frame.boxes_to_input(boxes)), None, None, target))
                else:
                    pts = sample_points([item.flat_idx[k] for k in sel], item.frame.original_size[1], self.rng,
                                        self.cfg.n_points)
                    labels = torch.ones(pts.shape[:2], dtype=torch.long, device=self.device)
                    groups.append(_Group(i, item, sel, None, self._t(item.frame.coords_to_input(pts)), labels, target))
        return groups

    def _t(self, a) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.float32, device=self.device)

    # one iteration ----------------------------------------------------------------------------
    def _decode(self, g: _Group):
        with self.amp.autocast(self.device):
            low, iou = decode_input_frame(self.model, g.item.embedding, boxes=g.boxes, points=g.points,
                                          point_labels=g.labels, mask_input=g.mask_input)
        return low, iou

    def train_step(self, iteration: int, embeddings: dict[int, torch.Tensor] | None = None) -> float:
        """One optimisation step; returns the loss, or NaN when the step was skipped as non-finite.

        `embeddings` overrides cached embeddings by train-item index (the benchmark's encoder-every-
        iteration baseline passes freshly computed ones).
        """
        self.model.mask_decoder.train()
        self.model.prompt_encoder.train()
        batch = self.sample_batch()
        groups = self.make_groups(iteration, batch)
        if embeddings:
            for g in groups:
                if g.idx in embeddings:
                    g.item = dataclasses.replace(g.item, embedding=embeddings[g.idx])
        n_total = sum(len(g.objs) for g in groups)
        rounds = self.cfg.n_sub_iteration
        self.optimizer.zero_grad(set_to_none=True)
        total, finite = 0.0, True
        for r in range(rounds):
            for g in groups:
                low, iou = self._decode(g)
                logits = crop_low_res(low[:, 0], g.item.frame)
                per_obj = sam_loss(logits, iou[:, 0], g.target)
                loss = per_obj.sum() / (n_total * rounds)
                if not torch.isfinite(loss):
                    finite = False
                    break
                self.scaler.scale(loss).backward()
                total += float(loss.detach())
                if r < rounds - 1:
                    self._add_corrections(g, logits.detach(), low.detach())
            if not finite:
                break
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise FloatingPointError(
                    f"training diverged: {self.nonfinite_in_a_row} non-finite losses in a row at iteration "
                    f"{iteration} (lr={self.optimizer.param_groups[0]['lr']:g}, amp={self.amp.label}); "
                    f"lower lr or use amp_dtype='bf16' or amp=False")
            log.warning("iteration %d: non-finite loss, step skipped", iteration)
            return float("nan")
        self.nonfinite_in_a_row = 0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total

    def _add_corrections(self, g: _Group, logits: torch.Tensor, low: torch.Tensor) -> None:
        coords, labels = corrective_clicks(logits > 0, g.target > 0.5, by_area=self.cfg.click_largest_area)
        # A low-res pixel covers a 4x4 block of the input frame; click its centre.
        scale = IMAGE_SIZE / LOW_RES
        coords = torch.where(labels.unsqueeze(-1) >= 0, coords * scale + (scale - 1) / 2, coords)
        g.points = coords if g.points is None else torch.cat([g.points, coords], dim=1)
        g.labels = labels if g.labels is None else torch.cat([g.labels, labels], dim=1)
        g.mask_input = low.float()

    # validation -------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, chunk: int = 32) -> dict:
        """Per-instance Dice and IoU with unjittered box prompts, at original resolution."""
        self.model.eval()
        dices, ious = [], []
        for item in self.val_items:
            for start in range(0, len(item.boxes), chunk):
                with self.amp.autocast(self.device):
                    d = decode(self.model, item.embedding, item.frame, boxes=item.boxes[start:start + chunk])
                dice, iou = dice_iou(d.masks[:, 0].cpu(), item.masks[start:start + chunk])
                dices.append(dice)
                ious.append(iou)
        dice = torch.cat(dices) if dices else torch.zeros(0)
        iou = torch.cat(ious) if ious else torch.zeros(0)
        return {"dice": float(dice.mean()) if len(dice) else float("nan"),
                "iou": float(iou.mean()) if len(iou) else float("nan"), "n": int(len(dice))}

    # state ------------------------------------------------------------------------------------
    def state(self) -> dict:
        np_state = np.random.get_state()
        rng = {"python": random.getstate(),
               "numpy_global": [np_state[0], np_state[1].tolist(), *np_state[2:]],
               "torch": torch.get_rng_state(),
               "sampler": self.rng.bit_generator.state}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"trainable_state": trainable_state_dict(self.model),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng,
                "sampler": {"order": list(self.order), "pos": self.pos},
                "nonfinite_in_a_row": self.nonfinite_in_a_row}

    def load_state(self, ckpt: dict) -> None:
        load_trainable_state_dict(self.model, {k: v.to(self.device) for k, v in ckpt["trainable_state"].items()})
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.amp.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt["rng"]
        random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
        g = rng["numpy_global"]
        np.random.set_state((g[0], np.array(g[1], dtype=np.uint32), *g[2:]))
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.rng.bit_generator.state = rng["sampler"]
        self.order, self.pos = list(ckpt["sampler"]["order"]), int(ckpt["sampler"]["pos"])
        self.nonfinite_in_a_row = int(ckpt.get("nonfinite_in_a_row", 0))


# -- checkpoints ---------------------------------------------------------------------------------

def _trajectory_config(cfg: TrainConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in _RESUMABLE_ACROSS}


def _load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is unreadable: {str(e).splitlines()[0]}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a sam-pipeline training checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def _find_resume(cfg: TrainConfig, latest: Path, store, run_id: str | None, identity: dict) -> dict | None:
    if not cfg.resume:
        return None
    if not latest.exists() and store is not None and run_id:
        # A retry on a fresh pod: both checkpoints come back from the store (best.pt is what gets exported).
        for name in ("best.pt", "latest.pt"):
            key = store.key("runs", run_id, "checkpoints", name)
            if store.stat(key) is not None:
                log.info("fetching %s", store.uri(key))
                store.get_file(key, latest.with_name(name))
    if not latest.exists():
        return None
    ckpt = _load_checkpoint(latest)
    mismatched = [k for k, v in identity.items() if ckpt.get(k) != v]
    if mismatched:
        log.warning("not resuming from %s: it belongs to another run (different %s); starting fresh",
                    latest, ", ".join(mismatched))
        return None
    return ckpt


def _checkpoint(trainer: Trainer, iteration: int, best: dict, history: dict, identity: dict, cfg: TrainConfig):
    return {"format_version": CHECKPOINT_FORMAT, "iteration": iteration, "config": asdict(cfg),
            "best_val_dice": best["dice"], "best_iteration": best["iteration"], "history": history,
            "model_type": cfg.model_type, **identity, **trainer.state()}


def _upload(store, run_id, path: Path) -> None:
    if store is not None and run_id:
        store.put_file(store.key("runs", run_id, "checkpoints", path.name), path)


# -- entry points --------------------------------------------------------------------------------

def train(cfg: TrainConfig, weights_path: str | Path, train_samples: Sequence, val_samples: Sequence, *,
          store=None, run_id: str | None = None, dataset_hash: str = "", weights_sha256: str = "") -> TrainResult:
    """Fine-tune from `weights_path` on samples (objects with id, image HxWx3 uint8, mask HxW ids,
    image_sha256). Resumes from `checkpoints/<name>/latest.pt` (or the object store's copy under
    runs/<run_id>/) when it belongs to the same run; writes best.pt, latest.pt and model.pt there."""
    t_start = time.perf_counter()
    cfg.validate()
    train_samples = list(train_samples)
    val_samples = list(val_samples)
    if not train_samples:
        raise ValueError("no training samples")
    if cfg.debug_with_one_example:
        # The seed's fast check: one image, trained and validated on itself.
        train_samples = train_samples[:1]
        val_samples = train_samples
    if not val_samples:
        raise ValueError("no validation samples: best.pt is chosen by validation Dice")
    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg, device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)

    if not weights_sha256:
        from components.hashing import sha256_file
        weights_sha256 = sha256_file(weights_path)
    model = build_sam(cfg.model_type, weights_path, device)
    # On CPU TinyViT is faster one image at a time (measured: 2 images take 2.8 s at batch 1, 4.0 s at 2).
    embed_batch = cfg.embed_batch_size if device.type == "cuda" else 1
    cache = EmbeddingCache(model, weights_sha256, store, batch_size=embed_batch, amp=amp.enabled)
    train_items = _prepare(train_samples, cache.get(train_samples), device)
    val_items = _prepare(val_samples, cache.get(val_samples), device)
    if not train_items:
        raise ValueError("no training sample has any instance")

    identity = {"weights_sha256": weights_sha256, "dataset_hash": dataset_hash,
                "samples_fingerprint": samples_fingerprint(train_samples) + samples_fingerprint(val_samples),
                "trajectory_config": _trajectory_config(cfg)}
    if run_id:
        # Resume is for retries of the same run; a new run (a second `sam-pipeline run`, tonight's
        # scheduled retraining) starts fresh even when everything else matches.
        identity["run_id"] = run_id
    out_dir = Path(cfg.checkpoint_dir) / cfg.checkpoint_name
    out_dir.mkdir(parents=True, exist_ok=True)
    best_path, latest_path, model_path = out_dir / "best.pt", out_dir / "latest.pt", out_dir / "model.pt"

    trainer = Trainer(cfg, model, train_items, val_items, device, amp)
    history = {"iteration": [], "loss": [], "lr": [], "val_iteration": [], "val_dice": [], "val_iou": []}
    best = {"dice": -math.inf, "iteration": 0}
    start, resumed_from = 0, None
    ckpt = _find_resume(cfg, latest_path, store, run_id, identity)
    if ckpt is not None:
        trainer.load_state(ckpt)
        start = resumed_from = int(ckpt["iteration"])
        history = ckpt["history"]
        best = {"dice": float(ckpt["best_val_dice"]), "iteration": int(ckpt["best_iteration"])}
        log.info("resumed at iteration %d (best val Dice %.3f)", start, best["dice"])
    else:
        best_path.unlink(missing_ok=True)  # a stale best.pt from another run must not be exported

    if ckpt is None:
        # Iteration 0: the untrained decoder's score, the reference point of every curve.
        metrics = trainer.validate()
        history["val_iteration"].append(0)
        history["val_dice"].append(metrics["dice"])
        history["val_iou"].append(metrics["iou"])
        tqdm.write(f"Before training: Dice Score = {metrics['dice']:.3f}")

    t_train = time.perf_counter()
    bar = tqdm(range(start, cfg.n_iterations), initial=start, total=cfg.n_iterations, desc="finetune",
               disable=not cfg.show_progress, dynamic_ncols=True)
    last_dice = best["dice"] if best["dice"] > -math.inf else float("nan")
    for it in bar:
        iteration = it + 1
        loss = trainer.train_step(iteration)
        history["iteration"].append(iteration)
        history["loss"].append(loss)
        history["lr"].append(trainer.optimizer.param_groups[0]["lr"])
        if iteration % cfg.val_every == 0 or iteration == cfg.n_iterations:
            metrics = trainer.validate()
            last_dice = metrics["dice"]
            trainer.scheduler.step(metrics["dice"])
            history["val_iteration"].append(iteration)
            history["val_dice"].append(metrics["dice"])
            history["val_iou"].append(metrics["iou"])
            improved = metrics["dice"] > best["dice"]
            if improved:
                best = {"dice": metrics["dice"], "iteration": iteration}
            epoch = iteration // cfg.val_every - 1 if iteration % cfg.val_every == 0 else iteration // cfg.val_every
            tqdm.write(f"Epoch {epoch}: Dice Score = {metrics['dice']:.3f} (best: {best['dice']:.3f})")
            state = _checkpoint(trainer, iteration, best, history, identity, cfg)
            if improved:
                atomic_torch_save(state, best_path)
                _upload(store, run_id, best_path)
            atomic_torch_save(state, latest_path)
            _upload(store, run_id, latest_path)
        bar.set_postfix(loss=f"{loss:.4f}", dice=f"{last_dice:.3f}")
    bar.close()
    train_seconds = time.perf_counter() - t_train

    if not best_path.exists():
        raise RuntimeError(f"no best checkpoint at {best_path}: it should have been written beside latest.pt "
                           f"(or fetched with it from the object store)")
    best_state = _load_checkpoint(best_path)
    load_trainable_state_dict(model, {k: v.to(device) for k, v in best_state["trainable_state"].items()})
    export_state_dict(model, model_path)
    done = cfg.n_iterations - start
    return TrainResult(
        best_path=best_path, latest_path=latest_path, model_path=model_path,
        best_val_dice=float(best_state["best_val_dice"]), history=history,
        best_iteration=int(best_state["best_iteration"]), iterations=cfg.n_iterations, resumed_from=resumed_from,
        device=str(device), amp=amp.label, seconds=time.perf_counter() - t_start, train_seconds=train_seconds,
        embedding_stats=dict(cache.stats, it_per_s=(done / train_seconds) if done > 0 and train_seconds > 0 else None),
    )


# -- the pipeline step ---------------------------------------------------------------------------

def write_report(path: str | Path, metrics: dict, history: dict) -> Path:
    """The finetune step's page: the run's metrics and its loss / validation Dice curves."""
    from components.report import Report

    return Report("SAM fine-tuning").kv(metrics).history(history).write(path)


def finetune_step(weights_path: str, manifest_path: str, debug_with_one_example: bool = False,
                  checkpoint_name: str = "sam_instance_seg", model_type: str = "vit_t", batch_size: int = 1,
                  n_objects_per_batch: int = 25, device: str = "cuda", n_iterations: int = 200,
                  n_sub_iteration: int = 2, lr: float = 1e-5, seed: int = 0, val_every: int = 10,
                  run_id: str = "", s3_endpoint: str = "", bucket: str = "", prefix: str = "",
                  out_model_path: str = "model.pt", out_report_path: str = "report.html",
                  checkpoint_dir: str = "checkpoints") -> dict:
    """The KFP component body: read the dataset version named by the manifest, train, write the model
    (plain state dict) and an HTML report, and return the run's metrics."""
    from components.datasets.reader import load_manifest, load_split
    from components.hashing import sha256_file
    from components.storage import ObjectStore, S3Config

    store = ObjectStore(S3Config.from_env(endpoint=s3_endpoint, bucket=bucket, prefix=prefix))
    manifest = load_manifest(store, manifest_path)
    train_samples = load_split(store, manifest, "train")
    val_samples = [] if debug_with_one_example else load_split(store, manifest, "val")
    cfg = TrainConfig(debug_with_one_example=bool(debug_with_one_example), checkpoint_name=checkpoint_name,
                      model_type=model_type, batch_size=int(batch_size), n_objects_per_batch=int(n_objects_per_batch),
                      device=device, n_iterations=int(n_iterations), n_sub_iteration=int(n_sub_iteration),
                      lr=float(lr), seed=int(seed), val_every=int(val_every), checkpoint_dir=checkpoint_dir)
    weights_sha = sha256_file(weights_path)
    result = train(cfg, weights_path, train_samples, val_samples, store=store, run_id=run_id or None,
                   dataset_hash=manifest["content_hash"], weights_sha256=weights_sha)
    out_model = Path(out_model_path)
    out_model.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.model_path, out_model)
    val_dice = result.history["val_dice"]
    metrics = {
        "best_val_dice": round(result.best_val_dice, 6),
        "initial_val_dice": round(val_dice[0], 6) if val_dice and result.resumed_from is None else None,
        "best_iteration": result.best_iteration,
        "iterations": result.iterations,
        "resumed_from": result.resumed_from,
        "final_loss": next((x for x in reversed(result.history["loss"]) if x == x), None),
        "train_images": 1 if debug_with_one_example else len(train_samples),
        "val_images": 1 if debug_with_one_example else len(val_samples),
        "model_type": model_type,
        "device": result.device,
        "amp": result.amp,
        "iterations_per_second": result.embedding_stats.get("it_per_s"),
        "embeddings_computed": result.embedding_stats.get("computed"),
        "embeddings_from_store": result.embedding_stats.get("store"),
        "seconds": round(result.seconds, 1),
        "weights_sha256": weights_sha,
        "dataset_content_hash": manifest["content_hash"],
        "model_sha256": sha256_file(out_model),
        "run_id": run_id,
    }
    if run_id:
        metrics["checkpoint_uri"] = store.uri(store.key("runs", run_id, "checkpoints", "best.pt"))
        metrics["history_uri"] = store.uri(store.put_json(store.key("runs", run_id, "history.json"),
                                                          result.history).key)
    write_report(out_report_path, metrics, result.history)
    return metrics
