"""One training iteration, validation, and the state a checkpoint holds.

Per iteration: sample up to `n_objects_per_batch` objects from `batch_size` distinct images, prompt
each with its jittered box or a point inside it (alternating), then `n_sub_iteration - 1` corrective
rounds (a positive click deep in the largest missed region, a negative one deep in the largest false
region, and, in half of the rounds, the previous logits as mask prompt). Every round is ONE decoder
call for all objects of the iteration (components/sam/prompt_batch.py), eager or, with
TrainConfig.compile, through torch.compile at a padded object count (compiled_step.py). Loss per
object: Dice + MSE(predicted IoU, IoU) on output 0, or for a single-point prompt the best of outputs
1-3 (SAM's recipe for ambiguous prompts), averaged over rounds and objects.

The loss is computed at the decoder's 256x256 resolution, against the ground truth mapped into that
frame exactly as postprocessing maps predictions back (transforms.masks_to_low_res): postprocessing is
a fixed bilinear upsampling, so this is the same objective without upsampling N masks to 1024 and
back each step. Validation Dice/IoU is always at the original image resolution.

No host synchronisation inside a step: prompts are drawn on the host before it, the loss accumulates
on the device, and the one finite check comes at the end (a GPU then runs a whole round ahead of
Python). The exception is the corrective-click erosion loop, whose `any()` ends it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from components.sam.device import to_device
from components.sam.metrics import dice_iou
from components.sam.model import load_trainable_state_dict, set_trainable, trainable_state_dict
from components.sam.prompt_batch import decode_prompts, first_round_tokens, take
from components.sam.prompts import corrective_clicks, jitter_boxes, sample_points
from components.sam.transforms import LOW_RES, IMAGE_SIZE
from components.training.compiled_step import DecoderRound, object_weights, pad_batch, padded_size
from components.training.config import AmpSettings, TrainConfig, resolve_compile
from components.training.data import Item, TrainBatches, in_order, loader, prepare_items  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

MAX_NONFINITE_IN_A_ROW = 5
# Devices with a fused Adam kernel (torch/utils/_foreach_utils.py: _get_fused_kernels_supported_devices).
_FUSED_ADAM_DEVICES = ("cuda", "cpu")


# -- the trainer ---------------------------------------------------------------------------------

@dataclass
class Batch:
    """All objects of one iteration, ready for the decoder (N objects over B images)."""
    embeddings: torch.Tensor  # (B, 256, 64, 64)
    image_index: torch.Tensor | None  # (N,) into embeddings; None when B == 1 (broadcast)
    coords: torch.Tensor  # (N, K, 2) first-round prompt tokens, input frame
    labels: torch.Tensor  # (N, K)
    target: torch.Tensor  # (N, 256, 256)
    valid: torch.Tensor  # (N, 256, 256)
    groups: list | None = None  # prompt_batch.decode_groups: None = all objects in one call


class Trainer:
    """The training state and one iteration of it; `train()` drives it, benchmarks reuse it.

    `train_items` and `val_items` are map-style datasets of `Item`s (data.SplitItems over a split; a list of
    items is one too), read through torch's DataLoader (data.TrainBatches, data.loader)."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, train_items, val_items, device: torch.device,
                 amp: AmpSettings):
        self.cfg, self.model, self.device, self.amp = cfg, model, device, amp
        self.batches = TrainBatches(train_items, cfg.batch_size, cfg.seed, device)
        self.val_items, self._val_loader = val_items, None
        self.params = set_trainable(model, cfg.freeze_prompt_encoder)
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr, **self._adam_impl())
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode="max", factor=0.9,
                                                                    patience=10)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp.scaler)
        self.rng = np.random.default_rng(cfg.seed)  # prompts, objects, mask feeding (the sampler has its own)
        self.nonfinite_in_a_row = 0
        self.decoder_round = DecoderRound(model, amp, device, compiled=resolve_compile(cfg, device))

    def _adam_impl(self) -> dict:
        # Fused Adam is one kernel (CUDA) or one op (CPU) for all parameters. The unfused CUDA Adam is ~40
        # kernels per parameter tensor (a third of a step's GPU time in issue 10's trace), and the
        # per-parameter and foreach paths read each tensor's step count back with .item(): ~100 host
        # synchronisations per step. Where a device has no fused kernel, the multi-tensor path.
        return {"fused": True} if self.device.type in _FUSED_ADAM_DEVICES else {"foreach": True}

    # sampling ---------------------------------------------------------------------------------
    def sample_batch(self) -> list[tuple[int, Item, np.ndarray]]:
        """The next batch's images (data.TrainBatches) and up to `n_objects_per_batch` of their objects."""
        loaded = self.batches.next()
        pairs = [(b, k) for b, (_, item) in enumerate(loaded) for k in range(len(item.boxes))]
        if len(pairs) > self.cfg.n_objects_per_batch:
            keep = np.sort(self.rng.choice(len(pairs), self.cfg.n_objects_per_batch, replace=False))
            pairs = [pairs[j] for j in keep]
        out = []
        for b, (i, item) in enumerate(loaded):
            objs = np.array([k for (j, k) in pairs if j == b], dtype=np.int64)
            if len(objs):
                out.append((i, item, objs))
        return out

    def _use_box(self, iteration: int, n: int) -> np.ndarray:
        if self.cfg.prompt_mode == "box":
            return np.ones(n, dtype=bool)
        if self.cfg.prompt_mode == "point":
            return np.zeros(n, dtype=bool)
        return (iteration + np.arange(n)) % 2 == 0

    def make_batch(self, iteration: int, batch: list[tuple[int, Item, np.ndarray]],
                   embeddings: dict[int, torch.Tensor] | None = None) -> Batch:
        """First-round prompts for every object, drawn on the host (numpy, seeded), then moved in one
        copy per tensor."""
        n = sum(len(objs) for _, _, objs in batch)
        boxes = np.full((n, 4), np.nan)
        points = np.full((n, self.cfg.n_points, 2), np.nan)
        image_index = np.zeros(n, dtype=np.int64)
        embs, targets, valids, start = [], [], [], 0
        for b, (i, item, objs) in enumerate(batch):
            sl = slice(start, start + len(objs))
            use_box = self._use_box(iteration + start, len(objs))
            image_index[sl] = b
            box_objs, pt_objs = objs[use_box], objs[~use_box]
            if len(box_objs):
                jittered = jitter_boxes(item.boxes[box_objs], self.rng, item.frame.original_size, self.cfg.box_jitter)
                boxes[start + np.flatnonzero(use_box)] = item.frame.boxes_to_input(jittered)
            if len(pt_objs):
                pts = sample_points([item.flat_idx[k] for k in pt_objs], item.frame.original_size[1], self.rng,
                                    self.cfg.n_points)
                points[start + np.flatnonzero(~use_box)] = item.frame.coords_to_input(pts)
            sel = torch.from_numpy(objs).to(item.target_low.device)
            targets.append(item.target_low[sel])
            valids.append(item.valid.expand(len(objs), -1, -1))
            embs.append(embeddings[i] if embeddings and i in embeddings else item.embedding)
            start += len(objs)
        k = max(2, self.cfg.n_points + 1)  # a box's two corners, or the points and SAM's padding token
        coords, labels = first_round_tokens(self._t(boxes), self._t(points), n, k, self.device)
        groups = None
        is_box = ~np.isnan(boxes[:, 0])
        if self.cfg.n_points > 1 and is_box.any() and not is_box.all():
            groups = [(self._t(np.flatnonzero(is_box), torch.long), self._t(np.arange(2), torch.long)),
                      (self._t(np.flatnonzero(~is_box), torch.long), self._t(np.arange(k), torch.long))]
        one = len(batch) == 1
        return Batch(groups=groups, embeddings=embs[0].unsqueeze(0) if one else torch.stack(embs),
                     image_index=None if one else self._t(image_index, torch.long),
                     coords=coords, labels=labels,
                     target=targets[0] if one else torch.cat(targets),
                     valid=valids[0] if one else torch.cat(valids))

    def _t(self, a: np.ndarray, dtype=torch.float32) -> torch.Tensor:
        return to_device(torch.from_numpy(np.ascontiguousarray(a)).to(dtype), self.device)

    # one iteration ----------------------------------------------------------------------------
    def round_loss(self, b: Batch, coords: torch.Tensor, labels: torch.Tensor, mask_input: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One prompting round, one decoder call: ((N,) loss per object, (N, 4, 256, 256) logits, (N,) the
        output the next round builds on (compiled_step.round_forward)."""
        return self.decoder_round(b.embeddings, b.image_index, coords, labels, mask_input, b.target, b.valid,
                                  b.groups)

    def corrections(self, b: Batch, coords: torch.Tensor, labels: torch.Tensor, chosen: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next round's tokens: this round's plus a corrective click pair per object, computed on the
        device from the chosen (N, 256, 256) logits."""
        clicks, click_labels = corrective_clicks((chosen > 0) & b.valid, b.target > 0.5,
                                                 by_area=self.cfg.click_largest_area)
        # A low-res pixel covers a 4x4 block of the input frame; click its centre.
        scale = IMAGE_SIZE / LOW_RES
        clicks = torch.where(click_labels.unsqueeze(-1) >= 0, clicks * scale + (scale - 1) / 2, clicks)
        return torch.cat([coords, clicks], dim=1), torch.cat([labels, click_labels], dim=1), chosen

    def train_step(self, iteration: int, embeddings: dict[int, torch.Tensor] | None = None) -> float:
        """One optimisation step; returns the loss, or NaN when the step was skipped as non-finite.

        `embeddings` overrides cached embeddings by train-item index (the benchmark's encoder-every-
        iteration baseline passes freshly computed ones).
        """
        self.model.mask_decoder.train()
        self.model.prompt_encoder.train()
        b = self.make_batch(iteration, self.sample_batch(), embeddings)
        rounds = self.cfg.n_sub_iteration
        # A compiled round runs at a few fixed object counts: padding rows weigh 0 (compiled_step.py).
        n = b.coords.shape[0]
        size = padded_size(n) if self.decoder_round.compiled and b.groups is None else n
        b = pad_batch(b, size)
        weight = object_weights(n, size, 1.0 / (n * rounds), self.device)
        # Decided on the host up front: whether each later round also gets the previous mask as a prompt.
        # micro-sam feeds it with probability 0.5, so the model also learns to correct from clicks alone
        # (what a user's second click gives it); feeding it always leaves that case untrained.
        feed_mask = self.rng.random(rounds) < self.cfg.mask_prompt_prob
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        coords, labels, mask_input = b.coords, b.labels, None
        for r in range(rounds):
            per_obj, low, chosen_index = self.round_loss(b, coords, labels, mask_input)
            loss = (per_obj * weight).sum()
            self.scaler.scale(loss).backward()  # per round: frees this round's graph before the next
            total += loss.detach()
            if r < rounds - 1:
                coords, labels, chosen = self.corrections(b, coords, labels, take(low.detach(), chosen_index))
                mask_input = chosen.unsqueeze(1).float() if feed_mask[r + 1] else None
        if not bool(torch.isfinite(total)):  # the step's one host synchronisation
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
        return float(total)

    # validation -------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        """Per-instance Dice and IoU with unjittered box prompts, at original resolution: evaluation's own
        decoding (prompt_batch.decode_prompts), so best.pt is chosen by the numbers the gate will see.

        In fp32 even when training uses autocast, like evaluation; validation is a few decoder calls, so
        autocast would save nothing."""
        self.model.eval()
        dices, ious = [], []
        if self._val_loader is None:  # one per trainer: its workers stay between validations
            self._val_loader = loader(self.val_items, self.device)
        for item in in_order(self.val_items, self._val_loader, self.device):
            masks = decode_prompts(self.model, item.embedding, item.frame, item.boxes, None).masks
            dice, iou = dice_iou(masks, item.masks, item.ignore)
            dices.append(dice)
            ious.append(iou)
        dice = torch.cat(dices) if dices else torch.zeros(0)
        iou = torch.cat(ious) if ious else torch.zeros(0)
        return {"dice": float(dice.mean()) if len(dice) else float("nan"),
                "iou": float(iou.mean()) if len(iou) else float("nan"), "n": int(len(dice))}

    # state ------------------------------------------------------------------------------------
    def state(self) -> dict:
        """What a checkpoint holds of the trainer (checkpoints.Checkpoints adds the run's progress and the
        process-wide random states)."""
        return {"trainable_state": trainable_state_dict(self.model),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "prompt_rng": self.rng.bit_generator.state,
                "sampler": self.batches.state(),
                "nonfinite_in_a_row": self.nonfinite_in_a_row}

    def load_state(self, ckpt: dict) -> None:
        load_trainable_state_dict(self.model, {k: v.to(self.device) for k, v in ckpt["trainable_state"].items()})
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group in self.optimizer.param_groups:  # a checkpoint from another device keeps this one's Adam
            group.update({"fused": None, "foreach": None, **self._adam_impl()})
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.amp.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.rng.bit_generator.state = ckpt["prompt_rng"]
        self.batches.load_state(ckpt["sampler"])
        self.nonfinite_in_a_row = int(ckpt.get("nonfinite_in_a_row", 0))

    def close(self) -> None:
        """Ends the loaders' worker processes."""
        self.batches.close()
        self._val_loader = None  # its iterator, and with it the workers, go with it
