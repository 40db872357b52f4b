"""Content-addressed train/val/test split and the dataset's content hash.

An image's split is a function of its own bytes (its sha256), the split seed and the fractions, nothing else:
the image's position in [0, 1) is read off sha256(rule, seed, image sha256) and the fractions cut [0, 1) into
train, val and test. So a dataset that grows, shrinks or is renamed never moves an image between splits
(yesterday's champion is never scored on images it trained on because a new image reshuffled the split), and
the same bytes under two names are one image in one split.

What this gives up: exact per-group counts. Each group (FudanPed, PennPed) still gets the fractions in
expectation, because every image is split by the same rule independently of its group; exact stratification
would need to rank an image against the others, which is what made the old split move images.

Small datasets keep today's guarantees: from 3 distinct images up, train, val and test each get at least one
image. When a split would be empty, the image nearest to it (by position) is moved there; the manifest lists
these `filled` images, the only ones whose split depends on the rest of the dataset. Under 3 images there is
nothing to hold out: an empty val reuses the train images and an empty test reuses val; that keeps the seed's
one-image debug mode (-d) working end to end, and such items list all the splits they serve in the manifest's
`splits` field.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from components.hashing import sha256_bytes

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
# The rule's name goes into every position and every content hash, so a dataset version made under another
# rule is another version, and the manifest says which rule made it.
SPLIT_RULE = "sha256-position-v1"
LEGACY_RULE = "seeded-shuffle-per-group"  # manifests without a rule: shuffled and cut per group (before v1)


def check_fractions(fractions: dict | None) -> dict[str, float]:
    fractions = dict(DEFAULT_FRACTIONS if fractions is None else fractions)
    if set(fractions) != set(SPLITS) or any(float(v) < 0 for v in fractions.values()):
        raise ValueError(f"split fractions must give train, val and test, each >= 0; got {fractions}")
    total = sum(float(v) for v in fractions.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6) or float(fractions["train"]) <= 0:
        raise ValueError(f"split fractions must sum to 1 with train > 0; got {fractions}")
    return {k: float(fractions[k]) for k in SPLITS}


def split_rule(manifest: dict) -> str:
    """The rule a manifest's split was made with."""
    return (manifest.get("split") or {}).get("rule") or LEGACY_RULE


def position(image_sha256: str, seed: int) -> float:
    """Where an image falls in [0, 1): a function of its content and the seed only."""
    return int(sha256_bytes(f"{SPLIT_RULE}/{int(seed)}/{image_sha256}".encode())[:16], 16) / 16 ** 16


def _split_at(pos: float, f: dict[str, float]) -> str:
    if pos < f["train"]:
        return "train"
    return "val" if pos < f["train"] + f["val"] else "test"


@dataclass
class Assignment:
    splits: dict[str, list[str]]  # item id -> the splits it serves, its own first
    filled: dict[str, list[str]] = field(default_factory=dict)  # split -> ids moved there so it is not empty


def assign_splits(members: list[tuple[str, str]], seed: int, fractions: dict | None = None) -> Assignment:
    """(item id, image sha256) pairs -> the split of each item (see the module docstring)."""
    f = check_fractions(fractions)
    pos = {sha: position(sha, seed) for _, sha in members}
    filled: dict[str, list[str]] = {}
    if len(pos) >= 3:
        of = {sha: _split_at(p, f) for sha, p in pos.items()}
        _fill_empty_splits(of, pos, f, filled)
        by_image = {sha: [split] for sha, split in of.items()}
    else:  # nothing to hold out: every image trains, val reuses train, test reuses val (see the docstring)
        by_image = {sha: list(SPLITS) for sha in pos}
    ids_of: dict[str, list[str]] = {}
    for ident, sha in members:
        ids_of.setdefault(sha, []).append(ident)
    return Assignment({ident: list(by_image[sha]) for ident, sha in members},
                      {split: sorted(i for sha in shas for i in ids_of[sha]) for split, shas in filled.items()})


def _fill_empty_splits(of: dict[str, str], pos: dict[str, float], f: dict[str, float],
                       filled: dict[str, list[str]]) -> None:
    """From 3 images up every split with a fraction gets one: the image nearest to its interval moves in,
    taken from a split that keeps at least one image."""
    lower = {"train": 0.0, "val": f["train"], "test": f["train"] + f["val"]}
    upper = {"train": f["train"], "val": f["train"] + f["val"], "test": 1.0}
    for split in SPLITS:
        if (split != "train" and f[split] <= 0) or split in of.values():
            continue
        counts = {s: list(of.values()).count(s) for s in SPLITS}
        donors = sorted(sha for sha, s in of.items() if counts[s] > 1)
        nearest = min(donors, key=lambda sha: max(lower[split] - pos[sha], pos[sha] - upper[split], 0.0))
        of[nearest] = split
        filled.setdefault(split, []).append(nearest)


def overlapping(items: list[dict]) -> list[str]:
    """Ids of manifest items serving more than one split (a dataset under 3 images, see assign_splits):
    a model evaluated on such a test split is scored on its own training images."""
    return [it["id"] for it in items if len(it.get("splits") or [it["split"]]) > 1]


def content_hash(files: list[tuple[str, str]], seed: int, fractions: dict, labels: dict | None = None) -> str:
    """sha256 over the sorted (relative name, file sha256) pairs, the split parameters and `labels` (what
    the manifest says beyond the files, e.g. COCO categories): the same data split the same way always
    gets the same hash, so it is stored once. Without labels the hash is what it always was."""
    doc = {"files": sorted([name, sha] for name, sha in files),
           "split": {"rule": SPLIT_RULE, "seed": int(seed), "fractions": check_fractions(fractions)}}
    if labels is not None:
        doc["labels"] = labels
    return sha256_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
