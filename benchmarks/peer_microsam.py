"""Our trainer against micro-sam's `SamTrainer` (PyPI `micro-sam`, MIT) on identical work, in one run.

Same for both: the same Penn-Fudan-like images (`benchmarks.pedestrians`, 304x304, 1..8 people each),
the same randomly initialised `vit_t` state dict, the seed's settings (`-n 25`, i.e. every person of
the image; `-s 2`; batch 1), the image encoder frozen, N iterations. Differences that belong to each
trainer stay: micro-sam runs the (frozen) image encoder on every iteration, ours embeds each image once
up front; each uses its own default mixed precision (micro-sam: bf16 on CPU, fp16 + GradScaler on CUDA;
ours: `--amp-dtype`, bf16 by default).

Reported per trainer: the warm time per training iteration (median over iterations 2..N, setup and the
first iteration excluded) and the whole run (ours: embedding pass + data preparation + N iterations;
micro-sam: N iterations), no validation in either. `--seed-defaults` times instead the whole run each
trainer really does at the seed's defaults, validation and checkpoints included
(benchmarks/peer_whole_run.py). The two run in separate processes, one after the other: micro-sam in
its own venv (`benchmarks/.peer-venv`, made on first use: it must not leak into the project's
dependencies), ours in the interpreter that runs this script.

    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.peer_microsam                 # CPU, 40 iterations
    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.peer_microsam --device cuda --iters 200
    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.peer_microsam --seed-defaults # 170 images, 200 iterations
    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.peer_microsam --setup-only    # just the peer venv
    PEER_WHEELS=/path/to/wheels ...   # make the peer venv offline from a folder of wheels (pip download)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

from components.training.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = Path(__file__).resolve().parent / ".peer-venv"
# micro-sam's declared requirements pull in napari, Qt and a second torch; these are what
# `import micro_sam.training` actually needs (found by importing it in a bare venv until it succeeded).
PEER_PACKAGES = ["micro-sam", "torch-em", "python-elf", "bioimage-cpp"]
PEER_DEPENDENCIES = ["imageio", "scikit-image", "scikit-learn", "scipy", "kornia", "pooch", "xxhash", "zarr",
                     "google-crc32c", "natsort", "h5py", "xarray", "tensorboard", "matplotlib"]
SEED = TrainConfig()  # the seed's settings, stated once in components/training/config.py
OBJECTS, SUB_ITERATIONS, BATCH = SEED.n_objects_per_batch, SEED.n_sub_iteration, SEED.batch_size


def ensure_peer_venv(venv: Path = PEER_VENV) -> Path:
    """The peer's interpreter: a venv that sees this interpreter's packages (torch, timm, mobile_sam:
    the very same builds) through a .pth line, plus micro-sam and what it imports."""
    python = venv / "bin" / "python"
    if python.exists():
        return python
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    # `--system-site-packages` would expose the base interpreter's packages, not this venv's torch.
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "project-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    if os.environ.get("PEER_WHEELS"):  # an offline machine (the GPU box): wheels brought along in a folder
        pip += ["--no-index", "--find-links", os.environ["PEER_WHEELS"]]
    subprocess.run(pip + ["--no-deps"] + PEER_PACKAGES, check=True)
    # Without --no-deps, but torch is already visible through the .pth, so pip leaves it alone.
    subprocess.run(pip + PEER_DEPENDENCIES, check=True)
    return python


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _summary(side: str, iteration_s: list[float], cpu_s: list[float], whole_s: float, **extra) -> dict:
    """Wall and process-CPU seconds per iteration: on a shared machine the CPU time is the steadier one."""
    warm, warm_cpu = iteration_s[1:] or iteration_s, cpu_s[1:] or cpu_s
    return {"side": side, "iterations": len(iteration_s), "first_s": iteration_s[0],
            "per_iteration_s": statistics.median(warm), "mean_warm_s": statistics.fmean(warm),
            "cpu_per_iteration_s": statistics.median(warm_cpu), "whole_s": whole_s, **extra}


def run_ours(args) -> dict:
    import torch

    from benchmarks.pedestrians import pedestrian_samples
    from components.training.config import TrainConfig, resolve_amp
    from components.training.trainer import Trainer, prepare_items
    from components.sam.embeddings import compute_embeddings
    from components.sam.model import build_sam

    device = torch.device(args.device)
    cfg = TrainConfig(device=args.device, n_objects_per_batch=OBJECTS, n_sub_iteration=SUB_ITERATIONS,
                      batch_size=BATCH, n_iterations=args.iters, amp=args.amp_dtype != "fp32",
                      amp_dtype=args.amp_dtype if args.amp_dtype != "fp32" else "fp16", seed=0, show_progress=False)
    amp = resolve_amp(cfg, device)
    samples = pedestrian_samples(args.images, (args.size, args.size))
    model = build_sam("vit_t", args.weights, device)
    _sync(device)
    t0 = time.perf_counter()
    # train()'s embedding pass (without the store's upload), at train()'s batch size (1 on CPU, where it is faster).
    embs = compute_embeddings(model, [s.image for s in samples],
                              batch_size=cfg.embed_batch_size if device.type == "cuda" else 1, amp=amp.enabled)
    items = prepare_items(samples, list(embs.cpu()))
    _sync(device)
    embed_s = time.perf_counter() - t0
    trainer = Trainer(cfg, model, items, items[:1], device, amp)
    times, cpu = [], []
    for it in range(1, args.iters + 1):
        t, c = time.perf_counter(), time.process_time()
        trainer.train_step(it)
        _sync(device)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return _summary("ours", times, cpu, embed_s + sum(times), embed_s=embed_s, amp=amp.label)


class _Stamped(list):
    """The peer's dataset: records when each item is fetched. With num_workers=0 the loader fetches
    lazily, so successive stamps bracket exactly one training iteration of the trainer's own loop."""

    def __init__(self, items):
        super().__init__(items)
        self.stamps: list[tuple[float, float]] = []

    def __getitem__(self, i):
        self.stamps.append((time.perf_counter(), time.process_time()))
        return super().__getitem__(i)


def torch_em_pair(sample):
    """A sample as torch_em's loaders yield it: (C, H, W) float image in 0..255, (1, H, W) float instance labels."""
    import numpy as np
    import torch

    return (torch.from_numpy(sample.image).permute(2, 0, 1).float(),
            torch.from_numpy(sample.mask.astype(np.int64))[None].float())


def run_peer(args) -> dict:
    import torch
    from torch.utils.data import DataLoader, RandomSampler
    from tqdm import tqdm

    import micro_sam.training as sam_training
    from micro_sam.training.util import ConvertToSamInputs

    from benchmarks.pedestrians import pedestrian_samples

    device = torch.device(args.device)
    samples = pedestrian_samples(args.images, (args.size, args.size))
    data = _Stamped([torch_em_pair(s) for s in samples])
    sampler = RandomSampler(data, num_samples=args.iters, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(data, batch_size=BATCH, sampler=sampler, num_workers=0)
    # As micro_sam.training.train_sam builds it (micro_sam/training/training.py), without the UNETR
    # decoder and the logger: AdamW at lr 1e-5, box distortion 0.025, mask prompts with p = 0.5.
    model = sam_training.get_trainable_sam_model(model_type="vit_t", device=device, checkpoint_path=args.weights,
                                                 freeze=["image_encoder"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    with tempfile.TemporaryDirectory() as save_root:
        trainer = sam_training.SamTrainer(
            name="peer", save_root=save_root, train_loader=loader, val_loader=loader, model=model,
            optimizer=optimizer, device=device, logger=None, log_image_interval=100,
            mixed_precision=args.amp_dtype != "fp32",
            convert_inputs=ConvertToSamInputs(transform=model.transform, box_distortion_factor=0.025),
            n_objects_per_batch=OBJECTS, n_sub_iteration=SUB_ITERATIONS, compile_model=False, mask_prob=0.5)
        # DefaultTrainer.fit() (torch_em/trainer/default_trainer.py) is _initialize, then per epoch
        # _train_epoch_mixed and a validation; we run the first two only, so no validation is timed.
        trainer._initialize(args.iters, None)
        _sync(device)
        t0 = time.perf_counter()
        (trainer._train_epoch if args.amp_dtype == "fp32" else trainer._train_epoch_mixed)(tqdm(disable=True))
        _sync(device)
        end = time.perf_counter()
        stamps = data.stamps + [(end, time.process_time())]
    times = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
    if len(times) != args.iters:
        raise RuntimeError(f"the peer ran {len(times)} iterations, expected {args.iters}")
    return _summary("micro-sam", times, cpu, end - t0,
                    amp=trainer.mixed_precision_dtype if args.amp_dtype != "fp32" else "off")


def _side(args, python: str, side: str, weights: str) -> dict:
    cmd = [python, "-m", "benchmarks.peer_microsam", "--side", side, "--weights", weights, "--device", args.device,
           "--iters", str(args.iters), "--images", str(args.images), "--size", str(args.size),
           "--threads", str(args.threads), "--amp-dtype", args.amp_dtype, "--val-every", str(args.val_every)]
    cmd += ["--seed-defaults"] if args.seed_defaults else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"{side} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    r = json.loads(line[len("RESULT "):])
    r["process_s"] = time.perf_counter() - t0
    warm = (f"{r['per_iteration_s']:.3f} s/iteration warm (first {r['first_s']:.2f} s), "
            if "per_iteration_s" in r else "")
    print(f"{r['side']:9s}: {warm}whole run {r['whole_s']:.1f} s, amp {r['amp']}", flush=True)
    return r


def table(peer: dict, ours: dict, device_name: str) -> str:
    def cpu(r: dict) -> str:
        return f"{r['cpu_per_iteration_s']:.3f} s" if "cpu_per_iteration_s" in r else "-"

    def ratio(key: str) -> str:
        return f"**{peer[key] / ours[key]:.2f}x**" if key in peer and key in ours else "-"

    rows = ["| trainer | per training iteration (warm, median) | process CPU per iteration | whole run "
            "| embedding pass | AMP |",
            "|---|---:|---:|---:|---:|---|",
            f"| micro-sam `SamTrainer` (encoder every iteration) | {peer['per_iteration_s']:.3f} s | {cpu(peer)} | "
            f"{peer['whole_s']:.1f} s | - | {peer['amp']} |",
            f"| this project (cached embeddings) | {ours['per_iteration_s']:.3f} s | {cpu(ours)} | "
            f"{ours['whole_s']:.1f} s | {ours['embed_s']:.1f} s | {ours['amp']} |",
            f"| **ratio (micro-sam / ours)** | {ratio('per_iteration_s')} | {ratio('cpu_per_iteration_s')} | "
            f"{ratio('whole_s')} | | |"]
    return f"{device_name}\n\n" + "\n".join(rows)


def describe(args, peer: dict, ours: dict, load) -> str:
    """The paragraph under the RESULTS.md heading: what both did."""
    from benchmarks.pedestrians import instances, pedestrian_samples

    n_obj = instances(pedestrian_samples(args.images, (args.size, args.size)))
    return (f"{args.images} Penn-Fudan-like {args.size}x{args.size} images ({n_obj} people, 1..8 per image), a random "
            f"`vit_t`, `-n {OBJECTS}` (every person), `-s {SUB_ITERATIONS}`, batch {BATCH}, {args.iters} iterations, "
            f"image encoder frozen; micro-sam first, then ours, each in its own process; load average "
            f"{load[0][0]:.1f} before, {load[1][0]:.1f} after (1 min). Whole run: ours = embedding pass + "
            f"preparation + iterations, micro-sam = iterations; no validation in either.")


def _comparison(args):
    """The chosen comparison: (ours, peer, table, describe, RESULTS.md heading)."""
    where = "GPU" if args.device.startswith("cuda") else "CPU"
    if args.seed_defaults:
        from benchmarks import peer_whole_run as whole

        return (whole.run_ours, whole.run_peer, whole.table, whole.describe,
                f"## Against the peer, whole run at the seed's defaults ({where})")
    return run_ours, run_peer, table, describe, f"## Against the peer ({where})"


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed-defaults", action="store_true",
                   help="time each trainer's whole run (validation, checkpoints) at the seed's defaults")
    p.add_argument("--iters", type=int, help=f"default: 40, with --seed-defaults {SEED.n_iterations}")
    p.add_argument("--images", type=int, help="default: 24, with --seed-defaults 170 (Penn-Fudan's size)")
    p.add_argument("--val-every", type=int, default=SEED.val_every, help="with --seed-defaults: validation interval")
    p.add_argument("--size", type=int, default=304, help="image height and width")
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    p.add_argument("--amp-dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="ours; the peer uses its default mixed precision, or none under fp32 (both fp32 then)")
    p.add_argument("--weights", help="vit_t state dict (default: a random one, seeded)")
    p.add_argument("--peer-python", help="the peer's interpreter (default: benchmarks/.peer-venv, made if missing)")
    p.add_argument("--json", type=Path, help="write both results here")
    p.add_argument("--markdown", type=Path, help="write the table here")
    p.add_argument("--write", action="store_true", help="record the table in benchmarks/RESULTS.md")
    p.add_argument("--setup-only", action="store_true", help="only make the peer venv")
    p.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)  # internal: one side per process
    args = p.parse_args(argv)
    args.iters = args.iters or (SEED.n_iterations if args.seed_defaults else 40)
    args.images = args.images or (170 if args.seed_defaults else 24)
    warnings.filterwarnings("ignore")
    run_ours_side, run_peer_side, make_table, make_paragraph, heading = _comparison(args)
    if args.side:
        import torch

        torch.set_num_threads(args.threads)
        result = (run_ours_side if args.side == "ours" else run_peer_side)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    peer_python = args.peer_python or str(ensure_peer_venv())
    if args.setup_only:
        print(peer_python)
        return
    from benchmarks.pedestrians import random_vit_t

    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights or str(random_vit_t(Path(tmp) / "vit_t_random.pt"))
        peer = _side(args, peer_python, "peer", weights)
        ours = _side(args, sys.executable, "ours", weights)
    load = (load, os.getloadavg())
    name = device_name(args.device)
    print("\n" + make_table(peer, ours, name))
    if args.markdown:
        args.markdown.write_text(make_table(peer, ours, name) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"peer": peer, "ours": ours, "device": name, "load": load}, indent=2))
    if args.write:
        from benchmarks.results import write_section

        cmd = "PYTHONPATH=$PWD .venv/bin/python -m benchmarks.peer_microsam " + " ".join(argv or sys.argv[1:])
        write_section(heading, "\n".join([heading, "", f"`{cmd.strip()}`", "",
                                           make_paragraph(args, peer, ours, load), "",
                                           make_table(peer, ours, name), ""]))


if __name__ == "__main__":
    main()
