"""COCO instance-segmentation exports (CVAT, Label Studio, Roboflow, ...) as the pipeline's instance-id masks.

Found where the tools put it: `annotations.json`, `instances_*.json`, `*_annotations.coco.json` or
`result.json`, in the dataset's folder, its `annotations/` folder or one level down (several files are
read together: a train/valid/test export is one dataset, split again by our own rule). An image's
`file_name` is looked up beside its JSON, in `images/` beside it, and in the dataset's `images/`.

Each image's annotations become one 8-bit mask (components/label_values.py): instances 1..N in
annotation order, crowd annotations (`iscrowd: 1`) as 255 = ignore, nothing for categories that
`--categories` leaves out. Overlaps: a pixel claimed by several instances goes to the smallest of them
(a small object lying on a large one is usually in front of it), a warning names both annotations,
and an instance left with no pixel of its own is an error. Instances win over crowd regions.
Segmentations are decoded by pycocotools, the reference implementation of the format.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from components.datasets.adapters import IMAGE_EXTS, Pair, _entries, _listing, _rel, group_by_prefix
from components.label_values import IGNORE, MAX_INSTANCES

log = logging.getLogger(__name__)
NAMES = ("annotations.json", "result.json")
PATTERNS = ("instances_*.json", "*_annotations.coco.json")


def annotation_files(root: Path) -> list[Path]:
    """The COCO JSON files of a dataset folder (its top, annotations/ and one level down)."""
    folders = [root, *[p for p in _entries(root) if p.is_dir()]]
    found = []
    for folder in folders:
        for p in _entries(folder):
            if p.is_file() and (p.name in NAMES or any(p.match(pat) for pat in PATTERNS)):
                found.append(p)
    return sorted(found)


def parse_categories(text: str | None) -> list[str] | None:
    """`--categories person,car` -> ["person", "car"]; None or "" keeps every category."""
    names = [c.strip() for c in (text or "").split(",") if c.strip()]
    return names or None


@dataclass
class _Image:
    json: Path
    id: int
    file_name: str
    width: int
    height: int
    anns: list


class CocoLayout:
    """The COCO adapter: the same `find_root` / `pairs` interface as adapters.Layout; the masks it
    renders go into the caller's work folder, and `categories` holds the manifest's category table."""
    name = "coco"

    def __init__(self, categories: list[str] | None = None, keep_empty: bool = False):
        self.wanted = categories
        self.keep_empty = keep_empty
        self.categories: list[dict] = []
        self.dropped_empty = 0

    def expected(self) -> str:
        return "images/ and a COCO annotations.json (or instances_*.json, _annotations.coco.json, result.json)"

    def find_root(self, top: Path) -> Path | None:
        candidates = [top]
        subdirs = [p for p in _entries(top) if p.is_dir()]
        if len(subdirs) == 1:  # an archive that unpacks to one folder
            candidates.append(subdirs[0])
        return next((c for c in candidates if annotation_files(c)), None)

    def pairs(self, top: Path, work: Path | None = None) -> tuple[list[Pair], list[str]]:
        """Pairs with rendered masks (in `work`) and every problem, each naming its file."""
        if work is None:
            raise ValueError("the COCO adapter renders masks and needs a work folder")
        root = self.find_root(top)
        if root is None:
            return [], [f"expected {self.expected()}; found {_listing(top)}"]
        problems: list[str] = []
        images: list[_Image] = []
        cat_names: dict[tuple[Path, int], str] = {}
        for path in annotation_files(root):
            images += self._read(path, top, cat_names, problems)
        keep = self._kept_categories(cat_names, problems)
        found: dict[str, tuple[Path, _Image]] = {}
        by_path: dict[Path, _Image] = {}
        for img in images:
            where = f"{_rel(img.json, top)}: image id {img.id} ({img.file_name})"
            path = _locate(img, root, top, where, problems)
            if path is None:
                continue
            if path in by_path:
                problems.append(f"{where}: listed twice (also as image id {by_path[path].id} in "
                                f"{_rel(by_path[path].json, top)})")
                continue
            by_path[path] = img
            if path.stem in found:
                problems.append(f"{_rel(path, top)}: same file name as {_rel(found[path.stem][0], top)} "
                                "(image names must be unique without their folders)")
                continue
            found[path.stem] = (path, img)
        rendered = []
        for stem in sorted(found):
            path, img = found[stem]
            pair = self._render(stem, path, img, top, work, cat_names, keep, problems)
            if pair is not None:
                rendered.append(pair)
        groups = group_by_prefix([p.id for p in rendered])
        if self.dropped_empty:
            # Said where a user sees it (the CLI shows warnings): a dataset silently shrinking looks like a bug.
            log.warning("%d images without an instance (of the kept categories) left out; --keep-empty keeps them",
                        self.dropped_empty)
        return [Pair(p.id, groups[p.id], p.image_path, p.mask_path, p.annotated_in, p.categories)
                for p in rendered], problems

    def _read(self, path: Path, top: Path, cat_names: dict, problems: list[str]) -> list[_Image]:
        """One JSON file's images with their annotations; its problems appended."""
        rel = _rel(path, top)
        try:
            doc = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"{rel}: not valid JSON ({e})")
            return []
        if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list)
                                                for k in ("images", "annotations", "categories")):
            problems.append(f"{rel}: not a COCO file (expected an object with 'images', 'annotations' and "
                            "'categories' lists)")
            return []
        for c in doc["categories"]:
            if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
                problems.append(f"{rel}: category {c!r} lacks an integer 'id' or a 'name'")
                continue
            cat_names[(path, c["id"])] = c["name"]
            if c["name"] not in [t["name"] for t in self.categories]:
                self.categories.append({"id": c["id"], "name": c["name"]})
        by_id: dict[int, _Image] = {}
        for im in doc["images"]:
            ok = isinstance(im, dict) and isinstance(im.get("id"), int) and isinstance(im.get("file_name"), str) \
                and all(isinstance(im.get(k), int) and im[k] > 0 for k in ("width", "height"))
            if not ok:
                problems.append(f"{rel}: image {im!r:.80} lacks an integer 'id', a 'file_name' or a positive "
                                "'width'/'height'")
            elif im["id"] in by_id:
                problems.append(f"{rel}: image id {im['id']} appears twice ({by_id[im['id']].file_name} and "
                                f"{im['file_name']})")
            else:
                by_id[im["id"]] = _Image(path, im["id"], im["file_name"], im["width"], im["height"], [])
        for ann in doc["annotations"]:
            aid = ann.get("id", "?") if isinstance(ann, dict) else "?"
            if not isinstance(ann, dict) or ann.get("image_id") not in by_id:
                problems.append(f"{rel}: annotation {aid}: image_id "
                                f"{ann.get('image_id') if isinstance(ann, dict) else None!r} is not among the images")
            elif (path, ann.get("category_id")) not in cat_names:
                problems.append(f"{rel}: annotation {aid}: category_id {ann.get('category_id')!r} is not among "
                                "the categories")
            else:
                by_id[ann["image_id"]].anns.append(ann)
        return list(by_id.values())

    def _kept_categories(self, cat_names: dict, problems: list[str]) -> set[str]:
        """The category names to keep (all, or --categories, each of which must exist)."""
        have = [c["name"] for c in self.categories]
        if self.wanted is None:
            return set(have)
        for name in self.wanted:
            if name not in have:
                problems.append(f"--categories: no category {name!r} in the annotations "
                                f"(they have: {', '.join(have) or 'none'})")
        self.categories = [c for c in self.categories if c["name"] in self.wanted]
        return set(self.wanted)

    def _render(self, stem: str, path: Path, img: _Image, top: Path, work: Path, cat_names: dict,
                keep: set[str], problems: list[str]) -> Pair | None:
        where = f"{_rel(img.json, top)}: image id {img.id} ({img.file_name})"
        anns = [a for a in img.anns if cat_names[(img.json, a["category_id"])] in keep]
        label, cats, found = render_mask(anns, img.height, img.width, where,
                                         lambda a: cat_names[(img.json, a["category_id"])])
        problems += found
        if found:
            return None
        if not cats and not self.keep_empty:
            self.dropped_empty += 1
            return None
        mask_path = work / "masks" / f"{stem}.png"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label, "L").save(mask_path)
        return Pair(stem, "", path, mask_path, where, tuple(cats))


def _locate(img: _Image, root: Path, top: Path, where: str, problems: list[str]) -> Path | None:
    """The image file a `file_name` names: beside its JSON, in images/ there, or in the dataset's images/."""
    name = PurePosixPath(img.file_name.replace("\\", "/"))
    if name.is_absolute() or ".." in name.parts:
        name = PurePosixPath(name.name)  # a path from the annotator's machine: only its name means anything
    here = img.json.parent
    tries = [here / name, here / "images" / name, root / "images" / name, root / name,
             root / "images" / name.name, here / name.name]
    hit = next((p for p in tries if p.is_file()), None)
    if hit is None:
        problems.append(f"{where}: no such image (looked for {_rel(tries[2], top)} and {_rel(tries[0], top)})")
    elif hit.suffix.lower() not in IMAGE_EXTS:
        problems.append(f"{where}: {_rel(hit, top)} is not an image file (expected {' '.join(IMAGE_EXTS)})")
        return None
    return hit


def decode_segmentation(segm, height: int, width: int) -> tuple[np.ndarray | None, str]:
    """A COCO `segmentation` (polygons, compressed or uncompressed RLE) -> (HxW bool mask, "") or (None, problem)."""
    from pycocotools import mask as mask_utils

    if segm is None or segm == []:
        return None, "no segmentation (a box-only annotation: training needs masks)"
    if isinstance(segm, list):
        for poly in segm:
            if not isinstance(poly, list) or not all(isinstance(v, (int, float)) for v in poly):
                return None, "a polygon is not a list of numbers"
            if len(poly) < 6 or len(poly) % 2:
                return None, f"a polygon with {len(poly) / 2:g} points (needs at least 3 x,y pairs)"
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm, dict) and "counts" in segm:
        size = segm.get("size")
        if not isinstance(size, list) or size != [height, width]:
            return None, f"RLE size {size} differs from the image's [height, width] [{height}, {width}]"
        counts = segm["counts"]
        if isinstance(counts, list):  # uncompressed: run lengths, which must cover the image exactly
            if not all(isinstance(v, int) and v >= 0 for v in counts) or sum(counts) != height * width:
                return None, f"uncompressed RLE counts do not add up to height x width = {height * width}"
            rle = mask_utils.frPyObjects(segm, height, width)
        elif isinstance(counts, str):
            rle = {"size": size, "counts": counts.encode()}
        else:
            return None, "RLE counts are neither a list nor a string"
    else:
        return None, "segmentation is neither polygons nor RLE"
    try:
        return mask_utils.decode(rle).astype(bool), ""
    except Exception as e:  # pycocotools raises bare Exceptions for malformed strings
        return None, f"RLE that does not decode ({e})"


def render_mask(anns: list[dict], height: int, width: int, where: str, category) -> tuple[np.ndarray, list, list]:
    """One image's annotations -> (HxW uint8 instance-id mask, category of instances 1..N, problems)."""
    problems, instances = [], []
    crowd = np.zeros((height, width), dtype=bool)
    for ann in anns:
        m, why = decode_segmentation(ann.get("segmentation"), height, width)
        if m is None:
            problems.append(f"{where}: annotation {ann.get('id', '?')}: {why}")
        elif ann.get("iscrowd"):
            crowd |= m
        elif not m.any():
            problems.append(f"{where}: annotation {ann.get('id', '?')}: its segmentation covers no pixel")
        else:
            instances.append((ann, m))
    if len(instances) > MAX_INSTANCES:
        problems.append(f"{where}: {len(instances)} instances; masks are 8-bit, so at most {MAX_INSTANCES} "
                        "per image (255 marks crowd regions)")
    if problems:
        return np.zeros((height, width), np.uint8), [], problems
    label = np.zeros((height, width), dtype=np.uint8)
    areas = [int(m.sum()) for _, m in instances]
    for k in sorted(range(len(instances)), key=lambda k: -areas[k]):  # largest first: the smallest wins
        label[instances[k][1]] = k + 1
    for k, (ann, m) in enumerate(instances):
        kept = int((label[m] == k + 1).sum())
        if kept == 0:
            problems.append(f"{where}: annotation {ann.get('id', '?')} is entirely covered by smaller instances")
        elif kept < areas[k]:
            over = sorted({int(v) for v in np.unique(label[m]) if v not in (0, k + 1)})
            log.warning("%s: annotation %s overlaps annotation(s) %s on %d pixels; they go to the smaller instance",
                        where, ann.get("id", "?"), ", ".join(str(instances[v - 1][0].get("id", "?")) for v in over),
                        areas[k] - kept)
    label[crowd & (label == 0)] = IGNORE
    return label, [category(ann) for ann, _ in instances], problems




def encode_rle(mask: np.ndarray) -> dict:
    """HxW bool -> COCO compressed RLE (counts as a str, JSON-ready), as COCO results files carry it."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """HxW bool -> COCO uncompressed RLE: run lengths in column-major order, starting with background."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}
