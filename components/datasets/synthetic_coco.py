"""Small COCO instance-segmentation datasets for tests and offline demos, written the way annotation
tools export them: `images/` plus `annotations.json`.

`write_coco` turns instance-id masks (0 = background, 1..N, 255 = ignore as a crowd annotation) into
COCO annotations, so any mask dataset (e.g. synthetic.make_pennfudan's) can be re-exported as COCO.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from components.datasets.coco import encode_rle, uncompressed_rle
from components.datasets.synthetic import make_samples
from components.label_values import IGNORE, instance_ids

ENCODINGS = ("rle", "rle-uncompressed", "polygon")


def _box(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _polygon(m: np.ndarray) -> list[list[float]]:
    """The instance's bounding rectangle as a polygon: exact for the rectangles tests draw."""
    x, y, w, h = _box(m)
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _segmentation(m: np.ndarray, encoding: str):
    if encoding == "rle":
        return encode_rle(m)
    if encoding == "rle-uncompressed":
        return uncompressed_rle(m)
    return _polygon(m)


def write_coco(root: Path, samples: list[tuple[str, np.ndarray | Path, np.ndarray]], encoding: str = "rle",
               categories=("object",), json_name: str = "annotations.json") -> Path:
    """(stem, HxWx3 image or an image file to copy as is, HxW instance-id mask) triples -> root/images/ +
    root/<json_name>. Instance k gets category categories[(k - 1) % len(categories)]; 255 becomes one crowd
    annotation."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding {encoding!r}: choose {', '.join(ENCODINGS)}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    cats = [{"id": i + 1, "name": name, "supercategory": "thing"} for i, name in enumerate(categories)]
    images, anns = [], []
    for image_id, (stem, image, mask) in enumerate(samples, 1):
        if isinstance(image, Path):  # the same bytes: the same image to the content-addressed store
            name = f"{stem}{image.suffix}"
            shutil.copy(image, root / "images" / name)
        else:
            name = f"{stem}.png"
            Image.fromarray(image, "RGB").save(root / "images" / name)
        h, w = mask.shape
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        regions = [(int(k), mask == k, 0) for k in instance_ids(mask)]
        if (mask == IGNORE).any():
            regions.append((1, mask == IGNORE, 1))
        for k, m, crowd in regions:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cats[(k - 1) % len(cats)]["id"],
                         "iscrowd": crowd, "area": int(m.sum()), "bbox": _box(m),
                         "segmentation": encode_rle(m) if crowd else _segmentation(m, encoding)})
    path = root / json_name
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def make_coco(root: Path, n: int, seed: int = 0, size=(64, 64), encoding: str = "rle",
              categories=("object",)) -> Path:
    """A COCO export of `n` synthetic images (synthetic.make_samples' shapes); returns its folder."""
    samples = [(s.id, s.image, s.mask) for s in make_samples(n, seed, size)]
    write_coco(root, samples, encoding, categories)
    return Path(root)


def main(argv: list[str] | None = None) -> None:
    """`python -m components.datasets.synthetic_coco OUT_DIR`: a small COCO dataset for offline demos."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("-n", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--encoding", choices=ENCODINGS, default="rle")
    args = parser.parse_args(argv)
    print(make_coco(args.out_dir, args.n, args.seed, (args.size, args.size), args.encoding, ("shape", "blob")))


if __name__ == "__main__":
    main()
