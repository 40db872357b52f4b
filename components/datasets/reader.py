"""Read a dataset version back from its manifest: what finetune and evaluate train and score on.

The manifest is the commit point of an ingest, so readers trust only what it lists: every object is
fetched by its key, checked against the manifest's sha256, and kept in a local cache addressed by that
sha256, so a second epoch, a retried pod or another step on the same node downloads nothing.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from components.datasets.split import SPLITS
from components.files import atomic_path
from components.hashing import sha256_file
from components.label_values import instance_ids
from components.storage import ObjectStore, StorageError


@dataclass
class Sample:
    id: str
    image: np.ndarray  # HxWx3 uint8 RGB
    mask: np.ndarray  # HxW uint8, 0 = background, 1..N instance ids
    image_sha256: str


def default_cache_dir() -> Path:
    return Path(os.environ.get("SAM_DATA_CACHE", Path.home() / ".cache" / "sam-pipeline" / "objects"))


def load_manifest(store: ObjectStore | None, manifest_uri_or_key: str | Path) -> dict:
    """Load a manifest from an s3:// uri (of the manifest or of its dataset folder), a key in the
    store's bucket, or a local file (the KFP Dataset artifact that ingest wrote)."""
    ref = str(manifest_uri_or_key)
    if not ref.startswith("s3://") and Path(ref).is_file():
        try:
            manifest = json.loads(Path(ref).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StorageError(f"{ref} is not valid JSON ({getattr(e, 'msg', e)}); "
                               "is it a sam-pipeline dataset manifest?") from None
        return _checked(manifest, ref)
    if store is None:
        raise StorageError(f"{ref} is not a local file and no object store was given to read it from")
    if ref.startswith("s3://"):
        bucket, key = ObjectStore.parse_uri(ref)
        store = _store_for(store, bucket)
    else:
        key = ref
    if not key.endswith(".json"):
        key = key.rstrip("/") + "/manifest.json"
    return _checked(store.get_json(key), store.uri(key))


def _checked(manifest, where: str) -> dict:
    if not isinstance(manifest, dict) or manifest.get("format_version") != 1 or "items" not in manifest:
        raise StorageError(f"{where} is not a sam-pipeline dataset manifest (format_version 1)")
    return manifest


def _store_for(store: ObjectStore, bucket: str) -> ObjectStore:
    # Manifest keys are full object names, so only the bucket matters, never the store's prefix.
    return store if bucket == store.config.bucket else store.for_bucket(bucket)


def item_splits(item: dict) -> list[str]:
    """The splits an item belongs to: tiny datasets let val/test reuse train images (see split.py)."""
    return item.get("splits") or [item["split"]]


def split_items(manifest: dict, split: str) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return [it for it in manifest["items"] if split in item_splits(it)]


class SplitRefs:
    """One split of a dataset version, read lazily: the manifest's entries in memory (a few hundred bytes
    each), an image and its mask fetched and decoded only when `load(i)` asks for them. What finetune and
    evaluate stream from, so their memory does not grow with the dataset."""

    def __init__(self, store: ObjectStore, manifest: dict, split: str, cache_dir: Path | None = None,
                 *, annotated_only: bool = False):
        self.store = _store_for(store, manifest.get("bucket", store.config.bucket))
        self.split = split
        items = split_items(manifest, split)
        # The manifest counts instances per image, so empty images are dropped without reading them.
        self.items = [it for it in items if it.get("instances", 1) > 0] if annotated_only else items
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()

    def __len__(self) -> int:
        return len(self.items)

    def _with_items(self, items: list[dict]) -> "SplitRefs":
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__, items=items)
        return out

    def without(self, image_shas: frozenset[str]) -> "SplitRefs":
        """The same split less the items whose image content hash is in `image_shas`."""
        return self._with_items([it for it in self.items if it["image"]["sha256"] not in image_shas])

    def head(self, n: int) -> "SplitRefs":
        """The first `n` items (the one-example check trains and validates on one image)."""
        return self._with_items(self.items[:n])

    def image_sha256(self, i: int) -> str:
        return self.items[i]["image"]["sha256"]

    def load(self, i: int) -> Sample:
        it = self.items[i]
        return decode_sample(it["id"], _cached_object(self.store, it["image"], self.cache_dir),
                             _cached_object(self.store, it["mask"], self.cache_dir), it["image"]["sha256"])

    def fingerprint(self) -> str:
        """What resume must match, from the manifest alone (ids and content hashes of images and masks)."""
        import hashlib

        h = hashlib.sha256()
        for it in self.items:
            h.update(f"{it['id']}|{it['image']['sha256']}|{it['mask']['sha256']}|".encode())
        return h.hexdigest()


class SampleSplit(SplitRefs):
    """A split held in memory, read through the same interface: tests and benchmarks that make their samples
    (synthetic.make_samples) train and evaluate on them without a dataset version. The entries carry the
    same content hashes a manifest would (the mask's over its pixel bytes), so `fingerprint()` is the same."""

    def __init__(self, samples, split: str = "train", *, annotated_only: bool = False):
        import hashlib

        self.store, self.split, self.cache_dir = None, split, None
        self.items = [{"id": s.id, "sample": s, "instances": len(instance_ids(s.mask)),
                       "image": {"sha256": s.image_sha256},
                       "mask": {"sha256": hashlib.sha256(np.ascontiguousarray(s.mask).tobytes()).hexdigest()}}
                      for s in samples]
        if annotated_only:
            self.items = [it for it in self.items if it["instances"] > 0]

    def load(self, i: int) -> Sample:
        return self.items[i]["sample"]


def shard_images(manifest: dict, shard: int, shards: int) -> list[dict]:
    """The `shard`-th of `shards` disjoint parts of the manifest's distinct images (every split): images
    sorted by content hash and dealt round-robin, so the shards are even and independent of item order."""
    if shards < 1 or not 0 <= shard < shards:
        raise ValueError(f"shard {shard} of {shards}: need 0 <= shard < shards")
    by_sha = {it["image"]["sha256"]: it["image"] for it in manifest["items"]}
    return [by_sha[sha] for sha in sorted(by_sha)[shard::shards]]


def load_image_ref(store: ObjectStore, manifest: dict, ref: dict, cache_dir: Path | None = None) -> np.ndarray:
    """One manifest image (HxWx3 uint8), fetched through the local sha256-addressed cache."""
    store = _store_for(store, manifest.get("bucket", store.config.bucket))
    path = _cached_object(store, ref, Path(cache_dir) if cache_dir else default_cache_dir())
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _cached_object(store: ObjectStore, ref: dict, cache_dir: Path) -> Path:
    sha = ref["sha256"]
    path = cache_dir / sha[:2] / sha
    if path.is_file():
        # A cache entry is trusted only while it still hashes to its name; small files, cheap to check.
        if sha256_file(path) == sha:
            return path
        path.unlink()
    with atomic_path(path) as tmp:
        # get_file has already checked the bytes against the object's recorded sha256; hash again only
        # for an object written without one.
        actual = store.get_file(ref["key"], tmp).sha256 or sha256_file(tmp)
        if actual != sha:
            raise StorageError(f"{store.uri(ref['key'])}: sha256 {actual} does not match the manifest's {sha}")
    return path


def decode_sample(sample_id: str, image_path: Path, mask_path: Path, image_sha256: str | None = None) -> Sample:
    with Image.open(image_path) as im:
        image = np.asarray(im.convert("RGB"), dtype=np.uint8)
    with Image.open(mask_path) as m:
        # P-mode masks hold instance ids as palette indices: read the indices, never the colours.
        mask = np.asarray(m if m.mode in ("L", "P") else m.convert("L"), dtype=np.uint8)
    return Sample(sample_id, image, mask, image_sha256 or sha256_file(image_path))


def load_local_split(folder: Path, split: str, *, seed: int = 0, fractions: dict | None = None,
                     fmt: str = "auto") -> list[Sample]:
    """The same validation and split as ingest, straight from a local folder or zip (no object store)."""
    from components.datasets.ingest import prepare

    with prepare(str(folder), fmt, seed=seed, fractions=fractions) as prepared:
        wanted = [it for it in prepared.items if split in it.splits]
        return [decode_sample(it.id, it.image_path, it.mask_path, it.image_sha256) for it in wanted]
