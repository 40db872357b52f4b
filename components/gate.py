"""The registration gate: register a fine-tuned model only when it is better than the zero-shot checkpoint and
the champion by more than noise.

Scores are paired: the same test instance scored by two models. Instances of one image are not independent
(one image's lighting, scale and crowding move all of them), so the unit of resampling is the image: a
seeded bootstrap draws images with replacement and recomputes the instance-weighted mean gain (the same
mean the summary reports), giving a 95 % percentile interval of the gain.

A model registers when
  - the lower end of the box-prompt Dice gain's interval is above `margin`, over zero-shot and over the
    champion (a tie, or noise around the champion, is not a gain);
  - point prompts do not get significantly worse: the upper end of the point-prompt Dice gain's interval is
    not below 0, against either (judged from MIN_COMPARABLE_IMAGES images up: below that nothing is significant);
  - the champion is compared on at least MIN_COMPARABLE_IMAGES test images it never trained or validated on.

The interval is Hesterberg's expanded percentile interval: the plain percentile interval is too narrow on
few images (a noise-only model passed 6 % of the time on 10 images, 14 % on 3), so the bootstrap distribution
is read at the tail a t interval of n - 1 degrees of freedom would use. MIN_COMPARABLE_IMAGES is the floor
below which no interval can help: the lower end is never below the smallest per-image gain, so a model that
is only noise (each image's gain positive with probability 1/2) passes at least 2^-n of the time, 6.3 % on 4
images and 3.1 % on 5. Measured (benchmarks/gate_noise.py, benchmarks/RESULTS.md): at most 5 % from 5 images
up. The zero-shot comparison decides a first registration and has no floor, so a small demo or a one-image
debug run (`-d`) still goes end to end; the report says how many images each interval rests on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed: the same scores always give the same decision
CONFIDENCE = 0.95
MIN_COMPARABLE_IMAGES = 5
GATE_PROMPTS = ("box", "point")


@dataclass(frozen=True)
class Interval:
    """A paired gain (fine-tuned minus baseline, mean over instances) and its bootstrap interval."""
    mean: float
    low: float
    high: float
    images: int
    instances: int

    def text(self) -> str:
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def per_image_gains(finetuned: list[dict], baseline: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of per-instance scores ({"image", "instance", key}) of two models -> per image (sum of the
    instances' gains, number of instances), over the instances the baseline was scored on."""
    ours = {(r["image"], r["instance"]): r[key] for r in finetuned}
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for r in baseline:
        pair = (r["image"], r["instance"])
        if pair not in ours:
            raise ValueError(f"instance {pair} was scored for the baseline but not for the fine-tuned model")
        sums[r["image"]] = sums.get(r["image"], 0.0) + ours[pair] - r[key]
        counts[r["image"]] = counts.get(r["image"], 0) + 1
    images = sorted(sums)
    return np.array([sums[i] for i in images], dtype=np.float64), np.array([counts[i] for i in images], dtype=np.int64)


def bootstrap_interval(sums: np.ndarray, counts: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> Interval:
    """The instance-weighted mean gain and its percentile interval, resampling images with replacement."""
    n = len(sums)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, 0)
    mean = float(sums.sum() / counts.sum())
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    step = max(1, 2_000_000 // n)  # draws in blocks: bounded memory for large test splits
    for start in range(0, resamples, step):
        idx = rng.integers(0, n, size=(min(step, resamples - start), n))
        means[start:start + len(idx)] = sums[idx].sum(1) / counts[idx].sum(1)
    tail = expanded_tail((1 - confidence) / 2, n)
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(mean, float(low), float(high), n, int(counts.sum()))


def expanded_tail(tail: float, n: int) -> float:
    """The tail probability at which to read the bootstrap distribution so that a percentile interval from n
    images is as wide as a t interval would be (Hesterberg's expanded percentile interval: the plain
    percentile interval is too narrow for small n, by about sqrt((n-1)/n) and the t/z ratio)."""
    if n < 2:
        return tail
    nu = n - 1
    z = NormalDist().inv_cdf(tail)
    # Student t quantile from the normal one (Cornish-Fisher expansion in 1/nu; within 1 % from nu = 3).
    t = (z + (z ** 3 + z) / (4 * nu) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * nu ** 2)
         + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * nu ** 3))
    return NormalDist().cdf(math.sqrt(n / nu) * t)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: tuple[str, ...]  # why not (empty when passed)
    gains: dict  # {baseline: {prompt: Interval}}

    def metrics(self) -> dict:
        """Flat numbers for the KFP Metrics artifact and the model card: gain_<prompt>_dice_vs_<baseline>
        (the mean) and its _low / _high ends, with the images and instances they rest on."""
        out: dict = {}
        for baseline, by_prompt in self.gains.items():
            for prompt, iv in by_prompt.items():
                key = f"gain_{prompt}_dice_vs_{baseline}"
                out.update({key: iv.mean, f"{key}_low": iv.low, f"{key}_high": iv.high})
            first = next(iter(by_prompt.values()))
            out[f"gain_vs_{baseline}_images"] = first.images
            out[f"gain_vs_{baseline}_instances"] = first.instances
        return out


def gains(finetuned: list[dict], baseline: list[dict]) -> dict[str, Interval]:
    return {p: bootstrap_interval(*per_image_gains(finetuned, baseline, f"{p}_dice")) for p in GATE_PROMPTS}


def decide(finetuned: list[dict], zero_shot: list[dict], champion: list[dict] | None, margin: float, *,
           champion_name: str = "the champion", champion_excluded: int = 0, refused: tuple[str, ...] = ()) -> Verdict:
    """The gate over per-instance rows of each model (champion rows only for the images it may be scored on;
    None when nothing is registered yet). `refused`: reasons registration is refused whatever the scores."""
    reasons = list(refused)
    if not math.isfinite(margin):
        reasons.append(f"margin {margin} is not a finite number")
    results = {"zero_shot": gains(finetuned, zero_shot)}
    reasons += _judge("zero-shot", results["zero_shot"], margin)
    if champion is not None:
        compared = len({r["image"] for r in champion})
        if compared < MIN_COMPARABLE_IMAGES:
            reasons.append(f"only {compared} test image(s) can be compared with {champion_name} "
                           f"({champion_excluded} left out: in its training or validation data); a fair "
                           f"comparison needs at least {MIN_COMPARABLE_IMAGES}")
        if compared:
            results["champion"] = gains(finetuned, champion)
            if compared >= MIN_COMPARABLE_IMAGES:
                reasons += _judge(champion_name, results["champion"], margin)
    return Verdict(not reasons, tuple(reasons), results)


def _judge(against: str, by_prompt: dict[str, Interval], margin: float) -> list[str]:
    box, point = by_prompt["box"], by_prompt["point"]
    out = []
    if not (math.isfinite(box.low) and box.low > margin):
        out.append(f"box Dice gain over {against} {box.text()}: the interval's lower end is not above margin "
                   f"{margin:g}")
    if not math.isfinite(point.high):
        out.append(f"point Dice gain over {against} is not a number")
    elif point.high < 0 and point.images >= MIN_COMPARABLE_IMAGES:
        # On fewer images any drop would read as significant (the interval of one image is that image).
        out.append(f"point prompts got significantly worse than {against}: point Dice gain {point.text()}")
    return out
