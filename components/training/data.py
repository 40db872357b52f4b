"""Training and validation items streamed from the object store with a bounded prefetch.

A dataset of 100,000 images has 200 GB of fp16 embeddings: they cannot all sit in memory. `StreamingItems`
is what the trainer indexes instead of a list (`items[i]`, `len(items)`, iteration, `prefetch(order)`): it
holds the manifest's entries, and at most `window` loaded items (image mask -> targets, embedding) plus the
few the current batch uses. Background threads load the next ones in the order the trainer drew for the
epoch (`prefetch(order)`), so the sampler's seeded order, and with it resume, is unchanged: an item is a pure
function of its manifest entry and the stored embedding, whenever and on whichever thread it is loaded.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import torch

from components.sam.device import to_device
from components.sam.embeddings import EmbeddingCache
from components.training.trainer import Item, prepare_items

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 16  # items loaded ahead: a few batches, ~2 MiB of embedding each
DEFAULT_WORKERS = 4  # threads: loading is object-store reads and PNG decoding (both release the GIL)


class StreamingItems:
    """Items 0..n-1 loaded by `load(i)` on background threads, at most `window` ahead of the reader."""

    def __init__(self, n: int, load: Callable[[int], Item], *, window: int = DEFAULT_WINDOW,
                 workers: int = DEFAULT_WORKERS, keep: int = 8):
        self.n, self._load, self.window, self.keep = n, load, max(1, window), max(1, keep)
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="items")
        self._lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._recent: OrderedDict[int, Item] = OrderedDict()  # the current batch reads an item several times
        self._order: list[int] = []
        self._pos_of: dict[int, int] = {}
        self._cursor = 0
        self.loaded = 0  # how many loads ran (tests and benchmarks: nothing is loaded twice per epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Item]:
        self.prefetch(range(self.n))
        for i in range(self.n):
            yield self[i]

    def prefetch(self, order: Iterable[int]) -> None:
        """The order items will be read in from now on (a new epoch's permutation, or a full pass)."""
        with self._lock:
            self._order = list(order)
            self._pos_of = {i: p for p, i in enumerate(self._order)}
            self._cursor = 0
            # Loads queued for the previous order that the new one does not need soon are dropped.
            soon = set(self._order[:self.window])
            for i in [i for i in self._pending if i not in soon]:
                if self._pending[i].cancel():
                    del self._pending[i]
            self._fill()

    def __getitem__(self, i: int) -> Item:
        if not 0 <= i < self.n:
            raise IndexError(i)
        with self._lock:
            if i in self._recent:
                self._recent.move_to_end(i)
                return self._recent[i]
            fut = self._pending.pop(i, None) or self._submit(i)
            pos = self._pos_of.get(i)
            if pos is not None and pos >= self._cursor:
                self._cursor = pos + 1
            self._fill()
        item = fut.result()
        with self._lock:
            self._recent[i] = item
            while len(self._recent) > self.keep:
                self._recent.popitem(last=False)
        return item

    def _submit(self, i: int) -> Future:
        def run():
            item = self._load(i)
            with self._lock:
                self.loaded += 1
            return item
        return self._pool.submit(run)

    def _fill(self) -> None:
        # Called with the lock held: keep the next `window` items of the order loading or loaded.
        for i in self._order[self._cursor:self._cursor + self.window]:
            if i not in self._pending and i not in self._recent:
                self._pending[i] = self._submit(i)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        self._recent.clear()


def split_loader(split, cache: EmbeddingCache, device: torch.device) -> Callable[[int], Item]:
    """`load(i)` for a `reader.SplitRefs`: image and mask from the store's local copy, embedding from the
    store (recomputed by the frozen encoder, as `EmbeddingCache.get` would, if it went missing or damaged)."""
    def load(i: int) -> Item:
        sample = split.load(i)
        emb = cache.stored_or_computed(sample.image_sha256, lambda: sample.image, sample.id)
        items = prepare_items([sample], [to_device(emb, device)], device)
        if not items:
            raise ValueError(f"sample {sample.id} has no instance although the manifest counts some")
        return items[0]
    return load


def stream_split(split, cache: EmbeddingCache, device: torch.device, **kwargs) -> StreamingItems:
    """A split's items, streamed. Its embeddings are first made sure of (computed once and stored when the
    embed step did not), one image at a time, so the stream itself only ever reads."""
    cache.ensure([split.image_sha256(i) for i in range(len(split))], lambda i: split.load(i).image)
    return StreamingItems(len(split), split_loader(split, cache, device), **kwargs)


class _Samples(StreamingItems):
    """A split's samples for evaluation: iterated with prefetch, and `[:k]` for the report's overlays."""

    def __init__(self, split, **kwargs):
        super().__init__(len(split), split.load, **kwargs)
        self.split = split

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.split.load(j) for j in range(*i.indices(self.n))]
        return super().__getitem__(i)


def stream_samples(split, **kwargs) -> StreamingItems:
    """Evaluation's view of a `reader.SplitRefs`: samples loaded a window ahead, never all at once."""
    return _Samples(split, **kwargs)


def stream_embeddings(samples: _Samples, cache: EmbeddingCache, device: torch.device, **kwargs) -> StreamingItems:
    """The embeddings of `stream_samples`' samples under `cache`'s encoder, in the same order: made sure of
    in the store first (computed once for an encoder the store has not seen), then streamed from it."""
    split = samples.split
    cache.ensure([split.image_sha256(i) for i in range(len(split))], lambda i: split.load(i).image)

    def load(i: int) -> torch.Tensor:
        return to_device(cache.stored_or_computed(split.image_sha256(i), lambda: split.load(i).image,
                                                  split.items[i]["id"]), device)

    return StreamingItems(len(split), load, **kwargs)
