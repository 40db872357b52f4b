"""One prompting round of the mask decoder, forward and backward: the official MaskDecoder.predict_masks
against components/sam/decoder.py, both with every prompt of the image in one call (the official one
copies the image embedding per prompt with repeat_interleave), on the same random `vit_t` decoder,
box prompts.

Cases: N prompts on one image, without a mask prompt (the image tokens are shared in the first layer)
and with one (per-prompt image tokens). Reported: the best of `--repeats` timed rounds after two warm
ones, in milliseconds, and the ratio. The best, not the median: on a shared machine it is the figure
least moved by other work.

    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.decoder_speed --threads 1 --write
"""
from __future__ import annotations

import argparse
import platform
import time
import warnings

import torch


def _round(model, predict, emb, n: int, mask: torch.Tensor | None, amp: bool) -> float:
    from components.sam.prompt_batch import embed_tokens

    enc = model.prompt_encoder
    coords = torch.rand(n, 2, 2, generator=torch.Generator().manual_seed(n)) * 1000
    labels = torch.tensor([[2, 3]] * n)
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        sparse = embed_tokens(enc, coords, labels)
        if mask is None:
            dense = enc.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, *enc.image_embedding_size)
        else:
            dense = enc.mask_downscaling(mask)
        low, iou = predict(model.mask_decoder, emb, enc.get_dense_pe(), sparse, dense)
    (low.float().sigmoid().mean() + iou.float().square().mean()).backward()
    return time.perf_counter() - t0


def official(decoder, emb, pe, sparse, dense):
    return type(decoder).predict_masks(decoder, emb, pe, sparse, dense)


def measure(args) -> list[dict]:
    from components.sam.decoder import predict_masks
    from components.sam.model import build_sam, set_trainable

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_sam("vit_t")
    set_trainable(model)
    emb = torch.randn(1, 256, 64, 64)
    rows = []
    for n in args.prompts:
        for with_mask in (False, True):
            mask = torch.randn(n, 1, 256, 256) if with_mask else None
            best = {}
            for name, predict in (("official", official), ("ours", predict_masks)):
                times = [_round(model, predict, emb, n, mask, args.amp == "bf16") for _ in range(2 + args.repeats)]
                best[name] = min(times[2:]) * 1000
            rows.append({"prompts": n, "mask_prompt": with_mask, **best, "ratio": best["official"] / best["ours"]})
            print(rows[-1], flush=True)
    return rows


def table(rows: list[dict], args) -> str:
    out = [f"`PYTHONPATH=$PWD .venv/bin/python -m benchmarks.decoder_speed --threads {args.threads} --amp {args.amp}`",
           "",
           f"{platform.machine()}, {args.threads} thread(s), torch {torch.__version__}, {args.amp}; one round "
           f"(forward + backward) of a random `vit_t` decoder on one image, box prompts; best of {args.repeats} "
           "after 2 warm-up rounds.",
           "",
           "| prompts | mask prompt | official (ms) | ours (ms) | speed-up |",
           "|---:|---|---:|---:|---:|"]
    out += [f"| {r['prompts']} | {'yes' if r['mask_prompt'] else 'no'} | {r['official']:.0f} | {r['ours']:.0f} | "
            f"{r['ratio']:.2f}x |" for r in rows]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, nargs="+", default=[1, 3, 8])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--amp", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--write", action="store_true", help="record the table in benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    text = table(measure(args), args)
    print(text)
    if args.write:
        from benchmarks.results import write_section

        heading = "## Decoder round: official vs components/sam/decoder.py (CPU)"
        write_section(heading, heading + "\n\n" + text)


if __name__ == "__main__":
    main()
