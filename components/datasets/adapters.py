"""Dataset layouts: each maps a folder to (id, group, image, mask) pairs; validation, split and upload
are shared, so Penn-Fudan is one instance of the generic images+masks layout, not a separate path.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Junk that archivers and desktops add; never data.
_IGNORED = {"__MACOSX", "Thumbs.db", "desktop.ini"}
# Groups smaller than this cannot reach all three splits, so stratifying by them would be noise.
_MIN_GROUP = 3


@dataclass(frozen=True)
class Pair:
    id: str
    group: str
    image_path: Path
    mask_path: Path
    # Set when the mask was rendered from annotations (COCO): where they are ("<json>: image id N (<file>)"),
    # and the category of instances 1..N.
    annotated_in: str = ""
    categories: tuple[str, ...] = ()


@dataclass(frozen=True)
class Layout:
    name: str
    images_dir: str
    masks_dir: str
    mask_suffixes: tuple[str, ...]  # mask file = <stem><suffix>.png, tried in order
    root_name: str | None = None  # the folder an archive unpacks to (found one level down too)
    required: tuple[str, ...] = ()  # further folders the layout must have
    always_group_by_prefix: bool = False

    def expected(self) -> str:
        base = f"{self.root_name}/" if self.root_name else ""
        dirs = [self.images_dir, self.masks_dir, *self.required]
        return ", ".join(f"{base}{d}/" for d in dirs)

    def find_root(self, top: Path) -> Path | None:
        candidates = [top]
        if self.root_name:
            candidates.append(top / self.root_name)
        subdirs = [p for p in _entries(top) if p.is_dir()]
        if len(subdirs) == 1:  # an archive that unpacks to one folder of another name
            candidates.append(subdirs[0])
        for c in candidates:
            if (c / self.images_dir).is_dir() and (c / self.masks_dir).is_dir():
                return c
        return None

    def pairs(self, top: Path, work: Path | None = None) -> tuple[list[Pair], list[str]]:
        """Pairs and layout problems (each naming its file relative to `top`); `work` is unused (the
        COCO adapter renders its masks there)."""
        root = self.find_root(top)
        if root is None:
            return [], [f"expected {self.expected()}; found {_listing(top)}"]
        problems = [f"{_rel(root / d, top)}/: missing (expected {self.expected()})"
                    for d in self.required if not (root / d).is_dir()]
        images, masks = root / self.images_dir, root / self.masks_dir
        by_stem: dict[str, Path] = {}
        for p in _entries(images):
            if p.is_dir():
                problems.append(f"{_rel(p, top)}/: unexpected folder among the images")
            elif p.suffix.lower() not in IMAGE_EXTS:
                problems.append(f"{_rel(p, top)}: not an image file (expected {' '.join(IMAGE_EXTS)})")
            elif p.stem in by_stem:
                problems.append(f"{_rel(p, top)}: same name as {_rel(by_stem[p.stem], top)}")
            else:
                by_stem[p.stem] = p
        mask_files = {p.name: p for p in _entries(masks) if p.is_file()}
        claimed: set[str] = set()
        found: list[tuple[str, Path, Path]] = []
        for stem in sorted(by_stem):
            names = [f"{stem}{suffix}.png" for suffix in self.mask_suffixes]
            hit = next((n for n in names if n in mask_files), None)
            if hit is None:
                problems.append(f"{_rel(by_stem[stem], top)}: no mask (expected "
                                f"{' or '.join(_rel(masks / n, top) for n in names)})")
                continue
            claimed.add(hit)
            found.append((stem, by_stem[stem], mask_files[hit]))
        for name in sorted(set(mask_files) - claimed):
            problems.append(f"{_rel(mask_files[name], top)}: mask without image "
                            f"(no {self.images_dir}/<stem>.png for it)")
        groups = group_by_prefix([stem for stem, _, _ in found], self.always_group_by_prefix)
        return [Pair(stem, groups[stem], img, mask) for stem, img, mask in found], problems


def group_by_prefix(stems: list[str], always: bool = False) -> dict[str, str]:
    """Split groups: the letters an id starts with ("FudanPed00001" -> "FudanPed"), when every such group
    is large enough to reach all three splits (or `always`); otherwise one group, "all"."""
    prefix = {s: (m.group(0) if (m := re.match(r"[A-Za-z]+", s)) else "") for s in stems}
    if always:
        return prefix
    sizes: dict[str, int] = {}
    for g in prefix.values():
        sizes[g] = sizes.get(g, 0) + 1
    if len(sizes) > 1 and all(n >= _MIN_GROUP for n in sizes.values()) and "" not in sizes:
        return prefix
    return {s: "all" for s in stems}


PENN_FUDAN = Layout("penn-fudan", "PNGImages", "PedMasks", ("_mask",), root_name="PennFudanPed",
                    required=("Annotation",), always_group_by_prefix=True)
FOLDER = Layout("folder", "images", "masks", ("", "_mask"))
LAYOUTS = {layout.name: layout for layout in (PENN_FUDAN, FOLDER)}
ALIASES = {"pennfudan": "penn-fudan", "penn_fudan": "penn-fudan", "images-masks": "folder"}


FORMATS = ("auto", *LAYOUTS, "coco")


def get_layout(fmt: str, top: Path, *, categories: list[str] | None = None,
               keep_empty: bool = False):
    """The layout for `fmt` ("auto" tries Penn-Fudan, then images+masks, then COCO), or None and the
    problem. `categories` and `keep_empty` are the COCO adapter's options (an error for the others)."""
    from components.datasets.coco import CocoLayout

    fmt = ALIASES.get(fmt.lower(), fmt.lower())
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; choose {', '.join(FORMATS)}")
    coco = CocoLayout(categories, keep_empty)
    chosen = coco if fmt == "coco" else LAYOUTS.get(fmt)
    if fmt == "auto":
        chosen = next((lay for lay in (*LAYOUTS.values(), coco) if lay.find_root(top) is not None), None)
        if chosen is None:
            return None, ["not a known dataset layout: expected " + " or ".join(
                f"[{lay.expected()}]" for lay in (*LAYOUTS.values(), coco)) + f"; found {_listing(top)}"]
    if chosen is not coco and (categories or keep_empty):
        return None, [f"{chosen.name} layout: --categories and --keep-empty apply to COCO datasets only"]
    return chosen, []


def _entries(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.name not in _IGNORED)


def _rel(path: Path, top: Path) -> str:
    try:
        return path.relative_to(top).as_posix()
    except ValueError:
        return str(path)


def _listing(top: Path) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in _entries(top)]
    if not names:
        return "nothing"
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
