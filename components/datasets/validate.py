"""Check every image/mask pair before anything is uploaded, and report all problems at once."""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from components.datasets.adapters import Pair, _rel
from components.errors import UserError, first_line
from components.hashing import sha256_file
from components.label_values import IGNORE, instance_ids

# Modes PIL turns into RGB faithfully; 16-bit and float images would be silently mangled.
_RGB_READABLE = {"RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr"}
_MASK_MODES = {"L", "P"}
MAX_PIXELS_ENV = "SAM_MAX_IMAGE_PIXELS"
# Penn-Fudan's largest image is about 0.5 megapixels; 100 MP still takes any camera photo, while a
# crafted 900 MP "decompression bomb" would need gigabytes of memory to decode.
DEFAULT_MAX_PIXELS = 100_000_000


class DatasetLimitError(UserError, ValueError):
    """A bad validation setting."""


class _TooLarge(Exception):
    """Carries one validation problem out of _open_checked."""


def max_image_pixels(override: int | None = None) -> int:
    """The pixel limit per image: the parameter, else SAM_MAX_IMAGE_PIXELS, else 100 megapixels."""
    if override:
        return int(override)
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_PIXELS
    if not value.isdigit() or int(value) <= 0:
        raise DatasetLimitError(f"{MAX_PIXELS_ENV}={value!r} must be a positive whole number of pixels")
    return int(value)


def _open_checked(path: Path, name: str, max_pixels: int):
    """Image.open with our own pixel limit, checked on the header before anything is decoded."""
    # Pillow refuses images above twice its own limit before we see their size; keep its limit at
    # least ours so that ours (and its message) decides. Only ever raised, never lowered.
    if (Image.MAX_IMAGE_PIXELS or 0) and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as e:
        # Pillow's message is "Image size (N pixels) exceeds limit of M pixels, ...": quote N.
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{found.group(1)} pixels" if found else f"more than {2 * Image.MAX_IMAGE_PIXELS} pixels"
        raise _TooLarge(f"{name}: image has {size}, above the limit of {max_pixels} "
                        f"(set {MAX_PIXELS_ENV} to allow larger images)") from None
    pixels = im.size[0] * im.size[1]
    if pixels > max_pixels:
        im.close()
        raise _TooLarge(f"{name}: image is {im.size[0]}x{im.size[1]} = {pixels} pixels, above the limit "
                        f"of {max_pixels} (set {MAX_PIXELS_ENV} to allow larger images)")
    return im


class DatasetError(UserError, ValueError):
    """Everything wrong with a dataset: a summary line, then one problem per line, each naming its file."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        n = len(self.problems)
        lines = [f"{n} problem{'s' if n != 1 else ''} in {source}:"] + [f"  {p}" for p in self.problems]
        super().__init__("\n".join(lines))


@dataclass
class Item:
    id: str
    group: str
    image_path: Path
    mask_path: Path
    image_sha256: str
    mask_sha256: str
    image_bytes: int
    mask_bytes: int
    width: int
    height: int
    instances: int
    categories: tuple[str, ...] | None = None  # per instance 1..N, for layouts that name them (COCO)
    split: str = ""
    splits: list[str] = field(default_factory=list)


def check_pair(pair: Pair, top: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Item | None, list[str]]:
    img_name, mask_name = _rel(pair.image_path, top), _rel(pair.mask_path, top)
    problems = []
    size = None
    try:
        with _open_checked(pair.image_path, img_name, max_pixels) as im:
            im.load()  # decode fully: a truncated file fails here, not in the middle of training
            if im.mode not in _RGB_READABLE:
                problems.append(f"{img_name}: image mode {im.mode} cannot be read as RGB")
            size = im.size
    except _TooLarge as e:
        problems.append(str(e))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        problems.append(f"{img_name}: cannot decode as an image ({first_line(e)})")
    instances = 0
    try:
        with _open_checked(pair.mask_path, mask_name, max_pixels) as m:
            m.load()
            if m.mode not in _MASK_MODES:
                kind = "16-bit" if m.mode.startswith("I;16") or m.mode == "I" else f"mode {m.mode}"
                problems.append(f"{mask_name}: mask is {kind} ({m.mode}); masks must be 8-bit L or P "
                                "with 0 = background and 1..N = instances")
            else:
                values = np.unique(np.asarray(m))
                instances = len(instance_ids(values))
                if not pair.annotated_in:  # rendered masks may be empty or all object: the adapter decided
                    problems += _mask_content_problems(mask_name, values, instances)
            if size is not None and m.size != size:
                problems.append(f"{img_name}: image is {size[0]}x{size[1]} but "
                                + (f"{pair.annotated_in} says {m.size[0]}x{m.size[1]}" if pair.annotated_in
                                   else f"its mask {mask_name} is {m.size[0]}x{m.size[1]}"))
    except _TooLarge as e:
        problems.append(str(e))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        problems.append(f"{mask_name}: cannot decode as a PNG mask ({first_line(e)})")
    if problems:
        return None, problems
    return Item(pair.id, pair.group, pair.image_path, pair.mask_path,
                sha256_file(pair.image_path), sha256_file(pair.mask_path),
                pair.image_path.stat().st_size, pair.mask_path.stat().st_size,
                size[0], size[1], instances, pair.categories if pair.annotated_in else None), []


def _mask_content_problems(mask_name: str, values: np.ndarray, instances: int) -> list[str]:
    if values[0] != 0:
        # An all-foreground mask is almost always an inverted one (255 = background).
        return [f"{mask_name}: mask has no background pixel (0 = background); is it inverted?"]
    if instances == 0 and IGNORE in values:
        return [f"{mask_name}: mask has no instance, only 0 = background and {IGNORE} = ignore; a binary "
                f"mask must mark its object with 1 ({IGNORE} is reserved for regions to leave out)"]
    if instances == 0:
        return [f"{mask_name}: mask has no instance (every pixel is 0 = background)"]
    return []


def validate(pairs: list[Pair], top: Path, source: str, problems: list[str] | None = None,
             workers: int = 4, max_pixels: int | None = None) -> list[Item]:
    """Items for all pairs, or a DatasetError listing every problem (layout ones first)."""
    limit = max_image_pixels(max_pixels)
    problems = list(problems or [])
    if not pairs and not problems:
        problems.append(f"empty dataset: no images found under {source}")
    # PIL decodes with the GIL released, so threads use both cores.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(lambda p: check_pair(p, top, limit), pairs))
    items = []
    for item, found in results:
        problems += found
        if item is not None:
            items.append(item)
    if problems:
        raise DatasetError(source, problems)
    return items
