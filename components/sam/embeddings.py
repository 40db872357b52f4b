"""Image embeddings of the frozen encoder, computed once per (weights, image) and cached.

The cache key is `embeddings/<weights_sha>/<precision>/<image_sha>` in the object store, so a retried, re-run
or scheduled pipeline skips the encoder when neither the checkpoint, the image nor the precision the encoder
ran in changed (fp32, bf16 and fp16 encoders give different bytes, and bf16 embeddings measurably train worse:
they must never stand in for fp32 ones). Each object
carries its sha256 (as every object the store writes does) and is checked on read: a damaged or
unreadable one is recomputed with a warning and written again, never trained on. Objects are
fp16 tensors (half the bytes). In memory they are float32, but always rounded through fp16 first:
a freshly computed embedding and one read back from the store are then bit-identical, which keeps
training reproducible (and resumable) whether or not the cache was warm.
"""
from __future__ import annotations

import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from components.errors import first_line
from components.sam.transforms import preprocess_image
from components.storage import IntegrityError

log = logging.getLogger(__name__)

EMBEDDING_SHAPE = (256, 64, 64)


def encode_bytes(embedding: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(embedding.detach().to("cpu", torch.float16).contiguous(), buf)
    return buf.getvalue()


def decode_bytes(data: bytes, what: str = "embedding") -> torch.Tensor:
    try:
        t = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what} is not a readable tensor: {first_line(e)}") from e
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != EMBEDDING_SHAPE:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what} has shape {shape}, expected {EMBEDDING_SHAPE}")
    return t.float()


def encoder_precision(device: torch.device, amp: bool | None) -> str:
    """The precision the encoder runs in: fp16 on CUDA with AMP (the default there), fp32 otherwise. Never bf16 on
    a CPU, even where training runs bf16 autocast: bf16 embeddings trained measurably worse than fp32 ones, while
    bf16 training on fp32 embeddings did not (benchmarks/RESULTS.md, "Training precision on CPU"). fp32 is also
    what the embed step, finetune and evaluate agree on whatever each one's AMP, so none recomputes another's."""
    amp = device.type == "cuda" if amp is None else amp
    return "fp16" if amp and device.type == "cuda" else "fp32"


def _autocast(precision: str, device: torch.device):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def encoder_batch(device: torch.device, configured: int) -> int:
    """Images per encoder call: the configured batch on CUDA; one on a CPU, where TinyViT is faster one image at a
    time (measured: 2 images took 2.8 s at batch 1, 4.0 s at batch 2)."""
    return max(1, int(configured)) if device.type == "cuda" else 1


def embedding_key(store, weights_sha256: str, precision: str, image_sha256: str) -> str:
    """Where the embedding of one image under one encoder and precision lives in the store."""
    return store.key("embeddings", weights_sha256, precision, image_sha256)


@contextmanager
def _conv_layout(encoder: nn.Module, device: torch.device):
    """Channels-last weights for the encoder's convolutions while it embeds on a CPU: oneDNN's kernels
    run TinyViT about 1.4x faster that way (bf16 autocast, one thread, 1024x1024 input; the input batch
    goes channels-last too). The model is shared with training and export, whose bytes must not depend on
    whether embeddings were computed, so the usual layout comes back afterwards."""
    if device.type != "cpu":
        yield
        return
    encoder.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        encoder.to(memory_format=torch.contiguous_format)


@torch.no_grad()
def compute_embeddings(model: nn.Module, images: Sequence[np.ndarray], *, batch_size: int = 4,
                       amp: bool | None = None) -> torch.Tensor:
    """(N, 256, 64, 64) float32 (fp16-rounded) embeddings of HxWx3 uint8 images, on the model's device.

    Resize and normalise run in a thread pool (PIL and torch release the GIL) while the encoder works;
    on CUDA the batch goes through pinned memory with a non-blocking copy."""
    device = next(model.parameters()).device
    precision = encoder_precision(device, amp)
    batch_size = max(1, batch_size)
    out = []
    starts = range(0, len(images), batch_size)
    with ThreadPoolExecutor(max_workers=min(4, max(1, len(images)))) as pool, \
            _conv_layout(model.image_encoder, device):
        def submit(start):  # one batch ahead at most: 12 MB per prepared 1024x1024 image
            return [pool.submit(lambda im: preprocess_image(im)[0], im) for im in images[start:start + batch_size]]

        pending = submit(0) if len(images) else []
        for start in starts:
            batch = torch.stack([f.result() for f in pending])
            pending = submit(start + batch_size) if start + batch_size < len(images) else []
            if device.type == "cuda":
                batch = batch.pin_memory().to(device, non_blocking=True)
            else:
                batch = batch.to(device, memory_format=torch.channels_last)
            with _autocast(precision, device):
                emb = model.image_encoder(batch)
            out.append(emb.to(torch.float16).float().contiguous())
    if not out:
        return torch.zeros((0, *EMBEDDING_SHAPE), device=device)
    return torch.cat(out)


class EmbeddingCache:
    """Embeddings by image content hash in the object store, computed by the encoder where missing."""

    def __init__(self, model: nn.Module | Callable[[], nn.Module], weights_sha256: str, store, *,
                 batch_size: int = 4, amp: bool | None = None, device: torch.device | None = None):
        """`model`: the SAM model, or a function that builds it (on `device`) when the first embedding has to be
        computed: an embed shard whose images are all stored then never imports the model code (5 s of a pod's
        start) nor builds the model from its weights."""
        if not weights_sha256:
            raise ValueError("an object-store embedding cache needs the weights' sha256 for its keys")
        built = isinstance(model, nn.Module)
        self._model, self._build = (model, None) if built else (None, model)
        self.weights_sha256 = weights_sha256
        self.store = store
        self.batch_size = batch_size
        self.amp = amp
        if built:
            device = next(model.parameters()).device
        elif device is None:
            raise ValueError("a model built on first use needs the device it will run on")
        self.precision = encoder_precision(device, amp)
        self.stats = {"store": 0, "computed": 0, "encode_seconds": 0.0}

    def key(self, image_sha: str) -> str:
        return embedding_key(self.store, self.weights_sha256, self.precision, image_sha)

    def from_store(self, sha: str) -> torch.Tensor | None:
        """The stored embedding of one image (CPU float32), or None when absent or damaged (recomputed by the
        caller, with a warning here); not kept in memory (the loaders hold only the items in flight)."""
        key = self.key(sha)
        if self.store.stat(key) is None:
            return None
        try:
            return decode_bytes(self.store.get_bytes(key), what=self.store.uri(key))
        except (IntegrityError, ValueError) as e:
            log.warning("recomputing a damaged cached embedding: %s", e)
            return None

    def stored_or_computed(self, sha: str, image_of: Callable[[], np.ndarray], what: str) -> torch.Tensor:
        """One image's embedding from the store; recomputed (and stored again) if it went missing or was damaged
        after `ensure()` checked for it."""
        emb = self.from_store(sha)
        if emb is None:
            log.warning("embedding of %s missing from the store; computing it", what)
            emb = self._compute_and_store([(sha, image_of())])[0].cpu()
        return emb

    def _compute_and_store(self, pending: list[tuple[str, np.ndarray]]) -> torch.Tensor:
        """The one place the encoder runs for the cache: embeddings of (sha, image) pairs, each written to the
        store as soon as its batch is done, so a pod killed mid-way keeps what it made."""
        if self._model is None:
            self._model = self._build()
        t0 = time.perf_counter()  # the encoder's time, not the model's build
        embs = compute_embeddings(self._model, [im for _, im in pending], batch_size=self.batch_size, amp=self.amp)
        self.stats["encode_seconds"] += time.perf_counter() - t0
        self.stats["computed"] += len(pending)
        for (sha, _), emb in zip(pending, embs):
            self.store.put_bytes(self.key(sha), encode_bytes(emb))
        return embs

    def ensure(self, shas: Sequence[str], image_of: Callable[[int], np.ndarray]) -> dict:
        """Make sure the store holds the embedding of every image (`image_of(i)` loads the i-th), computing
        the missing ones batch by batch and keeping none in memory: the embed step's work, and finetune's
        and evaluate's first pass over a split. Returns {"store": found, "computed": computed}."""
        found = computed = 0
        pending: list[tuple[str, np.ndarray]] = []
        seen: set[str] = set()

        def flush():
            nonlocal computed
            if pending:
                self._compute_and_store(pending)
                computed += len(pending)
                pending.clear()

        for i, sha in enumerate(shas):
            if sha in seen:
                continue
            seen.add(sha)
            if self._stored_ok(sha):
                found += 1
                self.stats["store"] += 1
                continue
            pending.append((sha, image_of(i)))
            if len(pending) >= max(1, self.batch_size):
                flush()  # a pod killed mid-way keeps what it already uploaded
        flush()
        return {"store": found, "computed": computed}

    def _stored_ok(self, sha: str) -> bool:
        # A stat is enough for the embed step's skip; a damaged object is caught (and recomputed) on read.
        return self.store.stat(self.key(sha)) is not None
