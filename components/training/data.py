"""What finetune and evaluate read: a split of a dataset version through torch's DataLoader.

One route, whatever the dataset's size: a map-style `Dataset` over a split (`reader.SplitRefs`, or the
in-memory `reader.SampleSplit` of the same type) whose item i is the i-th image and mask with its embedding
from the store; `EpochSampler` draws the seeded order (every image once per epoch); a DataLoader loads a few
batches ahead in worker processes (PNG decoding and store reads), through pinned memory on CUDA. Memory holds
the manifest's entries and the items in flight, never the dataset.

`TrainBatches` keeps the sampler position of the batches the trainer has consumed (the loader's own copy of
the sampler runs ahead): that position is what a checkpoint holds, so a resumed run draws exactly the
batches an uninterrupted one would. An item is a pure function of its split entry and stored embedding,
whenever and in whichever worker it is loaded.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
import logging
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from components.errors import UserError
from components.label_values import IGNORE
from components.sam.embeddings import EmbeddingCache
from components.sam.prompts import instance_masks, masks_to_boxes
from components.sam.transforms import Frame, masks_to_low_res

log = logging.getLogger(__name__)

LOADER_WORKERS = 2  # processes per loader: loading is PNG decoding and store reads, small next to a step
PREFETCH_BATCHES = 2  # per worker
_SAMPLER_STREAM = 0x5A3  # the sampler's own random stream: the loader runs it ahead, prompts must not notice


@dataclass
class Failed:
    """A user-facing error met in a worker, re-raised as itself (one line) where the item is used."""
    error: Exception


@dataclass
class Item:
    """One image, ready for training/validation: its embedding, boxes, and targets in both frames."""
    id: str
    frame: Frame
    embedding: torch.Tensor | None  # (256, 64, 64); None until the main process recomputed a lost one
    boxes: np.ndarray  # (K, 4) original pixels
    flat_idx: list  # per object, np.flatnonzero of its mask (for point sampling)
    target_low: torch.Tensor  # (K, 256, 256) soft targets in the logits' frame, 0 in the padding
    valid: torch.Tensor  # (256, 256) bool: the part of the logits that maps back onto the image
    masks: torch.Tensor  # (K, H, W) bool at original size (metrics)
    ignore: torch.Tensor | None = None  # (H, W) bool: crowd regions (label_values.IGNORE), scored neither way

    def pin_memory(self) -> "Item":
        """What goes to the device, pinned (the DataLoader's pin_memory thread calls this on CUDA)."""
        return dataclasses.replace(self, embedding=None if self.embedding is None else self.embedding.pin_memory(),
                                   target_low=self.target_low.pin_memory(), valid=self.valid.pin_memory())

    def to(self, device: torch.device) -> "Item":
        """Embedding and low-res targets on `device`; masks stay on the host, where metrics are computed."""
        return dataclasses.replace(self, embedding=self.embedding.to(device, non_blocking=True),
                                   target_low=self.target_low.to(device, non_blocking=True),
                                   valid=self.valid.to(device, non_blocking=True))


def prepare_items(samples: Sequence, embeddings: Sequence[torch.Tensor | None]) -> list[Item]:
    """Samples (id, image, instance-id mask) and their encoder embeddings as training/validation items on
    the host; samples without any instance are skipped with a warning."""
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
        target, valid = masks_to_low_res(masks_t, frame)
        ignore = torch.from_numpy(mask == IGNORE) if (mask == IGNORE).any() else None
        if ignore is not None:
            # A low-res pixel touching a crowd region is left out of the loss (and of corrective clicks):
            # its target says neither object nor background.
            valid = valid & ~(masks_to_low_res(ignore[None], frame)[0][0] > 0)
            target = target * valid
        items.append(Item(id=s.id, frame=frame, embedding=emb, boxes=masks_to_boxes(masks),
                          flat_idx=[np.flatnonzero(m) for m in masks], target_low=target, valid=valid,
                          masks=masks_t, ignore=ignore))
    return items


@dataclass
class Scored:
    """Evaluation's item: a sample and its embedding."""
    sample: object
    embedding: torch.Tensor | None

    def pin_memory(self) -> "Scored":
        return Scored(self.sample, self.embedding.pin_memory()) if self.embedding is not None else self

    def to(self, device: torch.device) -> "Scored":
        return Scored(self.sample, self.embedding.to(device, non_blocking=True))


class _SplitDataset(Dataset):
    """Item i of a split: its sample, with the embedding the store holds for it under `cache`'s encoder
    (None when it went missing or damaged since `ensure_embeddings`: the main process, which holds the
    encoder, recomputes it)."""

    def __init__(self, split, cache: EmbeddingCache):
        self.split, self.cache = split, cache

    def __len__(self) -> int:
        return len(self.split)

    def ensure_embeddings(self) -> None:
        """Every embedding in the store first (computed once where missing), so loading only reads."""
        self.cache.ensure([self.split.image_sha256(i) for i in range(len(self.split))],
                          lambda i: self.split.load(i).image)

    def __getitem__(self, i: int):
        try:
            sample = self.split.load(i)
            return self.build(sample, self.cache.from_store(sample.image_sha256))
        except UserError as e:
            return Failed(e)

    def build(self, sample, embedding):
        raise NotImplementedError

    def recompute_embedding(self, i: int) -> torch.Tensor:
        sample = self.split.load(i)
        return self.cache.stored_or_computed(sample.image_sha256, lambda: sample.image, sample.id)


class SplitItems(_SplitDataset):
    """Training and validation items (`Item`) of a split."""

    def build(self, sample, embedding) -> Item:
        items = prepare_items([sample], [embedding])
        if not items:
            raise ValueError(f"sample {sample.id} has no instance although the split counts it as annotated")
        return items[0]


class SplitSamples(_SplitDataset):
    """Evaluation's (sample, embedding) pairs of a split."""

    def build(self, sample, embedding) -> Scored:
        return Scored(sample, embedding)


def _ready(dataset, i: int, item, device: torch.device):
    if isinstance(item, Failed):
        raise item.error
    if item.embedding is None:
        item.embedding = dataset.recompute_embedding(i)
    return item.to(device)


def _as_list(batch: list) -> list:
    return batch


def _the_item(item):
    return item


def loader(dataset: Dataset, device: torch.device, *, batch_sampler=None, workers: int = LOADER_WORKERS
           ) -> DataLoader:
    """torch's DataLoader over `dataset` (in `batch_sampler`'s batches, or one item at a time in order)."""
    workers = min(workers, len(dataset))
    return DataLoader(dataset, batch_size=None if batch_sampler is None else 1, batch_sampler=batch_sampler,
                      collate_fn=_the_item if batch_sampler is None else _as_list, num_workers=workers,
                      prefetch_factor=PREFETCH_BATCHES if workers else None,
                      persistent_workers=workers > 0 and batch_sampler is None,  # validation: every val_every
                      pin_memory=device.type == "cuda",
                      # Its own generator: creating an iterator must not draw from torch's global RNG, which
                      # a checkpoint restores (a resumed run creates one where an uninterrupted run did not).
                      generator=torch.Generator().manual_seed(0))


def in_order(dataset: Dataset, data: DataLoader, device: torch.device) -> Iterator:
    """Every item of `dataset` once, in index order, on `device` (validation, evaluation)."""
    for i, item in enumerate(data):
        yield _ready(dataset, i, item, device)


class EpochSampler:
    """Batches of `batch_size` distinct image indices, every image once per epoch in a seeded order; its
    position (`state()`) is part of a checkpoint. Iterating it (the DataLoader does) runs a copy ahead."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, min(batch_size, n)
        self.rng = np.random.default_rng([seed, _SAMPLER_STREAM])
        self.order: list[int] = []
        self.pos = 0

    def next_images(self) -> list[int]:
        out: list[int] = []
        for _ in range(self.batch_size):
            if self.pos >= len(self.order):
                self.order, self.pos = self.rng.permutation(self.n).tolist(), 0
            if self.order[self.pos] in out:
                # A batch straddling two epochs: the new order starts with an image the batch already
                # holds (its objects would count twice). Swap in the next one it does not hold; the
                # image keeps its place in this epoch, just later.
                j = next(j for j in range(self.pos + 1, len(self.order)) if self.order[j] not in out)
                self.order[self.pos], self.order[j] = self.order[j], self.order[self.pos]
            out.append(self.order[self.pos])
            self.pos += 1
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return self._drawn(copy.deepcopy(self))  # copied now, not at the first next(): this position

    @staticmethod
    def _drawn(ahead: "EpochSampler") -> Iterator[list[int]]:
        while True:
            yield ahead.next_images()

    def state(self) -> dict:
        return {"order": list(self.order), "pos": self.pos, "rng": self.rng.bit_generator.state}

    def load_state(self, state: dict) -> None:
        self.order, self.pos = list(state["order"]), int(state["pos"])
        self.rng.bit_generator.state = state["rng"]


class TrainBatches:
    """The training batches, [(image index, item on `device`)], loaded ahead by a DataLoader in the sampler's
    order; `state()` is the position of the batches handed out so far."""

    def __init__(self, items: Dataset, batch_size: int, seed: int, device: torch.device,
                 workers: int = LOADER_WORKERS):
        self.items, self.device = items, device
        self.sampler = EpochSampler(len(items), batch_size, seed)
        self.workers = workers
        self._ahead: Iterator | None = None

    def next(self) -> list[tuple[int, Item]]:
        if self._ahead is None:  # from the current position: the start, or where a checkpoint left off
            self._ahead = iter(loader(self.items, self.device, batch_sampler=self.sampler, workers=self.workers))
        images = self.sampler.next_images()
        return [(i, _ready(self.items, i, item, self.device)) for i, item in zip(images, next(self._ahead))]

    def state(self) -> dict:
        return self.sampler.state()

    def load_state(self, state: dict) -> None:
        self._ahead = None
        self.sampler.load_state(state)

    def close(self) -> None:
        """Ends the loader's worker processes (the iterator owns them)."""
        self._ahead = None


def split_items(split, cache: EmbeddingCache) -> SplitItems:
    items = SplitItems(split, cache)
    items.ensure_embeddings()
    return items


def scored_pairs(split, cache: EmbeddingCache, device: torch.device) -> Iterator[Scored]:
    """The split's samples and embeddings under `cache`'s encoder (computed once where the store has none)."""
    samples = SplitSamples(split, cache)
    samples.ensure_embeddings()
    return in_order(samples, loader(samples, device), device)

