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


def box_dice_line(metrics: dict) -> str:
    """The one-line verdict every summary prints."""
    champion = metrics.get(CHAMPION_BOX_DICE)
    return (f"box Dice: fine-tuned {metrics[FINETUNED_BOX_DICE]:.4f}, zero-shot {metrics[ZERO_SHOT_BOX_DICE]:.4f}"
            + (f", champion {champion:.4f}" if champion is not None else "")
            + f"; margin {metrics['margin']:g} -> passed={metrics['passed']}")
