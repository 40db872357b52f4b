"""End to end: `sam-pipeline run --demo -d -i 5 -g cpu` on two CPU cores, per-task breakdown.

    .venv/bin/python -m benchmarks.e2e [--repeats 3] [--write]
    .venv/bin/python -m benchmarks.e2e --seed-defaults [--repeats 1] [--write]

--seed-defaults times instead what a user's first `sam-pipeline run -g cpu` does on Penn-Fudan: a synthetic
Penn-Fudan zip with the real set's statistics (170 images, widths 253-1017, 423 people;
`components.datasets.synthetic.make_pennfudan_zip`) and a random vit_t, every other setting at its default
(200 iterations, validation every 10, the default precision), a fresh store and data cache (no embedding cached).

Setup is excluded: the demo assets (synthetic Penn-Fudan zip, random vit_t checkpoint) are generated
before the clock starts. Each timed run is the whole command in a fresh working directory: it starts its
own S3 server, runs the five tasks through kfp.local (each a fresh Python process) and writes the summary.
--write replaces the "## End to end" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.results import write_section

SECTION = "## End to end"
COMMAND = ".venv/bin/python -m benchmarks.e2e --repeats 3 --write"
RUN_ARGS = ["run", "--demo", "-d", "-i", "5", "-g", "cpu"]
TASKS = ("fetch-weights", "ingest-dataset", "finetune", "evaluate", "register-model")
SEED_SECTION = "## End to end at the seed's defaults (CPU)"
SEED_COMMAND = ".venv/bin/python -m benchmarks.e2e --seed-defaults --repeats 1 --write"
SEED_TASKS = ("fetch-weights", "ingest-dataset", "check-changes", "embed-shards", "embed", "finetune", "evaluate",
              "register-model")


def _two_cores() -> list[str]:
    """Pin to two cores where there are more, so the number matches a 2-core CI runner."""
    if (os.cpu_count() or 1) > 2 and shutil.which("taskset"):
        return ["taskset", "-c", "0,1"]
    return []


def timed_run(cmd: list[str], work: Path, env: dict, summary: Path) -> tuple[float, dict]:
    """One `sam-pipeline run` (cmd without --summary-json) in `work`: its wall seconds and its summary; a failed
    run ends the benchmark with the tail of its output."""
    t = time.perf_counter()
    proc = subprocess.run([*cmd, "--summary-json", str(summary)], cwd=work, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:])
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return wall, json.loads(summary.read_text())


def _seed_assets(folder: Path) -> list[str]:
    """A Penn-Fudan-sized synthetic zip and a random vit_t; the `run` flags that name them."""
    from pipelines.local import make_demo_assets

    a = make_demo_assets(folder, images=170, size_range=(253, 1017))
    return ["run", "--dataset-source", a["dataset_source"], "--weights-url", a["weights_url"], "--weights-sha256",
            a["weights_sha256"], "-g", "cpu"]


def run(repeats: int, seed_defaults: bool = False) -> tuple[list[dict], dict]:
    from pipelines.local import make_demo_assets

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        assets = Path(tmp) / "assets"
        t0 = time.perf_counter()
        run_args = _seed_assets(assets) if seed_defaults else RUN_ARGS
        if not seed_defaults:
            make_demo_assets(assets)
        setup_s = time.perf_counter() - t0
        env = {**os.environ, "OMP_NUM_THREADS": "2", "SAM_MODELS": str(Path(tmp) / "sam_models"),
               "SAM_DATA_CACHE": str(Path(tmp) / "data_cache")}
        for i in range(repeats):
            work = Path(tmp) / f"run{i}"
            (work / "runs").mkdir(parents=True)
            (work / "runs" / "demo").symlink_to(assets)  # `--demo` finds its assets ready
            wall, s = timed_run([*_two_cores(), sys.executable, "-m", "pipelines.cli", *run_args], work, env,
                                work / "summary.json")
            tasks = SEED_TASKS if seed_defaults else TASKS
            runs.append({"wall": wall, "tasks": {n: s["tasks"].get(n, {}).get("seconds") for n in tasks},
                         "states": {n: s["tasks"].get(n, {}).get("state", "absent") for n in tasks},
                         "finetune_s": s["model_metadata"].get("seconds"), "eval_s": s["metrics"].get("seconds"),
                         "validation_s": s["model_metadata"].get("validation_seconds"),
                         "checkpoint_s": s["model_metadata"].get("checkpoint_seconds"),
                         "finetune": {k: s["metrics"].get(k) for k in (
                             "amp", "iterations_per_second", "embeddings_computed", "embeddings_from_store",
                             "initial_val_dice", "best_val_dice", "train_images", "val_images")}})
    info = {"cpus": len(os.sched_getaffinity(0)) if not _two_cores() else 2, "python": platform.python_version(),
            "repeats": repeats, "setup_s": setup_s, "machine": platform.machine()}
    return runs, info


def table(runs: list[dict], info: dict) -> str:
    med = lambda xs: statistics.median([x for x in xs if x is not None]) if any(  # noqa: E731
        x is not None for x in xs) else float("nan")
    wall = med([r["wall"] for r in runs])
    lines = [
        SECTION, "",
        f"`{COMMAND}` (each run is `sam-pipeline {' '.join(RUN_ARGS)}` in a fresh directory)", "",
        f"{info['cpus']} CPU cores ({info['machine']}, shared with other work), Python {info['python']}, no GPU; "
        f"median of {info['repeats']} runs. Setup excluded: generating the demo assets took "
        f"{info['setup_s']:.1f} s once. A task's time is kfp.local's, from launch to exit of its process "
        "(Python start and imports included); \"overhead\" is the rest of the wall time (S3 server start, "
        "kfp.local orchestration, summary).", "",
        "| task | seconds (median) | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " |",
        "|---|---:|" + "---:|" * len(runs),
    ]
    for task in TASKS:
        vals = [r["tasks"][task] for r in runs]
        lines.append(f"| {task} | {med(vals):.1f} | " + " | ".join(
            f"{v:.1f}" if v is not None else r["states"][task] for v, r in zip(vals, runs)) + " |")
    overheads = [r["wall"] - sum(v for v in r["tasks"].values() if v) for r in runs]
    lines.append(f"| overhead | {med(overheads):.1f} | " + " | ".join(f"{o:.1f}" for o in overheads) + " |")
    lines.append(f"| **total (wall)** | **{wall:.1f}** | " + " | ".join(f"{r['wall']:.1f}" for r in runs) + " |")
    verdict = "under" if wall < 180 else "OVER"
    lines += ["", f"Target: under 3 minutes; median wall time {wall:.0f} s is {verdict} it. Inside the tasks, "
              f"training itself took {med([r['finetune_s'] for r in runs]):.1f} s (model build, embedding of the "
              f"one debug image, iteration-0 validation, 5 iterations, checkpoints) and evaluation "
              f"{med([r['eval_s'] for r in runs]):.1f} s (zero-shot and fine-tuned models on the test split, box "
              "and point prompts, report); the rest of each task is process start and imports (torch, kfp)."]
    return "\n".join(lines) + "\n"


def seed_table(runs: list[dict], info: dict) -> str:
    """The --seed-defaults section: one row per task, and what finetune reported."""
    lines = [SEED_SECTION, "", f"`{SEED_COMMAND}`", "",
             f"{info['cpus']} CPU cores ({info['machine']}, shared with other work: load average "
             f"{info['load'][0]:.1f} before, {info['load'][1]:.1f} after), Python {info['python']}, no GPU. Each run is "
             "`sam-pipeline run --dataset-source <synthetic Penn-Fudan zip> --weights-url <random vit_t> -g cpu` in a "
             "fresh directory with a fresh store and data cache (a first run: nothing cached); generating the "
             f"zip and checkpoint took {info['setup_s']:.1f} s before the clock started.", "",
             "| task | " + " | ".join(f"run {i + 1} (s)" for i in range(len(runs))) + " |",
             "|---|" + "---:|" * len(runs)]
    for task in SEED_TASKS:
        lines.append(f"| {task} | " + " | ".join(
            f"{r['tasks'][task]:.1f}" if r["tasks"][task] is not None else r["states"][task] for r in runs) + " |")
    overheads = [r["wall"] - sum(v for v in r["tasks"].values() if v) for r in runs]
    lines.append("| overhead | " + " | ".join(f"{o:.1f}" for o in overheads) + " |")
    lines.append("| **total (wall)** | " + " | ".join(f"**{r['wall']:.1f}**" for r in runs) + " |")
    for i, r in enumerate(runs):
        f = r["finetune"]
        lines += ["", f"Run {i + 1}: finetune AMP {f['amp']}, {f['train_images']} train / {f['val_images']} val images, "
                  f"{f['embeddings_computed']} embeddings computed in finetune ({f['embeddings_from_store']} from the "
                  f"embed step), {f['iterations_per_second'] or 0:.2f} it/s, val Dice {f['initial_val_dice']} -> best "
                  f"{f['best_val_dice']}; finetune's own clock {r['finetune_s']} s (validations {r['validation_s']} s, "
                  f"checkpoints {r['checkpoint_s']} s), evaluate's {r['eval_s']} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update the End to end section of RESULTS.md")
    parser.add_argument("--seed-defaults", action="store_true",
                        help="a Penn-Fudan-sized first run at every default (see the module's docstring)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    runs, info = run(args.repeats, args.seed_defaults)
    info["load"] = (load, os.getloadavg()[0])
    section = seed_table(runs, info) if args.seed_defaults else table(runs, info)
    print(section)
    if args.write:
        write_section(SEED_SECTION if args.seed_defaults else SECTION, section)


if __name__ == "__main__":
    main()
