"""evaluate: the zero-shot checkpoint, the fine-tuned model and the registered champion, scored alike.

Every ground-truth instance of the test split is prompted twice: with its tight box, and with one
positive point at its centre (the pixel farthest from the mask's border, so the click is inside even
for concave shapes). Prompts are decoded exactly as training decodes them (components/sam/prompt_batch.py:
the same tokens, the same rule for which output counts): a box gives output 0; a single point is
ambiguous, so of SAM's outputs 1-3 (the heads training fits for single points) it keeps the one with
the highest predicted IoU, as SamPredictor users do. Per-instance Dice and IoU (higher is better) are
computed at the original image resolution, in fp32 (training's validation too).

The gate (components/gate.py) decides on paired per-image differences with a bootstrap interval. The champion
is scored only on the test images it never trained or validated on (`champion_seen`: the image content hashes
of its dataset version's train and val splits, components/card.py); zero-shot and fine-tuned are scored on the
whole test split.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from components.coco_eval import coco_mask_ap
from components.errors import UserError, first_line
from components.eval_metrics import PROMPTS, STATS, CandidateScores, metric_key
from components.gate import MIN_COMPARABLE_IMAGES, Verdict, decide
from components.label_values import IGNORE
from components.report import Report, overlay
from components.sam.embeddings import EmbeddingCache
from components.sam.metrics import dice_iou, summarize
from components.sam.model import ENCODER_PREFIX, build_sam, load_state_dict_file, load_strict
from components.sam.prompt_batch import decode_prompts
from components.sam.prompts import deepest_points, instance_masks, masks_to_boxes
from components.sam.transforms import Frame
from components.storage import StorageError
from components.training.data import scored_pairs

log = logging.getLogger(__name__)
OVERLAY_IMAGES = 4


class EvaluationError(UserError, ValueError):
    """A one-line evaluation failure (nothing to evaluate, unreadable checkpoint)."""


@dataclass
class Candidate:
    label: str  # "zero_shot", "finetuned", "champion": the metric name prefix
    title: str
    weights: Path
    model_type: str


def encoder_fingerprint(state: dict) -> str:
    """sha256 of the image encoder's tensors: models that share it share their image embeddings."""
    h = hashlib.sha256()
    for key in sorted(k for k in state if k.startswith(ENCODER_PREFIX)):
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def centre_points(masks: torch.Tensor) -> np.ndarray:
    """(N, H, W) bool -> (N, 2) x/y of each instance's deepest pixel."""
    coords, valid = deepest_points(masks)
    if not bool(valid.all()):
        raise EvaluationError("an instance mask is empty; cannot place a point inside it")
    return coords.cpu().numpy().astype(np.float64)


@torch.no_grad()
def score_model(model, scored: Iterable, *, keep_masks: int = 0) -> dict:
    """Per-instance Dice/IoU for box and centre-point prompts, and COCO mask AP of the box-prompted masks (score =
    predicted IoU: the field's metric, comparable with published numbers), over `scored` (training.data.Scored:
    a sample and its embedding); masks of the first `keep_masks` images are returned for the report's overlays."""
    device = next(model.parameters()).device
    rows, kept, ap_images, ap_predictions = [], {}, [], []
    for idx, pair in enumerate(scored):
        sample, emb = pair.sample, pair.embedding
        ids, gt = instance_masks(np.asarray(sample.mask))
        if len(ids) == 0:
            continue
        h, w = gt.shape[1:]
        frame = Frame.for_size(h, w)
        gt_t = torch.from_numpy(gt)
        emb = emb.to(device)
        box = decode_prompts(model, emb, frame, masks_to_boxes(gt), None)
        box_masks = box.masks
        ap_images.append((idx + 1, np.asarray(sample.mask), None))
        ap_predictions.append((idx + 1, box_masks.numpy(), box.scores.numpy()))
        pt_masks = decode_prompts(model, emb, frame, None, centre_points(gt_t)[:, None, :]).masks
        ignore = np.asarray(sample.mask) == IGNORE  # crowd regions count neither way
        box_dice, box_iou = dice_iou(box_masks, gt_t, ignore)
        pt_dice, pt_iou = dice_iou(pt_masks, gt_t, ignore)
        for j, inst in enumerate(ids.tolist()):
            rows.append({"image": sample.id, "instance": int(inst), "box_dice": float(box_dice[j]),
                         "box_iou": float(box_iou[j]), "point_dice": float(pt_dice[j]),
                         "point_iou": float(pt_iou[j])})
        if idx < keep_masks:
            kept[sample.id] = box_masks.numpy()
    return {"instances": rows, "masks": kept, "coco": coco_mask_ap(ap_images, ap_predictions)}


def _aggregate(label: str, rows: list[dict]) -> dict:
    values = {}
    for prompt in PROMPTS:
        for stat in STATS:
            s = summarize([r[f"{prompt}_{stat}"] for r in rows])
            values[f"{prompt}_{stat}"], values[f"{prompt}_{stat}_median"] = s["mean"], s["median"]
    return CandidateScores(**values).flat(label)


def _per_image(rows: list[dict]) -> dict[str, dict]:
    by: dict[str, list] = {}
    for r in rows:
        by.setdefault(r["image"], []).append(r)
    return {img: {"instances": len(rs), **{k: float(np.mean([r[k] for r in rs]))
                                           for k in ("box_dice", "box_iou", "point_dice", "point_iou")}}
            for img, rs in by.items()}


def evaluate(model_type: str, zero_shot_weights: str | Path, finetuned_weights: str | Path,
             test_split, *, champion_weights: str | Path | None = None,
             champion_model_type: str | None = None, champion_name: str = "",
             champion_seen: frozenset[str] | None = frozenset(), margin: float = 0.0,
             device: str = "cpu", report_path: str | Path | None = None, history: dict | None = None,
             store=None, zero_shot_sha256: str = "", refused: tuple[str, ...] = (), champion_note: str = "") -> dict:
    """Score every candidate on `test_split` (a split of annotated images: reader.SplitRefs(annotated_only=True),
    or reader.SampleSplit; the champion on those whose image is not in `champion_seen`; None: what it saw is
    unknown, so it cannot be compared fairly), embeddings cached in `store`; returns the metrics, the gate's
    intervals and `passed`, writes the report. `refused`: reasons registration is refused whatever the scores."""
    from components.sam.device import resolve_device

    t0 = time.perf_counter()
    if not len(test_split):
        raise EvaluationError("the test split has no annotated instance: nothing to evaluate")
    dev = resolve_device(device)
    title = f"champion {champion_name}".strip()
    candidates = [(Candidate("zero_shot", "zero-shot", Path(zero_shot_weights), model_type), test_split),
                  (Candidate("finetuned", "fine-tuned", Path(finetuned_weights), model_type), test_split)]
    refused = tuple(refused)
    if champion_weights and champion_seen is None:
        refused += (f"{title} does not record the images it trained and validated on, so it cannot be compared "
                    "fairly (register under a new --model-name to start a new line of versions)",)
    elif champion_weights:
        candidates.append((Candidate("champion", title, Path(champion_weights), champion_model_type or model_type),
                           test_split.without(champion_seen)))
    keep = OVERLAY_IMAGES if report_path else 0
    results = _score_candidates(candidates, dev, store, zero_shot_sha256, keep)
    metrics = _metrics(results, len(test_split), float(margin), champion_name, champion_note)
    verdict = decide(results["finetuned"]["instances"], results["zero_shot"]["instances"],
                     results["champion"]["instances"] if "champion" in results else None, float(margin),
                     champion_name=title, champion_excluded=metrics.get("champion_excluded_images", 0),
                     refused=refused)
    metrics.update(verdict.metrics())
    metrics["passed"] = verdict.passed
    metrics["verdict"] = "passed" if verdict.passed else "not passed: " + "; ".join(verdict.reasons)
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    if report_path:
        shown = [test_split.load(i) for i in range(min(keep, len(test_split)))]
        write_report(report_path, metrics, results, shown, history, verdict)
    return metrics


def _score_candidates(candidates: list, device, store, zero_shot_sha256: str, keep: int) -> dict[str, dict]:
    """Each (candidate, its samples) scored; candidates that share an image encoder share its embeddings."""
    caches: dict[str, EmbeddingCache] = {}  # by encoder fingerprint
    results: dict[str, dict] = {}
    for cand, subset in candidates:
        if not len(subset):
            results[cand.label] = {"instances": [], "masks": {}}
            continue
        model, fp = _load_candidate(cand, device)
        if fp not in caches:
            # The cache key must name the encoder: the zero-shot file's sha256 for its own encoder
            # (shared with finetune's cache), the fingerprint for any other.
            caches[fp] = EmbeddingCache(model, zero_shot_sha256 if cand.label == "zero_shot" and zero_shot_sha256
                                        else fp, store)
        results[cand.label] = score_model(model, scored_pairs(subset, caches[fp], device), keep_masks=keep)
        del model
    return results


def _metrics(results: dict, test_images: int, margin: float, champion_name: str, champion_note: str) -> dict:
    """The candidates' means and medians, COCO AP, and what the champion was compared on."""
    metrics: dict = {}
    for label, res in results.items():
        if res["instances"]:
            metrics.update(_aggregate(label, res["instances"]))
            metrics.update({f"{label}_{k}": v for k, v in res["coco"].items()})  # e.g. finetuned_mask_ap
    metrics.update({"test_images": test_images, "test_instances": len(results["zero_shot"]["instances"]),
                    "margin": margin, "champion_version": champion_name or None,
                    "champion_box_dice": metrics.get("champion_box_dice")})
    if "champion" in results:
        compared = len({r["image"] for r in results["champion"]["instances"]})
        metrics.update({"champion_test_images": compared, "champion_excluded_images": test_images - compared})
    if champion_note:
        metrics["champion_note"] = champion_note
    return metrics


def _load_candidate(cand: Candidate, device) -> tuple[torch.nn.Module, str]:
    state = load_state_dict_file(cand.weights)
    fp = encoder_fingerprint(state)
    model = build_sam(cand.model_type, None, "cpu")
    try:
        load_strict(model, state, f"{cand.title} checkpoint {cand.weights}", cand.model_type)
    except ValueError as e:
        raise EvaluationError(str(e)) from None
    return model.to(device).eval(), fp


def write_report(path, metrics: dict, results: dict, shown: list, history: dict | None, verdict: Verdict) -> None:
    """The report page; `shown`: the samples whose masks the examples overlay."""
    labels = [k for k in ("zero_shot", "finetuned", "champion") if results.get(k, {}).get("instances")]
    titles = {"zero_shot": "zero-shot", "finetuned": "fine-tuned",
              "champion": f"champion {metrics.get('champion_version') or ''}".strip()}
    rep = Report("SAM evaluation: zero-shot vs fine-tuned")
    rep.paragraph(("PASSED: the fine-tuned model will be registered" if verdict.passed else
                   "NOT PASSED: " + "; ".join(verdict.reasons))
                  + f" (margin {metrics['margin']:g}; {metrics['test_instances']} instances in "
                  f"{metrics['test_images']} test images; Dice and IoU per instance, higher is better).")
    _gate_section(rep, metrics, verdict, titles)
    rep.heading("Summary")
    rows = []
    for label in labels:
        rows.append([titles[label]] + [metrics[metric_key(label, p, m, s == "_median")] for p in PROMPTS
                                       for m in STATS for s in ("", "_median")])
    rep.table(["model"] + [f"{p} {m} {s}".strip() for p in PROMPTS for m in ("Dice", "IoU")
                           for s in ("mean", "median")], rows)
    rep.heading("Training")
    rep.history(history)
    if shown:
        rep.heading("Examples (box prompts)")
        grid = []
        for sample in shown:
            row = [(sample.id, sample.image), ("ground truth", overlay(sample.image, np.asarray(sample.mask)))]
            for label in labels:
                masks = results[label]["masks"].get(sample.id)
                if masks is not None:
                    row.append((titles[label], overlay(sample.image, list(masks))))
            grid.append(row)
        rep.image_grid(grid)
    rep.heading("Per image")
    per = {label: _per_image(results[label]["instances"]) for label in labels}
    table = []
    for img, base in per["zero_shot"].items():
        table.append([img, base["instances"]] + [per[label].get(img, {}).get(k, "left out")
                                                  for k in ("box_dice", "point_dice") for label in labels])
    rep.table(["image", "instances"] + [f"{titles[label]} {k}" for k in ("box Dice", "point Dice")
                                        for label in labels], table, max_rows=200)
    rep.write(path)


def _gate_section(rep: Report, metrics: dict, verdict: Verdict, titles: dict) -> None:
    """The gate's intervals as a chart and a table, and what the champion was compared on."""
    rep.heading("Is it better? Paired gain of the fine-tuned model, 95 % bootstrap interval over images")
    rows = [(f"{prompt} Dice vs {titles[baseline]}", iv.mean, iv.low, iv.high)
            for baseline, by_prompt in verdict.gains.items() for prompt, iv in by_prompt.items()]
    rep.intervals(rows, {"0": 0.0, f"margin {metrics['margin']:g}": metrics["margin"]})
    rep.table(["gain", "mean", "95 % low", "95 % high", "images", "instances"],
              [[label, mean, low, high, iv.images, iv.instances] for (label, mean, low, high), iv in
               zip(rows, [iv for by in verdict.gains.values() for iv in by.values()])])
    rep.paragraph("Registers when the box gain's lower end is above the margin against zero-shot and the champion, "
                  "and point prompts are not significantly worse (upper end not below 0); the champion needs at "
                  f"least {MIN_COMPARABLE_IMAGES} test images it never saw (components/gate.py).", muted=True)
    if "champion_test_images" in metrics:
        rep.paragraph(f"{titles['champion']} was scored on {metrics['champion_test_images']} of "
                      f"{metrics['test_images']} test images; {metrics['champion_excluded_images']} left out because "
                      "they were in its training or validation data (zero-shot and fine-tuned are scored on all).")
    if metrics.get("champion_note"):
        rep.paragraph(metrics["champion_note"] + ".")


def training_history(history_uri: str | None, store=None) -> dict | None:
    """Training curves, from the small JSON finetune leaves beside the run's checkpoints."""
    if store is None or not history_uri:
        return None
    bucket, key = store.parse_uri(history_uri)
    try:
        hist = store.for_bucket(bucket).get_json(key)
    except (StorageError, json.JSONDecodeError) as e:  # a report without curves beats a failed evaluation
        log.warning("no training curves: %s", first_line(e))
        return None
    return hist if isinstance(hist, dict) else None
