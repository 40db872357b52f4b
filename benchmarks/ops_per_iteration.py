"""Top-level `aten::` operator calls per training iteration on CPU: a speed proxy any machine can measure.

Issue 10's definition: two profiled `train()` calls, 4 and 14 iterations, on the same 3 training images
(`make_samples(4, seed=3, size=(240, 320), max_instances=3)`, the last one for validation),
`val_every` = the iteration count, bf16 autocast; count the profiler's events whose name starts with
`aten::` and whose parent is not an `aten::` op (an op called from Python or from a non-aten frame),
and divide the difference by 10. Everything outside the iteration loop (model build, embedding,
validation at 0 and at the end, checkpoints) is the same in both calls and cancels out. Each op call on
CPU corresponds to roughly one kernel launch on a GPU, so fewer top-level ops means less launch overhead.

    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.ops_per_iteration [--write]
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
import warnings
from pathlib import Path

TARGET = 700
SHORT, LONG = 4, 14


def top_level_aten_ops(events) -> int:
    """Events named aten::* whose parent is absent or not an aten:: op (calls into aten, not inside it)."""
    return sum(1 for e in events if e.name.startswith("aten::")
               and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))


def profiled_run(iterations: int, weights: Path, samples, workdir: Path, store) -> int:
    """Ops of the training process itself (the DataLoader's workers, which decode and prepare items, are
    other processes)."""
    from torch.profiler import ProfilerActivity, profile

    from components.datasets.reader import SampleSplit
    from components.training.config import TrainConfig

    from components.training.loop import train

    cfg = TrainConfig(device="cpu", n_iterations=iterations, val_every=iterations, amp=True, amp_dtype="bf16",
                      checkpoint_dir=str(workdir / f"ckpt{iterations}"), resume=False, show_progress=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train(cfg, weights, SampleSplit(samples[:3]), SampleSplit(samples[3:], "val"), store=store)
    return top_level_aten_ops(prof.events())


def measure(threads: int = 2) -> dict:
    import torch

    from benchmarks.pedestrians import random_vit_t
    from components.datasets.synthetic import make_samples

    torch.set_num_threads(threads)
    samples = make_samples(4, seed=3, size=(240, 320), max_instances=3)
    from components.s3server import embedded_s3
    from components.storage import ObjectStore

    with tempfile.TemporaryDirectory() as tmp, embedded_s3() as s3:
        store = ObjectStore(s3)  # the embeddings' cache: both runs read the same ones
        weights = random_vit_t(Path(tmp) / "vit_t_random.pt")
        t0 = time.perf_counter()
        short = profiled_run(SHORT, weights, samples, Path(tmp), store)
        long = profiled_run(LONG, weights, samples, Path(tmp), store)
        seconds = time.perf_counter() - t0
    per_it = (long - short) / (LONG - SHORT)
    return {"short": short, "long": long, "per_iteration": per_it, "seconds": seconds,
            "train_objects": sum(int(s.mask.max()) for s in samples[:3]), "torch": torch.__version__}


def record(r: dict, verdict: str) -> None:
    from benchmarks.results import write_section

    write_section("## Operator calls per iteration", "\n".join([
        "## Operator calls per iteration", "",
        "`PYTHONPATH=$PWD .venv/bin/python -m benchmarks.ops_per_iteration --write`", "",
        f"Issue 10's device-independent proxy: top-level `aten::` calls per training iteration on CPU "
        f"(bf16 autocast, {r['train_objects']} objects on the 3 training images of `make_samples(4, seed=3, "
        f"size=(240, 320), max_instances=3)`, `n_sub_iteration` 2), the difference between profiled "
        f"`train()` runs of {LONG} and {SHORT} iterations divided by {LONG - SHORT}. torch {r['torch']}, "
        f"{platform.machine()}; the profiled runs took {r['seconds']:.0f} s (the count does not depend "
        f"on how loaded the machine was).", "",
        "| run | top-level aten ops |", "|---|---:|",
        f"| {SHORT} iterations | {r['short']} |", f"| {LONG} iterations | {r['long']} |",
        f"| **per iteration** | **{r['per_iteration']:.0f}** |", "",
        f"Target: <= {TARGET} per iteration: **{verdict}**.", ""]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="record the result in benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    r = measure(args.threads)
    verdict = "met" if r["per_iteration"] <= TARGET else "not met"
    print(f"top-level aten ops: {r['short']} in {SHORT} iterations, {r['long']} in {LONG}; "
          f"per iteration {r['per_iteration']:.0f} (target <= {TARGET}: {verdict})")
    if args.write:
        record(r, verdict)


if __name__ == "__main__":
    main()
