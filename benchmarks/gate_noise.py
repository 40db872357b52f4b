"""How often the registration gate registers a model that is only noise around the champion, before and after
the bootstrap gate (components/gate.py), and the smallest test split on which the new gate keeps that under 5 %.

Scores are simulated with Penn-Fudan's shape: 1-8 instances per image (2.5 on average, 423 in 170 images),
per-instance box and point Dice of the champion around 0.7 with a per-image effect (the instances of one image
move together), and a fine-tuned model whose per-image and per-instance differences from the champion have
mean `gain` (0: a tie, noise only). The zero-shot model is 0.15 worse on every instance, so that comparison
always passes and the champion comparison decides.

    python -m benchmarks.gate_noise --trials 400 --images 5 8 10 15 25 50
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from components.gate import decide, gains

# Penn-Fudan's instances per image (423 in 170 images, at most 8): the empirical shape, 1-8.
_INSTANCE_P = np.array([0.30, 0.30, 0.17, 0.10, 0.06, 0.04, 0.02, 0.01])


def simulate(seed: int, images: int, gain: float = 0.0, *, image_sd: float = 0.05, instance_sd: float = 0.08,
             point_gain: float | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """(fine-tuned, zero-shot, champion) per-instance rows for one seeded case."""
    rng = np.random.default_rng(seed)
    point_gain = gain if point_gain is None else point_gain
    ft, zs, ch = [], [], []
    for i in range(images):
        k = int(rng.choice(len(_INSTANCE_P), p=_INSTANCE_P / _INSTANCE_P.sum())) + 1
        level = rng.uniform(0.5, 0.85)
        image_noise = rng.normal(0, image_sd, 2)  # box, point: this image's shift for the fine-tuned model
        for j in range(k):
            base = np.clip(level + rng.normal(0, 0.1, 2), 0, 1)
            delta = np.array([gain, point_gain]) + image_noise + rng.normal(0, instance_sd, 2)
            tuned = np.clip(base + delta, 0, 1)
            row = {"image": f"img{i:04d}", "instance": j + 1}
            ch.append({**row, "box_dice": float(base[0]), "point_dice": float(base[1])})
            ft.append({**row, "box_dice": float(tuned[0]), "point_dice": float(tuned[1])})
            zs.append({**row, "box_dice": float(base[0] - 0.15), "point_dice": float(base[1] - 0.15)})
    return ft, zs, ch


def old_gate(ft: list[dict], zs: list[dict], ch: list[dict], margin: float) -> bool:
    """The gate before issue 18: the mean box Dice larger by more than margin, no interval."""
    mean = lambda rows: float(np.mean([r["box_dice"] for r in rows]))  # noqa: E731
    return mean(ft) > mean(zs) + margin and mean(ft) > mean(ch) + margin


def registration_rate(images: int, trials: int, gain: float = 0.0, margin: float = 0.0) -> dict:
    old = new = interval = 0
    for seed in range(trials):
        ft, zs, ch = simulate(seed, images, gain)
        old += old_gate(ft, zs, ch, margin)
        new += decide(ft, zs, ch, margin, champion_name="v1").passed
        interval += gains(ft, ch)["box"].low > margin  # the interval alone, without the image floor
    return {"images": images, "gain": gain, "trials": trials, "old": old / trials, "new": new / trials,
            "interval": interval / trials}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=400)
    p.add_argument("--images", type=int, nargs="+", default=[5, 8, 10, 15, 25, 50])
    p.add_argument("--gains", type=float, nargs="+", default=[0.0, 0.02, 0.05])
    args = p.parse_args()
    rows = [registration_rate(n, args.trials, g) for g in args.gains for n in args.images]
    print("| true gain | test images | old gate registers | box interval alone | new gate registers |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['gain']:+.2f} | {r['images']} | {r['old']:.1%} | {r['interval']:.1%} | {r['new']:.1%} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
