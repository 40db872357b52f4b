"""predict: segment images with a registered version or a checkpoint file, and write what the next tool reads.

Prompts: the boxes of a COCO JSON (each annotation's `bbox`, matched to images by `file_name`), a
boxes file (`file x0 y0 x1 y1 [category_id]` per line, pixels, XYXY), or none: SAM's automatic mask
generator (the official `SamAutomaticMaskGenerator`) over the whole image.

Box prompts are decoded as evaluation decodes them (prompt_batch.first_round_tokens + decode_all, output
0, postprocess_masks): the numbers a user sees are the numbers the gate scored. Embeddings are computed
once per image, `batch_size` images per encoder call (embeddings.compute_embeddings).

Outputs under `out_dir`: masks/<stem>.png (8-bit instance ids, 0 = background; where predictions
overlap the higher score wins), predictions.json (COCO results: RLE segmentation, bbox, score =
SAM's predicted IoU), overlays/<stem>.png. Written to a hidden folder and moved into place at the end,
so a failed run leaves nothing half-written.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from components.datasets.adapters import IMAGE_EXTS
from components.datasets.coco import encode_rle
from components.errors import UserError, first_line
from components.label_values import MAX_INSTANCES

log = logging.getLogger(__name__)


class PredictError(UserError, ValueError):
    """Bad predict input: one line per problem, each naming its file."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__("\n".join([f"{n} problem{'s' if n != 1 else ''} in the predict input:",
                                    *(f"  {p}" for p in self.problems)]) if n > 1 else self.problems[0])


@dataclass
class ImagePrompts:
    path: Path
    image_id: int
    boxes: np.ndarray | None = None  # (K, 4) XYXY pixels; None = automatic mask generation
    category_ids: list[int] = field(default_factory=list)


def list_images(images: Path) -> list[Path]:
    """An image file, or the image files of a folder (sorted)."""
    if images.is_file():
        return [images]
    if not images.is_dir():
        raise PredictError([f"{images}: no such file or folder"])
    found = sorted(p for p in images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                   and not p.name.startswith("."))
    if not found:
        raise PredictError([f"{images}: no image files ({' '.join(IMAGE_EXTS)})"])
    return found


def _by_name(images: Path) -> dict[str, Path]:
    return {p.name: p for p in list_images(images)}


def prompts_from_coco(json_path: Path, images: Path) -> list[ImagePrompts]:
    """One entry per COCO image found in `images`, with its annotations' boxes (COCO xywh -> XYXY; crowd
    annotations are not prompts)."""
    try:
        doc = json.loads(Path(json_path).read_bytes())
    except (OSError, ValueError) as e:
        raise PredictError([f"{json_path}: cannot read as JSON ({first_line(e)})"]) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("annotations"), list):
        raise PredictError([f"{json_path}: not a COCO file (expected 'images' and 'annotations' lists)"])
    files, problems, out = _by_name(images), [], {}
    for im in doc["images"]:
        if not isinstance(im, dict) or not isinstance(im.get("id"), int):
            problems.append(f"{json_path}: image {im!r:.80} has no integer 'id'")
            continue
        name = Path(str(im.get("file_name", ""))).name
        if name not in files:
            problems.append(f"{json_path}: image id {im.get('id')}: {name or 'no file_name'} not in {images}")
        else:
            out[im["id"]] = ImagePrompts(files[name], int(im["id"]), np.zeros((0, 4)), [])
    for ann in doc["annotations"]:
        if not isinstance(ann, dict):
            problems.append(f"{json_path}: annotation {ann!r:.80} is not an object")
            continue
        if ann.get("iscrowd"):
            continue  # a crowd region is not an object to segment
        entry = out.get(ann.get("image_id"))
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            problems.append(f"{json_path}: annotation {ann.get('id', '?')}: no bbox [x, y, width, height]")
        elif entry is not None:
            x, y, w, h = box
            entry.boxes = np.vstack([entry.boxes, [x, y, x + max(w - 1, 0), y + max(h - 1, 0)]])
            entry.category_ids.append(int(ann.get("category_id", 1)))
    if problems:
        raise PredictError(problems)
    return [out[k] for k in sorted(out)]


def prompts_from_boxes_file(path: Path, images: Path) -> list[ImagePrompts]:
    """`file x0 y0 x1 y1 [category_id]` lines (spaces or commas; '#' comments) -> prompts per image."""
    files, problems, out = _by_name(images), [], {}
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PredictError([f"{path}: cannot read ({first_line(e)})"]) from None
    for n, line in enumerate(lines, 1):
        parts = [p for p in re.split(r"[,\s]+", line.split("#", 1)[0].strip()) if p]
        if not parts:
            continue
        try:
            x0, y0, x1, y1 = (float(v) for v in parts[1:5])
            cat = int(parts[5]) if len(parts) > 5 else 1
            if len(parts) not in (5, 6) or x1 < x0 or y1 < y0:
                raise ValueError
        except ValueError:
            problems.append(f"{path}:{n}: expected 'file x0 y0 x1 y1 [category_id]' with x0 <= x1, y0 <= y1")
            continue
        name = Path(parts[0]).name
        if name not in files:
            problems.append(f"{path}:{n}: {name} not in {images}")
            continue
        entry = out.setdefault(name, ImagePrompts(files[name], 0, np.zeros((0, 4)), []))
        entry.boxes = np.vstack([entry.boxes, [x0, y0, x1, y1]])
        entry.category_ids.append(cat)
    if problems:
        raise PredictError(problems)
    return _numbered([out[k] for k in sorted(out)])


def prompts_automatic(images: Path) -> list[ImagePrompts]:
    return _numbered([ImagePrompts(p, 0) for p in list_images(images)])


def _numbered(prompts: list[ImagePrompts]) -> list[ImagePrompts]:
    for i, p in enumerate(prompts, 1):  # image ids of the results file: 1.. in file name order
        p.image_id = i
    return prompts


@torch.no_grad()
def decode_boxes(model, emb: torch.Tensor, frame, boxes: np.ndarray, chunk: int = 64
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(K, 4) XYXY boxes in original pixels -> ((K, H, W) bool masks, (K,) predicted IoU), output 0."""
    from components.sam.prompt_batch import decode_all, first_round_tokens
    from components.sam.transforms import postprocess_masks

    device = next(model.parameters()).device
    b = torch.as_tensor(frame.boxes_to_input(np.asarray(boxes, dtype=np.float64)), dtype=torch.float32,
                        device=device)
    masks, scores = [], []
    for s in range(0, len(b), chunk):
        coords, labels = first_round_tokens(b[s:s + chunk], None, len(b[s:s + chunk]), 2, device)
        low, iou = decode_all(model, emb.to(device), None, coords, labels)
        masks.append((postprocess_masks(low[:, :1].float(), frame) > 0)[:, 0].cpu().numpy())
        scores.append(iou[:, 0].float().cpu().numpy())
    h, w = frame.original_size
    if not masks:
        return np.zeros((0, h, w), bool), np.zeros(0, np.float32)
    return np.concatenate(masks), np.concatenate(scores)


def automatic_masks(model, image: np.ndarray, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """The official SamAutomaticMaskGenerator over the whole image -> (masks, predicted IoU)."""
    from segment_anything import SamAutomaticMaskGenerator

    found = SamAutomaticMaskGenerator(model, **kwargs).generate(image)
    if not found:
        return np.zeros((0, *image.shape[:2]), bool), np.zeros(0, np.float32)
    return (np.stack([f["segmentation"] for f in found]).astype(bool),
            np.array([f["predicted_iou"] for f in found], dtype=np.float32))


def instance_png(masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(K, H, W) masks -> HxW uint8 ids 1..K in predictions.json's order; where masks overlap the higher
    score wins. Past 254 instances (8-bit) the best-scoring 254 are drawn, numbered 1..254 in that order."""
    label = np.zeros(masks.shape[1:], np.uint8)
    keep = np.sort(np.argsort(-scores, kind="stable")[:MAX_INSTANCES])
    if len(scores) > MAX_INSTANCES:
        log.warning("%d instances: the PNG holds the %d best-scoring (predictions.json has all)",
                    len(scores), MAX_INSTANCES)
    ids = {int(k): n + 1 for n, k in enumerate(keep)}
    for k in sorted(ids, key=lambda k: scores[k]):  # lowest score first, so the highest is painted last
        label[masks[k]] = ids[k]
    return label


def coco_results(image_id: int, masks: np.ndarray, scores: np.ndarray, category_ids: list[int]) -> list[dict]:
    out = []
    for k, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                float(ys.max() - ys.min() + 1)] if len(xs) else [0.0, 0.0, 0.0, 0.0]
        out.append({"image_id": int(image_id), "category_id": int(category_ids[k]) if category_ids else 1,
                    "segmentation": encode_rle(m), "bbox": bbox, "score": float(scores[k])})
    return out


def load_model(checkpoint: Path, model_type: str, device: str = "auto"):
    """The checkpoint in the official architecture, in eval mode, on CUDA when present (device "auto")."""
    from components.sam.device import resolve_device
    from components.sam.model import build_sam

    dev = resolve_device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    try:
        return build_sam(model_type, checkpoint, dev)
    except (FileNotFoundError, ValueError) as e:
        raise PredictError([first_line(e)]) from None


def fetch_registered(store, spec: str, dest_dir: Path) -> tuple[Path, str, str]:
    """`NAME[:VERSION]` (default the latest) from the object-store registry -> (model.pt, model_type,
    "NAME:VERSION")."""
    from components.registry import LATEST, ObjectStoreRegistry, RegistryError

    name, _, version = spec.partition(":")
    registry = ObjectStoreRegistry(store)
    version = version or LATEST
    if version == LATEST:
        pointer = registry.latest(name)
        if pointer is None:
            raise RegistryError(f"model {name!r} has no registered version in {store.uri(store.key('models'))}")
        version = pointer["version"]
    if version not in registry.versions(name):
        raise RegistryError(f"model {name!r} has no version {version!r} (it has: "
                            f"{', '.join(registry.versions(name)) or 'none'})")
    path = registry.fetch(name, version, Path(dest_dir) / "model.pt")
    model_type = (registry.card(name, version).get("model") or {}).get("model_type") or "vit_t"
    return path, model_type, f"{name}:{version}"


def read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise PredictError([f"{path}: cannot decode as an image ({first_line(e)})"]) from None


def predict(model, prompts: list[ImagePrompts], out_dir: Path, *, batch_size: int = 4,
            progress: bool = True) -> dict:
    """Segment every image of `prompts`; writes out_dir (see the module docstring); returns a summary."""
    from tqdm import tqdm

    from components.report import overlay
    from components.sam.embeddings import compute_embeddings
    from components.sam.transforms import Frame

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PredictError([f"{out_dir}: exists and is not empty; choose another --output or remove it"])
    work = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "masks").mkdir(parents=True)
    (work / "overlays").mkdir()
    results, n_instances = [], 0
    try:
        bar = tqdm(total=len(prompts), desc="predict", unit="image", disable=not progress)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            images = [read_rgb(p.path) for p in chunk]
            boxed = [i for i, p in enumerate(chunk) if p.boxes is not None and len(p.boxes)]
            embs = compute_embeddings(model, [images[i] for i in boxed], batch_size=batch_size) if boxed else []
            emb_of = dict(zip(boxed, embs))
            for i, (p, image) in enumerate(zip(chunk, images)):
                if p.boxes is None:
                    masks, scores = automatic_masks(model, image)
                elif i in emb_of:
                    masks, scores = decode_boxes(model, emb_of[i], Frame.for_size(*image.shape[:2]), p.boxes)
                else:
                    masks, scores = np.zeros((0, *image.shape[:2]), bool), np.zeros(0, np.float32)
                label = instance_png(masks, scores)
                Image.fromarray(label, "L").save(work / "masks" / f"{p.path.stem}.png")
                Image.fromarray(overlay(image, list(masks))).save(work / "overlays" / f"{p.path.stem}.png")
                results += coco_results(p.image_id, masks, scores, p.category_ids)
                n_instances += len(masks)
                bar.update(1)
        bar.close()
        (work / "predictions.json").write_text(json.dumps(results))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"images": len(prompts), "instances": n_instances, "output": str(out_dir),
            "predictions": str(out_dir / "predictions.json")}
