"""The training step eager against compiled (components/training/compiled_step.py), in one run.

Per precision (fp32, bf16 autocast) and mode (eager, compiled), each in its own process with its own,
empty Inductor cache (so every compile is a cold one, as a user's first run): the seed's settings (`-n 25
-s 2 -b 1`, random `vit_t`, random embeddings: the encoder is not part of a step), Penn-Fudan-like images
(`benchmarks.pedestrians`, 304x304) with `--objects` people each, so that a run meets a known set of
graphs: one padded size x three prompt layouts (first round; later round without, with a mask prompt).
Reported: the seconds the iterations that compiled took beyond a steady iteration (compile time), the
steady per-iteration time (median wall and process CPU over the iterations that compiled nothing), the
top-level aten calls per steady iteration (benchmarks.ops_per_iteration's count, over `--profile`
profiled iterations), and what the seed's 200 iterations would take (compile + 200 steady iterations).

    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.compiled_step [--precisions fp32 bf16] [--write]
    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.compiled_step --device cuda --iters 60   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

SEED_ITERATIONS = 200


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_side(args) -> dict:
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.ops_per_iteration import top_level_aten_ops
    from benchmarks.pedestrians import pedestrian_samples
    from components.sam.model import build_sam
    from components.training.config import TrainConfig, resolve_amp
    from components.training.trainer import Trainer, prepare_items

    device = torch.device(args.device)
    samples = [s for s in pedestrian_samples(60) if len(np.unique(s.mask)) - 1 == args.objects][:args.images]
    gen = torch.Generator().manual_seed(1)
    items = prepare_items(samples, [torch.randn((256, 64, 64), generator=gen).to(device) for _ in samples])
    torch.manual_seed(0)
    model = build_sam("vit_t").to(device)
    cfg = TrainConfig(device=args.device, amp=args.precision != "fp32", amp_dtype=args.precision if
                      args.precision != "fp32" else "bf16", compile=args.mode == "compiled", show_progress=False)
    trainer = Trainer(cfg, model, items, items[:1], device, resolve_amp(cfg, device))
    rounds = trainer.decoder_round
    wall, cpu, compiled_at = [], [], []
    for it in range(1, args.iters + 1):
        before = len(rounds.shapes_compiled)
        t, c = time.perf_counter(), time.process_time()
        trainer.train_step(it)
        _sync(device)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        if len(rounds.shapes_compiled) > before or it == 1:
            compiled_at.append(it - 1)
    steady = [i for i in range(len(wall)) if i not in compiled_at]
    step = statistics.median(wall[i] for i in steady)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for it in range(args.iters + 1, args.iters + 1 + args.profile):
            trainer.train_step(it)
        _sync(device)
    return {"mode": args.mode, "precision": args.precision, "step_s": step,
            "step_cpu_s": statistics.median(cpu[i] for i in steady),
            "compile_s": sum(wall[i] - step for i in compiled_at) if args.mode == "compiled" else 0.0,
            "graphs": len(rounds.shapes_compiled), "steady_iterations": len(steady),
            "ops_per_iteration": top_level_aten_ops(prof.events()) / args.profile}


def _side(args, mode: str, precision: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.compiled_step", "--side", mode, "--precision", precision,
           "--iters", str(args.iters), "--images", str(args.images), "--objects", str(args.objects),
           "--profile", str(args.profile), "--device", args.device, "--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as cache:  # a cold compile, not the last run's cached kernels
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:  # its traceback, then stop: the rows so far are already printed
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"{mode} {precision}: exit {proc.returncode}")
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    print("RESULT " + json.dumps(result), flush=True)
    return result


def table(rows: list[dict]) -> str:
    lines = ["| precision | mode | graphs | compile | steady per it. (wall / CPU) | aten calls per it. "
             f"| {SEED_ITERATIONS} iterations incl. compile |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        total = r["compile_s"] + SEED_ITERATIONS * r["step_s"]
        lines.append(f"| {r['precision']} | {r['mode']} | {r['graphs']} | {r['compile_s']:.0f} s | "
                     f"{r['step_s']:.3f} s / {r['step_cpu_s']:.3f} s | {r['ops_per_iteration']:.0f} | {total:.0f} s |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--iters", type=int, default=15, help="iterations timed per process (compiles included)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--objects", type=int, default=2, help="people per image (one padded size per run)")
    p.add_argument("--profile", type=int, default=3, help="steady iterations profiled for the aten count")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="record the table in benchmarks/RESULTS.md")
    p.add_argument("--side", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.side:
        import torch

        torch.set_num_threads(args.threads)
        args.mode = args.side
        print("RESULT " + json.dumps(run_side(args)), flush=True)
        return
    load = os.getloadavg()
    rows = [_side(args, mode, precision) for precision in args.precisions for mode in ("eager", "compiled")]
    load = (load, os.getloadavg())
    print(table(rows))
    if args.write:
        from benchmarks.results import write_section

        import torch

        heading = "## Compiled decoder rounds against eager (issue 23)"
        cmd = "PYTHONPATH=$PWD .venv/bin/python -m benchmarks.compiled_step " + " ".join(argv or sys.argv[1:])
        write_section(heading, "\n".join([
            heading, "", f"`{cmd.strip()}`", "",
            f"{time.strftime('%Y-%m-%d')}, {args.device}, {platform.machine()}, {args.threads} threads, torch "
            f"{torch.__version__}; {args.images} images of {args.objects} people, {args.iters} iterations per "
            f"process, the seed's `-n 25 -s 2 -b 1`; load average {load[0][0]:.1f} before, {load[1][0]:.1f} "
            f"after (1 min).", "", table(rows), ""]))


if __name__ == "__main__":
    main()
