"""One training iteration, validation, and the state a checkpoint holds.

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
import logging
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from components.sam.losses import sam_loss
from components.sam.metrics import dice_iou
from components.sam.model import (decode, decode_input_frame, load_trainable_state_dict, set_trainable,
                                  trainable_state_dict, use_broadcast_decoder)
from components.sam.prompts import corrective_clicks, instance_masks, jitter_boxes, masks_to_boxes, sample_points
from components.sam.transforms import LOW_RES, IMAGE_SIZE, Frame, crop_low_res, masks_to_low_res
from components.training.config import AmpSettings, TrainConfig

log = logging.getLogger(__name__)

MAX_NONFINITE_IN_A_ROW = 5


@dataclass
class Item:
    """One image, ready for training/validation: its embedding, boxes, and targets in both frames."""
    id: str
    frame: Frame
    embedding: torch.Tensor  # (256, 64, 64)
    boxes: np.ndarray  # (K, 4) original pixels
    flat_idx: list  # per object, np.flatnonzero of its mask (for point sampling)
    target_low: torch.Tensor  # (K, h256, w256) soft targets in the logits' frame, padding cropped
    masks: torch.Tensor  # (K, H, W) bool at original size (metrics)


def prepare_items(samples: Sequence, embeddings: list[torch.Tensor], device: torch.device) -> list[Item]:
    """Samples (id, image, instance-id mask) and their encoder embeddings as training/validation items;
    samples without any instance are skipped with a warning."""
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
        items.append(Item(
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
    item: Item
    objs: np.ndarray
    boxes: torch.Tensor | None
    points: torch.Tensor | None
    labels: torch.Tensor | None
    target: torch.Tensor
    mask_input: torch.Tensor | None = None


class Trainer:
    """The training state and one iteration of it; `train()` drives it, benchmarks reuse it."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, train_items: list[Item],
                 val_items: list[Item], device: torch.device, amp: AmpSettings, *, broadcast_decoder: bool = True):
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
                if hasattr(self.train_items, "prefetch"):  # a stream (training/data.py) loads ahead in this order
                    self.train_items.prefetch(self.order)
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
