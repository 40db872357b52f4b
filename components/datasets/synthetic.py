"""Synthetic stand-ins for Penn-Fudan (there is no internet here) and tiny in-memory training samples.

`make_pennfudan` writes the real set's layout and file formats (RGB PNG images, 8-bit L masks with
0 = background and 1..N = pedestrians, PASCAL-style Annotation/*.txt); at its defaults it also has the
real set's statistics: 74 FudanPed + 96 PennPed images, 423 pedestrians, at most 8 per image, widths
253..1017 px. Textured noise keeps the PNGs about as large as the real photos, which matters for the
upload benchmark.
"""
from __future__ import annotations

import argparse
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from components.datasets.reader import Sample
from components.hashing import sha256_bytes

REAL_IMAGES = 170
REAL_INSTANCES = 423
MAX_INSTANCES = 8
ROOT = "PennFudanPed"


@dataclass(frozen=True)
class ImageSpec:
    id: str
    width: int
    height: int
    instances: int


def plan_pennfudan(n_fudan: int, n_penn: int, seed: int, size_range=(253, 1017),
                   total_instances: int | None = None, max_instances: int = MAX_INSTANCES) -> list[ImageSpec]:
    """Image names, sizes and pedestrian counts; the defaults reproduce the real set's totals."""
    rng = np.random.default_rng(seed)
    ids = [f"FudanPed{i:05d}" for i in range(1, n_fudan + 1)] + [f"PennPed{i:05d}" for i in range(1, n_penn + 1)]
    n = len(ids)
    if n == 0:
        return []
    if total_instances is None:
        total_instances = round(n * REAL_INSTANCES / REAL_IMAGES)
    total_instances = int(np.clip(total_instances, n, n * max_instances))
    counts = np.ones(n, dtype=int)
    if total_instances >= n + max_instances - 1:  # one crowded image, like the real set's maximum
        counts[rng.integers(n)] = max_instances
    for _ in range(total_instances - int(counts.sum())):
        open_slots = np.flatnonzero(counts < max_instances)
        counts[rng.choice(open_slots)] += 1
    lo, hi = size_range
    widths = rng.integers(lo, hi + 1, size=n)
    if n >= 2:  # span the whole range, as the real set does
        a, b = rng.choice(n, size=2, replace=False)
        widths[a], widths[b] = lo, hi
    heights = np.maximum(16, (widths * rng.uniform(0.5, 0.9, size=n)).astype(int))
    return [ImageSpec(i, int(w), int(h), int(c)) for i, w, h, c in zip(ids, widths, heights, counts)]


def _background(rng, h: int, w: int) -> np.ndarray:
    """A street-like grey gradient with sensor noise (noise keeps PNG sizes photo-like); int16 HxWx3."""
    base = rng.uniform(60, 170, size=3)
    ramp = np.linspace(-25, 25, h)[:, None, None] * rng.uniform(0.5, 1.0)
    img = np.broadcast_to((base + ramp).astype(np.int16), (h, w, 3)).copy()
    img += rng.integers(-4, 5, size=(h, w, 3), dtype=np.int16)
    return img


def _draw_person(img, mask, inst: int, x0: int, x1: int, rng) -> tuple[int, int, int, int]:
    """An upright 'pedestrian' (head + ellipse body) inside columns x0..x1, striped in a vivid colour;
    returns its 1-based PASCAL box."""
    h, w = mask.shape
    slot = max(2, x1 - x0)
    body_w = max(1.5, slot * rng.uniform(0.25, 0.4))
    height = h * rng.uniform(0.45, 0.85)
    foot = rng.uniform(0.9, 0.99) * h
    top = foot - height
    cx = x0 + slot / 2 + rng.uniform(-0.08, 0.08) * slot
    head_r = max(1.0, min(body_w * 0.8, height * 0.12))
    body_top = top + 2 * head_r
    cy, ry = (body_top + foot) / 2, max(1.5, (foot - body_top) / 2)
    y0, y1 = max(0, int(top) - 1), min(h, int(foot) + 2)  # only the rows the figure can touch
    yy, xx = np.mgrid[y0:y1, x0:x1]
    person = ((xx - cx) / body_w) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    person |= (xx - cx) ** 2 + (yy - (top + head_r)) ** 2 <= head_r ** 2
    if not person.any():  # a degenerate draw on a tiny image: keep at least one pixel
        person[min(y1 - y0 - 1, max(0, int(cy) - y0)), min(x1 - x0 - 1, max(0, int(cx) - x0))] = True
    colour = rng.uniform(0, 255, size=3)
    colour[rng.integers(3)] = rng.uniform(200, 255)  # saturated, so it stands out of the grey street
    stripes = (np.sin(yy[person] * rng.uniform(0.3, 0.8)) * 30)[:, None]
    noise = rng.integers(-6, 7, size=(int(person.sum()), 3))
    img[y0:y1, x0:x1][person] = (colour + stripes + noise).astype(np.int16)
    mask[y0:y1, x0:x1][person] = inst
    ys, xs = np.nonzero(person)
    return int(xs.min()) + x0 + 1, int(ys.min()) + y0 + 1, int(xs.max()) + x0 + 1, int(ys.max()) + y0 + 1


def render(spec: ImageSpec, seed: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int, int]]]:
    """(RGB image, L mask, 1-based PASCAL boxes) for one planned image; pedestrians never overlap."""
    # Seeded by the image's name, so one image does not change when the set's size does.
    rng = np.random.default_rng([seed] + [ord(c) for c in spec.id])
    h, w = spec.height, spec.width
    img = _background(rng, h, w)
    mask = np.zeros((h, w), dtype=np.uint8)
    edges = np.linspace(0, w, spec.instances + 1).astype(int)
    boxes = [_draw_person(img, mask, k + 1, int(edges[k]), int(edges[k + 1]), rng)
             for k in range(spec.instances)]
    return np.clip(img, 0, 255).astype(np.uint8), mask, boxes


def annotation_text(spec: ImageSpec, boxes) -> str:
    """PASCAL Annotation Version 1.00 text, as in the real PennFudanPed/Annotation/*.txt files."""
    lines = [
        "# Compatible with PASCAL Annotation Version 1.00",
        f'Image filename : "{ROOT}/PNGImages/{spec.id}.png"',
        f"Image size (X x Y x C) : {spec.width} x {spec.height} x 3",
        'Database : "The Penn-Fudan-Pedestrian Database"',
        f"Objects with ground truth : {len(boxes)} {{ "
        + " ".join('"PASpersonWalking"' for _ in boxes) + " }",
        "# Note there may be some objects not included in the ground truth list for they are severe-occluded",
        "# or have very small size.",
        "# Top left pixel co-ordinates : (1, 1)",
    ]
    for k, (x0, y0, x1, y1) in enumerate(boxes, 1):
        lines += [
            f'# Details for pedestrian {k} ("PASpersonWalking")',
            f'Original label for object {k} "PASpersonWalking" : "PennFudanPed"',
            f'Bounding box for object {k} "PASpersonWalking" (Xmin, Ymin) - (Xmax, Ymax) : '
            f"({x0}, {y0}) - ({x1}, {y1})",
            f'Pixel mask for object {k} "PASpersonWalking" : "{ROOT}/PedMasks/{spec.id}_mask.png"',
            "",
        ]
    return "\n".join(lines) + "\n"


def make_pennfudan(root: Path, n_fudan: int = 74, n_penn: int = 96, seed: int = 0, size_range=(253, 1017),
                   total_instances: int | None = None, workers: int = 4) -> Path:
    """Write root/PennFudanPed/{PNGImages,PedMasks,Annotation}; returns root/PennFudanPed."""
    base = Path(root) / ROOT
    dirs = {d: base / d for d in ("PNGImages", "PedMasks", "Annotation")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)

    def write(spec: ImageSpec) -> None:
        img, mask, boxes = render(spec, seed)
        # Fast zlib level: these files exist to be moved around, and noise does not compress anyway.
        Image.fromarray(img, "RGB").save(dirs["PNGImages"] / f"{spec.id}.png", compress_level=1)
        Image.fromarray(mask, "L").save(dirs["PedMasks"] / f"{spec.id}_mask.png")
        (dirs["Annotation"] / f"{spec.id}.txt").write_text(annotation_text(spec, boxes))

    # PNG encoding releases the GIL; each image has its own RNG, so threads keep the output deterministic.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(write, plan_pennfudan(n_fudan, n_penn, seed, size_range, total_instances)))
    return base


def zip_folder(folder: Path, zip_path: Path) -> Path:
    """Zip `folder` so that its own name is the archive's root, with directory entries like the real zip."""
    folder, zip_path = Path(folder), Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for path in sorted([folder, *folder.rglob("*")]):
            zf.write(path, path.relative_to(folder.parent).as_posix())
    return zip_path


def make_pennfudan_zip(zip_path: Path, n_fudan: int = 74, n_penn: int = 96, seed: int = 0,
                       size_range=(253, 1017), total_instances: int | None = None) -> Path:
    """PennFudanPed.zip with the official archive's root folder."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_pennfudan(Path(tmp), n_fudan, n_penn, seed, size_range, total_instances)
        return zip_folder(folder, zip_path)


def make_folder(root: Path, stems: list[str], seed: int = 0, size=(48, 64), mask_suffix: str = "",
                image_ext: str = ".png") -> Path:
    """A generic `images/` + `masks/` dataset (the folder adapter's layout) with the given stems."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i, sample in enumerate(make_samples(len(stems), seed, size)):
        stem = stems[i]
        Image.fromarray(sample.image, "RGB").save(root / "images" / f"{stem}{image_ext}")
        Image.fromarray(sample.mask, "L").save(root / "masks" / f"{stem}{mask_suffix}.png")
    return root


def make_samples(n: int, seed: int = 0, size=(64, 64), max_instances: int = 3) -> list[Sample]:
    """In-memory samples a decoder can learn: 1..max_instances solid, striped, saturated shapes
    (ellipses and rectangles) on a dull low-contrast background."""
    rng = np.random.default_rng(seed)
    h, w = size
    samples = []
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        img = _background(rng, h, w) * 0.6 + 30
        mask = np.zeros((h, w), dtype=np.uint8)
        k = int(rng.integers(1, max_instances + 1))
        for inst in range(1, k + 1):
            for _ in range(20):  # retry until the new shape does not cover an earlier one entirely
                cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
                ry, rx = rng.uniform(0.1, 0.25) * h, rng.uniform(0.1, 0.25) * w
                if rng.random() < 0.5:
                    shape = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
                else:
                    shape = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
                shape &= mask == 0
                if shape.sum() >= max(4, h * w // 100):
                    break
            colour = rng.uniform(0, 120, size=3)
            colour[rng.integers(3)] = rng.uniform(210, 255)
            stripes = ((xx + yy) % 6 < 3)[..., None] * 35.0
            img[shape] = (colour + stripes)[shape]
            mask[shape] = inst
        # Drop ids an unlucky retry left empty, so 1..N stays dense.
        present = [v for v in range(1, k + 1) if (mask == v).any()]
        dense = np.zeros_like(mask)
        for new, old in enumerate(present, 1):
            dense[mask == old] = new
        image = np.clip(img, 0, 255).astype(np.uint8)
        samples.append(Sample(f"synthetic{i:05d}", image, dense, sha256_bytes(image.tobytes())))
    return samples


def main(argv: list[str] | None = None) -> None:
    """`python -m components.datasets.synthetic OUT_DIR [--zip]`: a Penn-Fudan-shaped dataset for offline demos."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--zip", action="store_true", help="write OUT_DIR/PennFudanPed.zip instead of a folder")
    parser.add_argument("--fudan", type=int, default=74)
    parser.add_argument("--penn", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-width", type=int, default=253)
    parser.add_argument("--max-width", type=int, default=1017)
    args = parser.parse_args(argv)
    size_range = (args.min_width, args.max_width)
    if args.zip:
        out = make_pennfudan_zip(args.out_dir / f"{ROOT}.zip", args.fudan, args.penn, args.seed, size_range)
    else:
        out = make_pennfudan(args.out_dir, args.fudan, args.penn, args.seed, size_range)
    print(out)


if __name__ == "__main__":
    main()
