"""The CPU embedding pass: which threads, batch and layout embed Penn-Fudan-sized images fastest.

Each case embeds the same `--images` Penn-Fudan-sized images with the product's `compute_embeddings`
(random `vit_t`, encoder precision as given), `--repeats` times after a warm-up; the row is the fastest
repeat (the machine is shared: the minimum is the least disturbed). Cases:

- `threads=T batch=B`: T intra-op threads, B images per encoder call (the product's CPU path is B=1);
- `layout=contiguous`: the same with the encoder's weights and input left in the default layout (the
  product switches them to channels-last for the pass);
- `images in parallel`: T Python threads each embedding its share with one intra-op thread each (torch
  releases the GIL), the pass as two independent streams instead of one parallelised one.

    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.embed_speed --images 4 --repeats 3 [--precision fp32]
    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.embed_speed --device cuda --images 170 --repeats 3

On CUDA the cases are the product's pass (fp16 autocast, pinned copies) at its batch size and at 8 and 16.
"""
from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from unittest import mock


@contextmanager
def _keep_layout(encoder, device):
    yield


@contextmanager
def _contiguous_layout():
    """The encoder pass without the channels-last switch (weights and input in the default layout)."""
    import torch

    from components.sam import embeddings

    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        kwargs.pop("memory_format", None)
        return real_to(self, *args, **kwargs)

    with mock.patch.object(embeddings, "_conv_layout", _keep_layout), mock.patch.object(torch.Tensor, "to", to):
        yield


def _cpu_cases(model, images, args) -> dict:
    """label -> (threads, fn) for the CPU's choices."""
    import torch

    from components.sam import embeddings
    from components.sam.embeddings import compute_embeddings

    def embed(batch: int):
        return lambda: compute_embeddings(model, images, batch_size=batch)

    def contiguous():
        with _contiguous_layout():
            compute_embeddings(model, images, batch_size=1)

    def parallel():
        # The layout switch once around both streams (the product's per-call switch would race between them).
        model.image_encoder.to(memory_format=torch.channels_last)
        try:
            with mock.patch.object(embeddings, "_conv_layout", _keep_layout), ThreadPoolExecutor(args.threads) as pool:
                list(pool.map(lambda imgs: compute_embeddings(model, imgs, batch_size=1),
                              [images[i::args.threads] for i in range(args.threads)]))
        finally:
            model.image_encoder.to(memory_format=torch.contiguous_format)

    t = args.threads
    return {f"threads={t} batch=1 (the product)": (t, embed(1)), f"threads={t} batch=2": (t, embed(2)),
            "threads=1 batch=1": (1, embed(1)), f"threads={t} batch=1 layout=contiguous": (t, contiguous),
            f"{t} images in parallel, 1 thread each": (1, parallel)}


def _cuda_cases(model, images, args) -> dict:
    """label -> (threads, fn): the product's CUDA pass (fp16 autocast) at a few batch sizes."""
    import torch

    from components.sam.embeddings import compute_embeddings, encoder_batch
    from components.training.config import TrainConfig

    product = encoder_batch(torch.device("cuda"), TrainConfig().embed_batch_size)

    def embed(batch: int):
        def fn():
            compute_embeddings(model, images, batch_size=batch)
            torch.cuda.synchronize()
        return fn

    return {f"batch={b}{' (the product)' if b == product else ''}": (args.threads, embed(b))
            for b in sorted({product, 8, 16})}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4, help="on CUDA: 170, Penn-Fudan's size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="CPU encoder precision (the product's is fp32; bf16 patches its rule, for comparison)")
    p.add_argument("--threads", type=int, default=2, help="the machine's cores to use")
    p.add_argument("--markdown", type=Path, help="write the table here")
    args = p.parse_args(argv)

    import torch

    from benchmarks.pedestrians import pedestrian_samples
    from components.sam import embeddings
    from components.sam.model import build_sam

    torch.manual_seed(0)
    model = build_sam("vit_t", None, args.device)
    # Penn-Fudan's median image is about 300x400; every image is resized to 1024 on its long side anyway.
    images = [s.image for s in pedestrian_samples(args.images, (300, 400))]
    cases = (_cuda_cases if args.device == "cuda" else _cpu_cases)(model, images, args)
    best = dict.fromkeys(cases, float("inf"))
    rule = (lambda device, amp: "bf16") if args.precision == "bf16" and args.device == "cpu" else \
        embeddings.encoder_precision
    with mock.patch.object(embeddings, "encoder_precision", rule):
        for label, (threads, fn) in cases.items():  # warm-up: oneDNN / cuDNN primitive creation
            torch.set_num_threads(threads)
            fn()
        for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits every case alike
            for label, (threads, fn) in cases.items():
                torch.set_num_threads(threads)
                t0 = time.perf_counter()
                fn()
                best[label] = min(best[label], time.perf_counter() - t0)
    precision = embeddings.encoder_precision(torch.device(args.device), None) if args.device == "cuda" else args.precision
    lines = [f"{args.device}, {precision} encoder, {args.images} images of 300x400, best of {args.repeats} "
             f"(interleaved), load average {os.getloadavg()[0]:.1f}", "",
             f"| case | seconds for {args.images} images | per image | against the product |", "|---|---:|---:|---:|"]
    base = next(iter(best.values()))
    for label, s in best.items():
        lines.append(f"| {label} | {s:.2f} | {s / args.images:.3f} | {base / s:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
