"""Seeded, group-stratified train/val/test split and the dataset's content hash."""
from __future__ import annotations

import json
import math
import random

from components.hashing import sha256_bytes

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def check_fractions(fractions: dict | None) -> dict[str, float]:
    fractions = dict(DEFAULT_FRACTIONS if fractions is None else fractions)
    if set(fractions) != set(SPLITS) or any(float(v) < 0 for v in fractions.values()):
        raise ValueError(f"split fractions must give train, val and test, each >= 0; got {fractions}")
    total = sum(float(v) for v in fractions.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6) or float(fractions["train"]) <= 0:
        raise ValueError(f"split fractions must sum to 1 with train > 0; got {fractions}")
    return {k: float(fractions[k]) for k in SPLITS}


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def assign_splits(members: list[tuple[str, str]], seed: int, fractions: dict | None = None) -> dict[str, list[str]]:
    """(id, group) pairs -> id -> splits it belongs to (primary first).

    Each group is shuffled with its own seeded RNG (so adding a group leaves the others' splits alone)
    and cut by the fractions, so every group reaches every split. With 3 or more images train, val and
    test each get at least one image. With fewer there is nothing to hold out: an empty val reuses the
    train images and an empty test reuses val; that keeps the seed's one-image debug mode (-d) working
    end to end, and such items list all the splits they serve in the manifest's `splits` field.
    """
    f = check_fractions(fractions)
    groups: dict[str, list[str]] = {}
    for ident, group in members:
        groups.setdefault(group, []).append(ident)
    out: dict[str, dict[str, list[str]]] = {}
    for group in sorted(groups):
        ids = sorted(groups[group])
        random.Random(f"{seed}/{group}").shuffle(ids)
        n = len(ids)
        n_val, n_test = _half_up(n * f["val"]), _half_up(n * f["test"])
        if n >= 3:
            n_val, n_test = max(n_val, int(f["val"] > 0)), max(n_test, int(f["test"] > 0))
        while n_val + n_test > n - 1:  # train keeps at least one image per group
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        out[group] = {"val": ids[:n_val], "test": ids[n_val:n_val + n_test], "train": ids[n_val + n_test:]}
    total = len(members)
    if total >= 3:
        for split in ("val", "test"):
            if f[split] > 0 and not any(parts[split] for parts in out.values()):
                donor = max(out.values(), key=lambda parts: len(parts["train"]))
                if len(donor["train"]) > 1:
                    donor[split].append(donor["train"].pop())
    result: dict[str, list[str]] = {}
    for parts in out.values():
        for split in SPLITS:
            for ident in parts[split]:
                result[ident] = [split]
    if 0 < total < 3:
        by_split = {s: [i for i, sp in result.items() if sp[0] == s] for s in SPLITS}
        if not by_split["val"]:
            by_split["val"] = by_split["train"]
        if not by_split["test"]:
            by_split["test"] = by_split["val"]
        for split in ("val", "test"):
            for ident in by_split[split]:
                if split not in result[ident]:
                    result[ident].append(split)
    return result


def overlapping(items: list[dict]) -> list[str]:
    """Ids of manifest items serving more than one split (a dataset under 3 images, see assign_splits):
    a model evaluated on such a test split is scored on its own training images."""
    return [it["id"] for it in items if len(it.get("splits") or [it["split"]]) > 1]


def content_hash(files: list[tuple[str, str]], seed: int, fractions: dict, labels: dict | None = None) -> str:
    """sha256 over the sorted (relative name, file sha256) pairs, the split parameters and `labels` (what
    the manifest says beyond the files, e.g. COCO categories): the same data split the same way always
    gets the same hash, so it is stored once. Without labels the hash is what it always was."""
    doc = {"files": sorted([name, sha] for name, sha in files),
           "split": {"seed": int(seed), "fractions": check_fractions(fractions), "stratify": "group"}}
    if labels is not None:
        doc["labels"] = labels
    return sha256_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
