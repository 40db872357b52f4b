"""ingest-dataset: validate a dataset, split it, and store it under its content hash.

Objects go to `<prefix>datasets/<name>/<content_hash>/{images,masks}/`, then `manifest.json` last: the
manifest is the commit point. An interrupted ingest leaves objects no reader trusts and is simply run
again (objects already there with the same sha256 are skipped); the same data gives the same hash, so
a re-run, or a scheduled run over unchanged data, uploads nothing.

A re-run trusts a committed manifest without downloading anything. `verify=True` (`ingest --verify`)
downloads and hashes every object it lists, re-uploads what is missing or damaged, and rewrites a manifest
that no longer parses.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from components.datasets.adapters import get_layout
from components.datasets.sources import WORK_PREFIX, clean_stale_work_dirs, open_source
from components.datasets.split import (SPLIT_RULE, SPLITS, assign_splits, check_fractions, content_hash, overlapping,
                                       split_rule)
from components.datasets.validate import DatasetError, Item, validate
from components.errors import UserError
from components.label_values import IGNORE
from components.storage import ObjectStore, S3Config, StorageError

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
log = logging.getLogger(__name__)


class DatasetNameError(UserError, ValueError):
    """A dataset name that cannot name a folder in the store."""


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise DatasetNameError(f"invalid dataset name {name!r}: use lower-case letters, digits, '.', '_' "
                               "or '-', starting with a letter or digit (it names a folder in the store)")
    return name


@dataclass
class Prepared:
    source: str
    layout: str
    items: list[Item]
    seed: int
    fractions: dict[str, float]
    content_hash: str
    filled: dict[str, list[str]] = field(default_factory=dict)  # split -> ids moved there (split.py)
    categories: list[dict] | None = None  # the category table of a layout that names them (COCO)


@contextlib.contextmanager
def prepare(source: str, fmt: str = "auto", *, store: ObjectStore | None = None, seed: int = 0,
            fractions: dict | None = None, cache_dir: Path | None = None, workers: int = 4,
            max_pixels: int | None = None, categories: list[str] | None = None,
            keep_empty: bool = False) -> Iterator[Prepared]:
    """Fetch, validate and split a dataset; the files stay readable inside the `with` block, and a
    downloaded zip enters the data cache only when the block ends without an error.
    categories, keep_empty: COCO only: the categories to keep (default all), and whether images with no
    instance are kept (default dropped)."""
    fractions = check_fractions(fractions)
    with open_source(source, store, cache_dir) as local, \
            tempfile.TemporaryDirectory(prefix=f"{WORK_PREFIX}{os.getpid()}-") as work:
        layout, problems = get_layout(fmt, local.root, categories=categories, keep_empty=keep_empty)
        pairs = []
        if layout is not None:
            # Masks rendered from annotations (COCO) go to `work`, removed with it.
            pairs, problems = layout.pairs(local.root, Path(work))
        items = validate(pairs, local.root, local.label, problems, workers=workers, max_pixels=max_pixels)
        assignment = assign_splits([(it.id, it.image_sha256) for it in items], seed, fractions)
        for it in items:
            it.splits = assignment.splits[it.id]
            it.split = it.splits[0]
        items.sort(key=lambda it: it.id)
        files = [(f"images/{it.image_path.name}", it.image_sha256) for it in items]
        files += [(f"masks/{it.mask_path.name}", it.mask_sha256) for it in items]
        table = getattr(layout, "categories", None)
        # Categories are not in the mask files: the hash must cover them, or a relabelled dataset would
        # find the old manifest committed under the same hash.
        labels = None if table is None else {
            "categories": table, "items": {it.id: list(it.categories or ()) for it in items}}
        # Only a run that gets through (validated and, for ingest, committed) fills the data cache: open_source
        # moves a downloaded zip there when this block ends without an error.
        yield Prepared(str(source), layout.name, items, seed, fractions, content_hash(files, seed, fractions, labels),
                       assignment.filled, table)


def split_totals(items: list[dict]) -> dict:
    """Images and instances in all and per split (an item serving several splits counts in each)."""
    totals = {"images": len(items), "instances": sum(it["instances"] for it in items), "splits": {}}
    for split in SPLITS:
        members = [it for it in items if split in (it.get("splits") or [it["split"]])]
        totals["splits"][split] = {"images": len(members), "instances": sum(it["instances"] for it in members)}
    return totals


def build_manifest(prep: Prepared, name: str, store: ObjectStore) -> dict:
    root = store.key("datasets", name, prep.content_hash) + "/"
    items = []
    for it in prep.items:
        entry = {
            "id": it.id, "group": it.group, "split": it.split,
            "width": it.width, "height": it.height, "instances": it.instances,
            "image": {"key": f"{root}images/{it.image_path.name}", "sha256": it.image_sha256, "bytes": it.image_bytes},
            "mask": {"key": f"{root}masks/{it.mask_path.name}", "sha256": it.mask_sha256, "bytes": it.mask_bytes},
        }
        if len(it.splits) > 1:
            entry["splits"] = it.splits
        if it.categories is not None:
            entry["categories"] = list(it.categories)  # of instances 1..N
        items.append(entry)
    extra = {} if prep.categories is None else {"categories": prep.categories, "ignore_id": IGNORE}
    return {
        "format_version": 1, "name": name, "content_hash": prep.content_hash, "source": prep.source,
        "layout": prep.layout, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bucket": store.config.bucket, "root": root,
        "split": {"rule": SPLIT_RULE, "seed": prep.seed, "fractions": prep.fractions, "filled": prep.filled},
        "items": items, "totals": split_totals(items), "splits_overlap": bool(overlapping(items)), **extra,
    }


@dataclass
class IngestResult:
    name: str
    content_hash: str
    dataset_uri: str
    manifest_uri: str
    manifest: dict = field(repr=False)
    uploaded: int
    skipped: int
    verified: int | None = None  # objects downloaded and hashed (verify=True), else None

    def to_json(self) -> dict:
        totals = self.manifest["totals"]
        out = {"dataset": self.name, "dataset_uri": self.dataset_uri, "manifest_uri": self.manifest_uri,
               "content_hash": self.content_hash, "images": totals["images"], "instances": totals["instances"],
               "splits": totals["splits"], "split_rule": split_rule(self.manifest), "uploaded": self.uploaded,
               "skipped": self.skipped}
        if self.verified is not None:
            out["verified"] = self.verified
        # From the items, not the manifest's own flag: manifests committed before the flag existed lack it.
        out["splits_overlap"] = bool(overlapping(self.manifest["items"]))
        return out


def ingest(source: str, fmt: str = "auto", name: str = "penn-fudan", store: ObjectStore | None = None,
           seed: int = 0, fractions: dict | None = None, *, workers: int = 8,
           cache_dir: Path | None = None, verify: bool = False, max_pixels: int | None = None,
           categories: list[str] | None = None, keep_empty: bool = False) -> IngestResult:
    """Validate `source` completely, then upload what is missing and commit the manifest.

    verify: re-check every object of an existing manifest against its sha256 (download and hash) and
    re-upload what is wrong. max_pixels: the largest image accepted (default: SAM_MAX_IMAGE_PIXELS or
    100 megapixels). categories, keep_empty: COCO options (see `prepare`)."""
    check_name(name)
    store = store or ObjectStore(S3Config.from_env())
    clean_stale_work_dirs()
    with prepare(source, fmt, store=store, seed=seed, fractions=fractions, cache_dir=cache_dir,
                 max_pixels=max_pixels, categories=categories, keep_empty=keep_empty) as prep:
        manifest_key = store.key("datasets", name, prep.content_hash, "manifest.json")
        n_objects = 2 * len(prep.items)
        manifest = None
        if store.exists(manifest_key):
            try:
                manifest = store.get_json(manifest_key)
            except StorageError:
                if not verify:
                    raise
                # A manifest that no longer parses is rebuilt from the same data (same content hash).
        if manifest is not None and not verify:
            uploaded, skipped = 0, n_objects
        else:
            committed = manifest is not None
            manifest = manifest if committed else build_manifest(prep, name, store)
            local = {it.image_sha256: it.image_path for it in prep.items}
            local.update({it.mask_sha256: it.mask_path for it in prep.items})
            uploads = [(it[kind]["key"], local[it[kind]["sha256"]], it[kind]["sha256"])
                       for kind in ("image", "mask") for it in manifest["items"]]
            uploaded, skipped = store.put_many(uploads, workers=workers, verify=verify,
                                               progress=f"{'verify' if verify else 'upload'} {name}")
            if not committed:
                store.put_json(manifest_key, manifest)
    shared = overlapping(manifest["items"])
    if shared:
        log.warning("WARNING: %s: %d of %d images serve more than one of train/val/test (too few images to hold "
                    "any out); a model trained on it is evaluated on its own training images, and registration "
                    "is refused unless allow_overlap (sam-pipeline run --allow-overlap)",
                    name, len(shared), len(manifest["items"]))
    return IngestResult(name, prep.content_hash, store.uri(manifest["root"]), store.uri(manifest_key),
                        manifest, uploaded, skipped, n_objects if verify else None)


__all__ = ["DatasetError", "IngestResult", "Prepared", "ingest", "prepare"]
