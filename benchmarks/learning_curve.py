"""Does fine-tuning learn on data like Penn-Fudan? Validation box Dice and point Dice against iterations.

From a randomly initialised `vit_t`, on Penn-Fudan-like images (`benchmarks.pedestrians`), `train()`
runs in chunks of `--chunk` iterations: each call resumes from the previous one's latest.pt (resume is
exact, so the chunks make one trajectory; `n_iterations` may change across a resume) and the embeddings
come back from the object store (the real S3 server process, as a re-run of the pipeline would get
them). After each chunk the latest weights are scored on the validation images by evaluation's own
`score_model`: box prompts, and one centre point with the multimask output of highest predicted IoU,
in fp32 at the original resolution. No hook in the trainer: the benchmark only reads checkpoints.

    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.learning_curve --label before --write
"""
from __future__ import annotations

import argparse
import shlex
import json
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path


def curve(args, s3=None) -> tuple[list[dict], list[float]]:
    """The scored rows, one per chunk, and the per-iteration training loss of the whole run. `s3`: a running
    embedded S3 server's config to use instead of a fresh one (runs on the same seed then share embeddings)."""
    import torch

    torch.set_num_threads(args.threads)
    bf16 = args.amp == "bf16"
    if args.embed == "bf16":  # the product never embeds in bf16 on a CPU any more: this arm patches its rule
        from unittest import mock

        from components.sam import embeddings
        with mock.patch.object(embeddings, "encoder_precision", lambda device, amp: "bf16"):
            return _curve(args, bf16, s3)
    return _curve(args, bf16, s3)


def _curve(args, bf16: bool, s3_config) -> tuple[list[dict], list[float]]:
    from contextlib import nullcontext

    import torch

    from benchmarks.pedestrians import pedestrian_samples, random_vit_t
    from components.training.config import TrainConfig
    from components.training.loop import train
    from components.evaluate import score_model
    from components.hashing import sha256_file
    from components.s3server import embedded_s3
    from components.sam.embeddings import EmbeddingCache
    from components.sam.model import build_sam, load_trainable_state_dict
    from components.storage import ObjectStore
    from components.datasets.reader import SampleSplit
    from components.training.data import Scored

    samples = pedestrian_samples(args.train + args.val, (args.height, args.width), seed=args.seed)
    train_s, val_s = SampleSplit(samples[:args.train], "train"), SampleSplit(samples[args.train:], "val")
    rows, losses = [], []
    with tempfile.TemporaryDirectory() as tmp, (nullcontext(s3_config) if s3_config else embedded_s3()) as s3:
        store = ObjectStore(replace(s3, prefix="learning-curve/"))
        weights = random_vit_t(Path(tmp) / "vit_t_random.pt", seed=args.seed)
        sha = sha256_file(weights)
        scorer = build_sam("vit_t", weights, "cpu")
        # The same cache train() uses, so its first chunk finds the validation embeddings in the store.
        # In the precision train() embeds them in (fp32 on a CPU; bf16 under --embed bf16).
        cache = EmbeddingCache(scorer, sha, store, batch_size=1, amp=bf16)
        cache.ensure([val_s.image_sha256(i) for i in range(len(val_s))], lambda i: val_s.load(i).image)
        scored = [Scored(val_s.load(i), cache.from_store(val_s.image_sha256(i))) for i in range(len(val_s))]

        def score(iteration: int, **extra) -> None:
            inst = score_model(scorer, scored)["instances"]
            row = {"iteration": iteration, "box_dice": statistics.fmean(r["box_dice"] for r in inst),
                   "point_dice": statistics.fmean(r["point_dice"] for r in inst), "instances": len(inst), **extra}
            rows.append(row)
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

        score(0)
        t0 = time.perf_counter()
        for end in range(args.chunk, args.iters + 1, args.chunk):
            cfg = TrainConfig(device="cpu", n_iterations=end, val_every=args.chunk, lr=args.lr, amp=bf16,
                              amp_dtype="bf16", seed=args.seed if args.train_seed is None else args.train_seed,
                              checkpoint_dir=f"{tmp}/checkpoints", resume=True,
                              show_progress=False)
            result = train(cfg, weights, train_s, val_s, store=store, weights_sha256=sha)
            latest = torch.load(result.latest_path, map_location="cpu", weights_only=True)
            load_trainable_state_dict(scorer, latest["trainable_state"])
            losses = list(result.history["loss"])  # the whole trajectory: history survives the resume
            chunk = [x for x in losses[-args.chunk:] if x == x]
            score(end, loss=statistics.fmean(chunk) if chunk else float("nan"),
                  trainer_val_dice=result.history["val_dice"][-1], seconds=time.perf_counter() - t0)
    return rows, losses


def record(args, rows: list[dict], load: tuple) -> None:
    from benchmarks.results import write_section

    heading = f"## Learning curve ({args.label})"
    first, last = rows[0], rows[-1]
    precision = (f"training {'bf16 autocast' if args.amp == 'bf16' else 'fp32'}, {args.embed} embeddings")
    lines = [heading, "",
             f"`PYTHONPATH=$PWD .venv/bin/python -m benchmarks.learning_curve --label {shlex.quote(args.label)} --iters {args.iters} "
             f"--chunk {args.chunk} --train {args.train} --val {args.val} --seed {args.seed} "
             f"{'' if args.train_seed is None else f'--train-seed {args.train_seed} '}--amp {args.amp} --embed {args.embed} "
             f"--threads {args.threads} --write`", "",
             f"Random `vit_t` (seed {args.seed}), {args.train} training and {args.val} validation Penn-Fudan-like "
             f"{args.height}x{args.width} images ({first['instances']} validation people), the seed's settings "
             f"(`-n 25`, `-s 2`, batch 1, alternating box/point prompts) at lr {args.lr:g}, {precision}, CPU "
             f"with {args.threads} threads (load average {load[0]:.1f} -> {load[1]:.1f}, 1 min). Box and point Dice: `components.evaluate.score_model` "
             f"on the validation images with the latest weights (fp32 decoder; point = one centre point, multimask, "
             f"highest predicted IoU); \"trainer val Dice\" is the trainer's own validation (box, in the run's "
             f"precision).",
             "", "| iteration | loss (chunk mean) | trainer val Dice | box Dice | point Dice |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        loss = f"{r['loss']:.4f}" if "loss" in r else "-"
        tv = f"{r['trainer_val_dice']:.4f}" if "trainer_val_dice" in r else "-"
        lines.append(f"| {r['iteration']} | {loss} | {tv} | {r['box_dice']:.4f} | {r['point_dice']:.4f} |")
    lines += ["", f"Box Dice {first['box_dice']:.3f} -> {last['box_dice']:.3f}, point Dice "
              f"{first['point_dice']:.3f} -> {last['point_dice']:.3f} in {last.get('seconds', 0):.0f} s of "
              f"training (embedding, validation and checkpoints included).", ""]
    write_section(heading, "\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--chunk", type=int, default=25, help="iterations between scorings")
    p.add_argument("--train", type=int, default=8, help="training images")
    p.add_argument("--val", type=int, default=4, help="validation images")
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--width", type=int, default=320)
    # 1e-3 as in tests/test_finetune.py::test_it_learns: from random weights the seed's 1e-5 barely moves.
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-seed", type=int, help="training's seed (prompts, order) if not --seed: the same data and "
                   "weights on another trajectory, to see how much the curve moves by chance")
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp32"],
                   help="training precision: bf16 autocast, or fp32")
    p.add_argument("--embed", default="fp32", choices=["fp32", "bf16"],
                   help="the encoder's precision for the embeddings (the product: fp32 on a CPU)")
    p.add_argument("--label", default="before", help="which code state this curve shows (section heading)")
    p.add_argument("--write", action="store_true", help="record the curve in benchmarks/RESULTS.md")
    p.add_argument("--json", type=Path, help="also write the rows and the per-iteration losses here (to compare runs)")
    args = p.parse_args(argv)
    if args.iters < args.chunk:
        p.error("--iters must be at least --chunk")
    warnings.filterwarnings("ignore")
    load0 = os.getloadavg()[0]
    rows, losses = curve(args)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                         "loss": losses}, indent=1))
    if args.write:
        record(args, rows, (load0, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
