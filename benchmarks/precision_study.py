"""Training precision on CPU, decided by a paired study: does bf16 training on fp32 embeddings learn as fp32 does?

For each seed (its own random `vit_t`, images, prompts and order), `benchmarks.learning_curve` runs once per arm
on identical inputs; arms differ only in precision:

- `fp32`: fp32 training, fp32 embeddings (the CPU default before issue 23);
- `bf16-train`: bf16 autocast training, fp32 embeddings (the candidate default on CPUs with native bf16);
- `bf16-both`: bf16 training and bf16 embeddings (the combination issue 10 found learning worse), with --third.

Reported per pair: the difference of final validation box Dice (`score_model`, fp32 decoder, the latest
weights after the last iteration) and of the mean training loss over the second half, with the mean
difference's 95 % t-interval over seeds. Each run is deterministic, so the spread is between seeds, not noise.

    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.precision_study --seeds 0 1 2 3 4 5 --write
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path

ARMS = {"fp32": ("fp32", "fp32"), "bf16-train": ("bf16", "fp32"), "bf16-both": ("bf16", "bf16")}
# Two-sided 95 % quantiles of Student's t by degrees of freedom (no scipy in the project's venv).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131}
SECTION = "## Training precision on CPU: paired study (issue 23)"


def run_arm(seed: int, arm: str, args, s3) -> dict:
    from benchmarks.learning_curve import curve

    amp, embed = ARMS[arm]
    ns = argparse.Namespace(iters=args.iters, chunk=args.chunk, train=args.train, val=args.val, height=240,
                            width=320, lr=args.lr, seed=seed, threads=args.threads, train_seed=None, amp=amp,
                            embed=embed)
    t0 = time.perf_counter()
    rows, losses = curve(ns, s3)
    half = [x for x in losses[len(losses) // 2:] if x == x]
    return {"seed": seed, "arm": arm, "final_box_dice": rows[-1]["box_dice"], "start_box_dice": rows[0]["box_dice"],
            "final_point_dice": rows[-1]["point_dice"], "late_loss": statistics.fmean(half) if half else float("nan"),
            "instances": rows[0]["instances"], "seconds": time.perf_counter() - t0, "rows": rows}


def interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and its 95 % t-interval."""
    m = statistics.fmean(diffs)
    if len(diffs) < 2:
        return m, float("nan"), float("nan")
    half = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return m, m - half, m + half


def table(results: list[dict], args, load: tuple) -> str:
    by = {(r["seed"], r["arm"]): r for r in results}
    arms = [a for a in ARMS if any(r["arm"] == a for r in results)]
    seeds = sorted({r["seed"] for r in results})
    lines = [SECTION, "",
             f"`PYTHONPATH=$PWD .venv/bin/python -m benchmarks.precision_study --seeds {' '.join(map(str, seeds))} "
             f"--iters {args.iters} --train {args.train} --val {args.val} --threads {args.threads}"
             f"{' --third' if args.third else ''} --write`", "",
             f"Per seed: a random `vit_t`, {args.train} training and {args.val} validation Penn-Fudan-like 240x320 "
             f"images, the seed's `-n 25 -s 2 -b 1`, lr {args.lr:g} (from random weights the seed's 1e-5 barely "
             f"moves), {args.iters} iterations; each arm on identical inputs. Final box Dice: `score_model` on the "
             f"validation images with the weights after the last iteration (fp32 decoder, the arm's embeddings); "
             f"late loss: mean training loss over the second half. 2 shared CPU cores (AMD EPYC, `avx512_bf16`, "
             f"`amx_bf16`), {args.threads} threads, torch 2.14.1; load average {load[0]:.1f} -> {load[1]:.1f} "
             f"(times only: every run is deterministic).", "",
             "| seed | val people | " + " | ".join(f"{a} box Dice (start -> final)" for a in arms)
             + " | " + " | ".join(f"{a} late loss" for a in arms) + " |",
             "|---:|---:|" + "---:|" * (2 * len(arms))]
    for s in seeds:
        row = [by.get((s, a)) for a in arms]
        lines.append(f"| {s} | {row[0]['instances']} | "
                     + " | ".join(f"{r['start_box_dice']:.3f} -> {r['final_box_dice']:.3f}" if r else "-" for r in row)
                     + " | " + " | ".join(f"{r['late_loss']:.3f}" if r else "-" for r in row) + " |")
    lines += ["", "| paired difference against fp32 | seeds | final box Dice: mean [95 % CI] | late loss: mean [95 % CI] |",
              "|---|---:|---:|---:|"]
    for a in arms[1:]:
        pairs = [(by[(s, a)], by[(s, "fp32")]) for s in seeds if (s, a) in by and (s, "fp32") in by]
        d = interval([x["final_box_dice"] - y["final_box_dice"] for x, y in pairs])
        dl = interval([x["late_loss"] - y["late_loss"] for x, y in pairs])
        lines.append(f"| {a} - fp32 | {len(pairs)} | {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] | "
                     f"{dl[0]:+.3f} [{dl[1]:+.3f}, {dl[2]:+.3f}] |")
    secs = {a: statistics.fmean(by[(s, a)]["seconds"] for s in seeds if (s, a) in by) for a in arms}
    lines += ["", "Mean seconds per run (embedding, training, scoring; shared machine): "
              + ", ".join(f"{a} {v:.0f} s" for a, v in secs.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--iters", type=int, default=80)
    p.add_argument("--chunk", type=int, default=40)
    p.add_argument("--train", type=int, default=6)
    p.add_argument("--val", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--third", action="store_true", help="also the bf16-both arm")
    p.add_argument("--json", type=Path, default=Path("/tmp/precision_study.json"), help="results so far (resumed)")
    p.add_argument("--write", action="store_true", help=f"record the table in benchmarks/RESULTS.md ({SECTION})")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    load0 = os.getloadavg()[0]
    results = json.loads(args.json.read_text()) if args.json.exists() else []
    done = {(r["seed"], r["arm"]) for r in results}
    from components.s3server import embedded_s3

    arms = ["fp32", "bf16-train"] + (["bf16-both"] if args.third else [])
    for seed in args.seeds:
        with embedded_s3() as s3:  # one store per seed: the arms with fp32 embeddings compute them once
            for arm in arms:
                if (seed, arm) in done:
                    continue
                results.append(run_arm(seed, arm, args, s3))
                args.json.write_text(json.dumps(results))
                r = results[-1]
                print(f"seed {seed} {arm}: box Dice {r['start_box_dice']:.3f} -> {r['final_box_dice']:.3f}, "
                      f"late loss {r['late_loss']:.3f}, {r['seconds']:.0f} s", flush=True)
    results = [r for r in results if r["seed"] in args.seeds]
    section = table(results, args, (load0, os.getloadavg()[0]))
    print(section)
    if args.write:
        from benchmarks.results import write_section
        write_section(SECTION, section)


if __name__ == "__main__":
    main()
