"""check-changes: has anything that decides the model changed since the registered champion was trained?

A scheduled (nightly) run on unchanged data and settings must not retrain. What decides the model:
  - the dataset version (its content hash: the files and how they are split) and the rule that split it (said
    apart, so a version made under another split rule reads as such: components/datasets/split.py),
  - the base weights (their sha256),
  - the training settings that shape the trajectory (`TrainConfig` minus `NOT_TRAJECTORY`). n_iterations is
    one of them: more iterations train a different model, so a run asking for more retrains.
Not part of it: the run id (every run has a new one), the device, the checkpoint name, the evaluation margin
and the registry settings. The champion's model card records the same three things under `trained_on`
(`build_card`), so the comparison is between two records made by `trained_on()` below.

Runs in the light register-model image: no torch here (TrainConfig is torch-free).
"""
from __future__ import annotations

from dataclasses import dataclass

from components.datasets.split import LEGACY_RULE
from components.training.config import TrainConfig, trajectory_settings


def trained_on(dataset_content_hash: str, weights_sha256: str, settings: dict, split_rule: str) -> dict:
    """What a model was (or would be) trained from; `settings` are pipeline training settings (the rest of
    TrainConfig takes its defaults, as in a pipeline run)."""
    cfg = TrainConfig.from_params({k: v for k, v in settings.items() if v is not None})
    return {"dataset_content_hash": dataset_content_hash, "split_rule": split_rule,
            "weights_sha256": weights_sha256, "training": trajectory_settings(cfg)}


@dataclass(frozen=True)
class Decision:
    changed: bool
    reason: str


def _differences(before: dict, now: dict) -> list[str]:
    out = []
    for key, label in (("dataset_content_hash", "dataset content hash"), ("weights_sha256", "weights sha256")):
        if before.get(key) != now.get(key):
            out.append(f"{label} {str(before.get(key))[:12]} -> {str(now.get(key))[:12]}")
    # Cards written before the rule was recorded were split by the old rule.
    if before.get("split_rule", LEGACY_RULE) != now.get("split_rule", LEGACY_RULE):
        out.append(f"split rule {before.get('split_rule', LEGACY_RULE)} -> {now.get('split_rule', LEGACY_RULE)}")
    old, new = before.get("training") or {}, now.get("training") or {}
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            out.append(f"{key} {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}")
    return out


def decide(registry, model_name: str, now: dict, *, force: bool = False) -> Decision:
    """Compare `now` (a `trained_on()` record) with the current champion's card in `registry`."""
    if force:
        return Decision(True, "retraining forced (force_retrain)")
    pointer = registry.latest(model_name)
    if pointer is None:
        return Decision(True, f"no registered version of {model_name} yet")
    version = pointer["version"]
    before = registry.card(model_name, version).get("trained_on")
    if not isinstance(before, dict):
        # A card written before cards recorded this: nothing to compare with, so train.
        return Decision(True, f"{model_name} {version}'s model card does not record what it was trained on")
    diffs = _differences(before, now)
    if diffs:
        return Decision(True, f"changed since {model_name} {version}: " + "; ".join(diffs))
    return Decision(False, f"nothing changed since {model_name} {version}")
