"""The whole run at the seed's defaults, ours against micro-sam (issue 10's end-to-end target).

Each side is timed doing everything its trainer does in a real run, from loading the weights to the
last checkpoint: ours is one call of the product's `components.training.train()` (embedding pass of
the train and val images, validation before training and every `val_every` iterations, checkpoints,
model.pt); the peer is micro-sam's `SamTrainer` built as `micro_sam.training.train_sam` builds it, then
`fit(iterations=...)` (its image encoder on every training step and every validation image, a
validation and its best/latest checkpoints once per epoch).

The data: `benchmarks.pedestrians` images (170 by default, the size of Penn-Fudan, FudanPed and
PennPed ids), split into train/val exactly as the product's ingest splits by default (split seed 0,
`components.datasets.split.DEFAULT_FRACTIONS`, grouped by id prefix as the Penn-Fudan layout does);
the test split is left out, as training leaves it out. The settings: `TrainConfig`'s defaults, the
seed's (`-n 25 -s 2 -b 1 -i 200`, validation every 10).

Run through `benchmarks/peer_microsam.py --seed-defaults` (one process per side).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.peer_microsam import SEED, _sync, torch_em_pair
from benchmarks.pedestrians import pedestrian_samples
from components.datasets.split import assign_splits
from components.training.config import TrainConfig

SPLIT_SEED = 0  # ingest's default (`sam-pipeline run --split-seed`, the pipeline's split_seed)


def seed_split(n_images: int, size: int) -> tuple[list, list]:
    """(train, val) samples as the product's ingest would split these images by default."""
    samples = pedestrian_samples(n_images, (size, size))
    # Ingest's rule: each image's split from its content hash (components/datasets/split.py).
    splits = assign_splits([(s.id, s.image_sha256) for s in samples], SPLIT_SEED).splits
    # Membership, as the reader takes it (`reader.item_splits`): below 3 images val reuses train images.
    return [s for s in samples if "train" in splits[s.id]], [s for s in samples if "val" in splits[s.id]]


class _Timer:
    """Wall seconds spent in one method, summed over its calls (the device synchronised at both ends)."""

    def __init__(self, device):
        self.device, self.seconds, self.calls = device, 0.0, 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            _sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.device)
                self.seconds += time.perf_counter() - t0
                self.calls += 1
        return timed


def run_ours(args) -> dict:
    import torch

    from components.datasets.reader import SampleSplit
    from components.s3server import embedded_s3
    from components.storage import ObjectStore
    from components.training.loop import train
    from components.training.trainer import Trainer

    device = torch.device(args.device)
    train_samples, val_samples = (SampleSplit(s, name) for s, name in zip(seed_split(args.images, args.size),
                                                                           ("train", "val")))
    validation, validate = _Timer(device), Trainer.validate
    # train() does not report its validation time; timing the method from outside leaves loop.py alone.
    Trainer.validate = validation.wrap(validate)
    try:
        # An empty store: the embedding pass computes every embedding, as a first run does.
        with tempfile.TemporaryDirectory() as checkpoint_dir, embedded_s3() as s3:
            fp32 = args.amp_dtype == "fp32"
            cfg = TrainConfig(device=args.device, n_iterations=args.iters, val_every=args.val_every, amp=not fp32,
                              amp_dtype="fp16" if fp32 else args.amp_dtype, seed=0, show_progress=False, checkpoint_dir=checkpoint_dir,
                              resume=False)
            t0 = time.perf_counter()
            result = train(cfg, args.weights, train_samples, val_samples, store=ObjectStore(s3))
            _sync(device)
            whole_s = time.perf_counter() - t0
    finally:
        Trainer.validate = validate
    return {"side": "ours", "whole_s": whole_s, "embed_s": result.embedding_stats["encode_seconds"],
            "embedded": result.embedding_stats["computed"], "loop_s": result.train_seconds,
            "validation_s": validation.seconds, "validations": validation.calls, "iterations": result.iterations,
            "train_images": len(train_samples), "val_images": len(val_samples), "amp": result.amp,
            "best_val_dice": result.best_val_dice}


class PeerImages:
    """One split as torch_em's loaders yield it (`torch_em_pair`), built from its recipe.

    torch_em pickles `loader.dataset` into every checkpoint it writes (`Serializer.dump_data_loader`,
    torch_em/trainer/default_trainer.py); its own datasets hold file paths there
    (`ImageCollectionDataset.raw_images`, torch_em/data/image_collection_dataset.py), not pixels. This
    one pickles as its recipe too, so the peer's checkpoints cost what they cost in a real run, not
    a hundred MB of decoded images each."""

    def __init__(self, n_images: int, size: int, split: str):
        self.recipe = (n_images, size, split)
        train, val = seed_split(n_images, size)
        self.items = [torch_em_pair(s) for s in (val if split == "val" else train)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def __reduce__(self):
        return PeerImages, self.recipe


def run_peer(args) -> dict:
    import torch
    from torch.utils.data import DataLoader, RandomSampler
    from tqdm import tqdm

    import micro_sam.training as sam_training
    from micro_sam.training.util import ConvertToSamInputs

    device = torch.device(args.device)
    train_data, val_data = PeerImages(args.images, args.size, "train"), PeerImages(args.images, args.size, "val")
    # torch_em validates once per epoch, after len(train_loader) iterations (DefaultTrainer.fit,
    # torch_em/trainer/default_trainer.py): an epoch of `val_every` random training images makes it
    # validate every `val_every` iterations, like ours. fit(iterations=N) runs ceil(N / val_every) epochs.
    sampler = RandomSampler(train_data, num_samples=args.val_every, generator=torch.Generator().manual_seed(0))
    train_loader = DataLoader(train_data, batch_size=SEED.batch_size, sampler=sampler, num_workers=0)
    val_loader = DataLoader(val_data, batch_size=SEED.batch_size, shuffle=False, num_workers=0)
    t0 = time.perf_counter()
    # As micro_sam.training.train_sam builds it (micro_sam/training/training.py), without the UNETR decoder
    # and the tensorboard logger: AdamW at the seed's lr, ReduceLROnPlateau(mode min, factor 0.9,
    # patience 3), box distortion 0.025, mask prompts with p = 0.5. Early stopping off (train_sam's
    # default, 10 epochs without improvement, could end the peer's run before N iterations; ours has none).
    model = sam_training.get_trainable_sam_model(model_type=SEED.model_type, device=device,
                                                 checkpoint_path=args.weights, freeze=["image_encoder"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=SEED.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.9, patience=3)
    with tempfile.TemporaryDirectory() as save_root:
        trainer = sam_training.SamTrainer(
            name="peer", save_root=save_root, train_loader=train_loader, val_loader=val_loader, model=model,
            optimizer=optimizer, lr_scheduler=scheduler, device=device, logger=None, log_image_interval=100,
            mixed_precision=args.amp_dtype != "fp32", early_stopping=None,
            convert_inputs=ConvertToSamInputs(transform=model.transform, box_distortion_factor=0.025),
            n_objects_per_batch=SEED.n_objects_per_batch, n_sub_iteration=SEED.n_sub_iteration,
            compile_model=False, mask_prob=0.5)
        validation = _Timer(device)
        # fit() looks the method up on the instance each epoch, so this times every validation it runs.
        trainer._validate_mixed = validation.wrap(trainer._validate_mixed)
        t_fit = time.perf_counter()
        trainer.fit(iterations=args.iters, progress=tqdm(disable=True))
        _sync(device)
        end = time.perf_counter()
        checkpoints = sorted(p.name for p in Path(save_root).rglob("*.pt"))
    if trainer._iteration != args.iters:
        raise RuntimeError(f"the peer ran {trainer._iteration} iterations, expected {args.iters}")
    return {"side": "micro-sam", "whole_s": end - t0, "fit_s": end - t_fit, "validation_s": validation.seconds,
            "validations": validation.calls, "iterations": trainer._iteration, "epochs": trainer._epoch,
            "checkpoints": checkpoints, "train_images": len(train_data), "val_images": len(val_data),
            "amp": trainer.mixed_precision_dtype}


def table(peer: dict, ours: dict, device_name: str) -> str:
    rows = ["| trainer | whole run | embedding pass | validation (passes) | AMP |",
            "|---|---:|---:|---:|---|",
            f"| micro-sam `SamTrainer` (encoder on every training step and validation image) | "
            f"{peer['whole_s']:.1f} s | - | {peer['validation_s']:.1f} s ({peer['validations']}) | {peer['amp']} |",
            f"| this project, `train()` | {ours['whole_s']:.1f} s | {ours['embed_s']:.1f} s "
            f"({ours['embedded']} images) | {ours['validation_s']:.1f} s ({ours['validations']}) | {ours['amp']} |",
            f"| **ratio (micro-sam / ours)** | **{peer['whole_s'] / ours['whole_s']:.2f}x** | | | |"]
    return f"{device_name}\n\n" + "\n".join(rows)


def describe(args, peer: dict, ours: dict, load) -> str:
    """The paragraph under the RESULTS.md heading: what both did, and the target."""
    target = "5x" if args.device.startswith("cuda") else "2x"
    return (f"{args.images} Penn-Fudan-like {args.size}x{args.size} images split as ingest splits by default "
            f"({ours['train_images']} train, {ours['val_images']} val; test left out), a random `vit_t`, the "
            f"seed's defaults (`-n {SEED.n_objects_per_batch} -s {SEED.n_sub_iteration} -b {SEED.batch_size}`), "
            f"{args.iters} iterations, validation every {args.val_every}; micro-sam first, then ours, each in its "
            f"own process; load average {load[0][0]:.1f} before, {load[1][0]:.1f} after (1 min). Whole run: ours "
            f"= one `train()` call (weights, embedding pass of train and val, validation at iteration 0 and every "
            f"{args.val_every}, checkpoints, model.pt); micro-sam = model, optimizer and `SamTrainer` as `train_sam` "
            f"builds them + `fit()` (an epoch of {args.val_every} iterations, so a validation and best/latest "
            f"checkpoints every {args.val_every}). Target (issue 10): micro-sam / ours >= {target}.")
