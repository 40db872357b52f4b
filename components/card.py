"""The model card and what a registered version keeps about its data: built by register-model (steps.py), read
back by check-changes (what the champion was trained on) and by evaluate (which images the champion may not be
scored on). The registry (registry.py) only stores and versions these documents.

Besides the card, every version keeps `training_data.json`: the content hashes of the images of its dataset
version's train and val splits. Evaluate leaves those images out of the comparison with that version once it
is the champion, whatever the dataset looks like by then (grown, re-split, renamed), so the champion is never
scored on an image it trained or validated on. The list lives beside the card, not in it: it grows with the
dataset (64 bytes an image), and the card is what people and Model Registry read.
"""
from __future__ import annotations

import json
import logging

from components.changes import trained_on
from components.datasets.split import LEGACY_RULE, split_rule
from components.errors import first_line
from components.eval_metrics import candidate_metrics
from components.registry import ObjectStoreRegistry, RegistryError
from components.storage import StorageError
from components.training.config import TrainConfig

log = logging.getLogger(__name__)

TRAINING_DATA_FILE = "training_data.json"
HELD_IN = ("train", "val")  # the splits a model has seen: never its test images


def parse_metrics_json(text: str | dict | None, what: str = "metrics_json") -> dict:
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise RegistryError(f"{what} is not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(value, dict):
        raise RegistryError(f"{what} must be a JSON object")
    return value


def _scalars(meta: dict) -> dict:
    return {k: v for k, v in sorted(meta.items()) if isinstance(v, (str, int, float, bool)) and k != "display_name"}


def build_card(metrics: dict, *, run_id: str, model_metadata: dict, dataset_metadata: dict,
               weights_metadata: dict) -> dict:
    """The model card: what was measured (with the gate's intervals), on which data, from which weights, by
    which run."""
    zero_shot = candidate_metrics(metrics, "zero_shot")
    champion = candidate_metrics(metrics, "champion")
    finetuned = candidate_metrics(metrics, "finetuned")
    training = {k: v for k, v in model_metadata.items() if k not in {"history", "display_name", "config"}}
    if isinstance(model_metadata.get("config"), dict):
        # Read back through ML Metadata a bool is 0/1 and an int 3.0: the card states them as trained.
        cfg = TrainConfig.from_params(model_metadata["config"])
        training["config"] = {k: getattr(cfg, k) for k in model_metadata["config"]}
    card = {
        "run_id": run_id,
        "metrics": finetuned or metrics,
        "zero_shot": zero_shot,
        "champion": champion or None,
        "gate": {k: v for k, v in metrics.items() if k.startswith("gain_") or k in ("margin", "verdict")},
        "evaluation": {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))},
        "dataset": _scalars(dataset_metadata),
        "weights": _scalars(weights_metadata),
        "training": training,
        "model": {"model_type": model_metadata.get("model_type") or weights_metadata.get("model_type"),
                  "format": "pytorch state_dict (segment_anything / mobile_sam Sam)"},
    }
    if isinstance(model_metadata.get("config"), dict):
        # What the nightly check (components/changes.py) compares the next run with.
        card["trained_on"] = trained_on(
            model_metadata.get("dataset_content_hash") or dataset_metadata.get("content_hash"),
            model_metadata.get("weights_sha256") or weights_metadata.get("sha256"), model_metadata["config"],
            dataset_metadata.get("split_rule") or LEGACY_RULE)
    return card


def training_data(manifest: dict) -> dict:
    """What a model trained on has seen: the content hashes of its dataset version's train and val images."""
    seen = {split: sorted({it["image"]["sha256"] for it in manifest["items"]
                           if split in (it.get("splits") or [it["split"]])}) for split in HELD_IN}
    return {"format_version": 1, "dataset": manifest.get("name"), "content_hash": manifest.get("content_hash"),
            "split_rule": split_rule(manifest), **seen}


def champion_training_data(registry: ObjectStoreRegistry, name: str, version: str) -> dict | None:
    """The champion's `training_data.json`; for a version registered before it was kept, rebuilt from its
    dataset version's manifest while the store still has it; None when neither can be read."""
    doc = registry.extra(name, version, TRAINING_DATA_FILE)
    if doc is not None:
        return doc
    manifest_uri = (registry.card(name, version).get("dataset") or {}).get("manifest_uri")
    if not manifest_uri:
        return None
    from components.datasets.reader import load_manifest

    try:
        return training_data(load_manifest(registry.store, manifest_uri))
    except StorageError as e:
        log.warning("%s %s: its dataset manifest %s cannot be read: %s", name, version, manifest_uri, first_line(e))
        return None
