"""The evaluation metrics' names: evaluate writes them, the pipeline outputs, the CLI summary and the
model card read them. Light (no torch): the CLI and the register-model image import it.

Flat keys `<candidate>_<prompt>_<stat>[_median]`, e.g. `finetuned_box_dice`, as logged to KFP Metrics.
"""
from __future__ import annotations

from dataclasses import dataclass

CANDIDATES = ("zero_shot", "finetuned", "champion")
PROMPTS = ("box", "point")
STATS = ("dice", "iou")


def metric_key(candidate: str, prompt: str = "box", stat: str = "dice", median: bool = False) -> str:
    if candidate not in CANDIDATES or prompt not in PROMPTS or stat not in STATS:
        raise ValueError(f"no such metric: {candidate} {prompt} {stat}")
    return f"{candidate}_{prompt}_{stat}" + ("_median" if median else "")


FINETUNED_BOX_DICE = metric_key("finetuned")
ZERO_SHOT_BOX_DICE = metric_key("zero_shot")
CHAMPION_BOX_DICE = metric_key("champion")


@dataclass(frozen=True)
class CandidateScores:
    """One candidate's scores on the test split (mean and median over instances)."""
    box_dice: float
    box_dice_median: float
    box_iou: float
    box_iou_median: float
    point_dice: float
    point_dice_median: float
    point_iou: float
    point_iou_median: float

    @classmethod
    def from_metrics(cls, metrics: dict, candidate: str) -> "CandidateScores | None":
        """This candidate's scores from flat metrics, or None when it was not evaluated."""
        keys = {f"{p}_{s}" + m: metric_key(candidate, p, s, bool(m)) for p in PROMPTS for s in STATS
                for m in ("", "_median")}
        if any(metrics.get(k) is None for k in keys.values()):
            return None
        return cls(**{field: float(metrics[k]) for field, k in keys.items()})

    def flat(self, candidate: str) -> dict[str, float]:
        return {metric_key(candidate, p, s, bool(m)): getattr(self, f"{p}_{s}{m}") for p in PROMPTS
                for s in STATS for m in ("", "_median")}


def candidate_metrics(metrics: dict, candidate: str) -> dict:
    """The scores `metrics` holds for one candidate, by their short names (`box_dice`, ...); the
    champion's also name its version."""
    out = {f"{p}_{s}{m}": metrics[metric_key(candidate, p, s, bool(m))] for p in PROMPTS for s in STATS
           for m in ("", "_median") if metrics.get(metric_key(candidate, p, s, bool(m))) is not None}
    if candidate == "champion" and metrics.get("champion_version"):
        out["version"] = metrics["champion_version"]
    return out


def _gain_text(metrics: dict, baseline: str) -> str | None:
    parts = []
    for prompt in PROMPTS:
        key = f"gain_{prompt}_dice_vs_{baseline}"
        if metrics.get(key) is None:
            return None
        parts.append(f"{prompt} {metrics[key]:+.4f} [{metrics.get(key + '_low', float('nan')):+.4f}, "
                     f"{metrics.get(key + '_high', float('nan')):+.4f}]")
    images = metrics.get(f"gain_vs_{baseline}_images")
    return ", ".join(parts) + (f" ({images:g} images)" if images is not None else "")


def verdict_lines(metrics: dict) -> list[str]:
    """What every summary prints of an evaluation: the mean box Dice of each model, the gate's paired gains with
    their 95 % intervals, and the verdict with its one reason (or reasons) once."""
    champion = metrics.get(CHAMPION_BOX_DICE)
    version = metrics.get("champion_version") or ""
    line = f"box Dice: fine-tuned {metrics[FINETUNED_BOX_DICE]:.4f}, zero-shot {metrics[ZERO_SHOT_BOX_DICE]:.4f}"
    if champion is not None:
        line += f", champion {version} {champion:.4f}".replace("  ", " ")
        if metrics.get("champion_excluded_images"):
            line += (f" (on {metrics['champion_test_images']:g} of {metrics['test_images']:g} test images; "
                     f"{metrics['champion_excluded_images']:g} left out: in its training or validation data)")
    lines = [line]
    for baseline, title in (("zero_shot", "zero-shot"), ("champion", f"champion {version}".strip())):
        text = _gain_text(metrics, baseline)
        if text:
            lines.append(f"gain over {title}, 95 % interval: {text}")
    verdict = metrics.get("verdict") or ("passed" if metrics.get("passed") else "not passed")
    lines.append(f"margin {metrics.get('margin', 0):g}: {verdict}")
    return lines
