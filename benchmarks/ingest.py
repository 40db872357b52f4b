"""Ingest throughput into the embedded S3 server: sequential vs parallel upload.

    .venv/bin/python -m benchmarks.ingest [--workers 1 8] [--repeats 3] [--write]

A 170-image synthetic Penn-Fudan (real sizes: widths 253..1017 px, 423 pedestrians) is generated once;
each run then uploads it under a fresh prefix, so nothing is skipped. "upload" times put_many alone;
"ingest" is the whole step (unzip-free folder source: validate, hash, split, upload, manifest).
--write replaces the "## Ingest" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

from benchmarks.results import write_section
from components.datasets import synthetic
from components.datasets.ingest import build_manifest, ingest, prepare
from components.s3server import embedded_s3
from components.storage import ObjectStore

COMMAND = ".venv/bin/python -m benchmarks.ingest --workers 1 8 --repeats 3 --write"


def run(workers: list[int], repeats: int) -> tuple[list[dict], dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, embedded_s3() as cfg:
        t0 = time.perf_counter()
        folder = synthetic.make_pennfudan(Path(tmp), 74, 96, seed=0)
        gen_s = time.perf_counter() - t0
        with prepare(str(folder)) as prep:
            n_images = len(prep.items)
            n_bytes = sum(it.image_bytes + it.mask_bytes for it in prep.items)
            for w in workers:
                upload, whole = [], []
                for _ in range(repeats):
                    store = ObjectStore(replace(cfg, prefix=f"bench-{uuid.uuid4().hex[:8]}/"))
                    m = build_manifest(prep, "bench", store)
                    items = [(it[k]["key"], getattr(p, f"{k}_path"), it[k]["sha256"])
                             for it, p in zip(m["items"], prep.items) for k in ("image", "mask")]
                    t = time.perf_counter()
                    uploaded, _ = store.put_many(items, workers=w)
                    upload.append(time.perf_counter() - t)
                    assert uploaded == 2 * n_images

                    store = ObjectStore(replace(cfg, prefix=f"bench-{uuid.uuid4().hex[:8]}/"))
                    t = time.perf_counter()
                    result = ingest(str(folder), "auto", "bench", store, workers=w)
                    whole.append(time.perf_counter() - t)
                    assert result.uploaded == 2 * n_images
                for what, times in (("upload", upload), ("ingest", whole)):
                    s = statistics.median(times)
                    rows.append({"what": what, "workers": w, "seconds": s, "images_per_s": n_images / s,
                                 "mb_per_s": n_bytes / 1e6 / s})
    info = {"images": n_images, "objects": 2 * n_images, "mb": n_bytes / 1e6, "generate_s": gen_s,
            "cpus": os.cpu_count(), "python": platform.python_version(), "repeats": repeats}
    return rows, info


def table(rows: list[dict], info: dict) -> str:
    lines = [
        "## Ingest",
        "",
        f"`{COMMAND}`",
        "",
        f"Synthetic Penn-Fudan at the real set's sizes: {info['images']} images + masks = {info['objects']} "
        f"objects, {info['mb']:.1f} MB, into the embedded S3 server (moto) on 127.0.0.1; median of "
        f"{info['repeats']} runs; {info['cpus']} CPUs shared with other work, Python {info['python']}. "
        "\"upload\" is `ObjectStore.put_many` alone; \"ingest\" is the whole step from a local folder "
        "(decode-validate, sha256, split, upload, manifest).",
        "",
        "| what | workers | seconds | images/s | MB/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['what']} | {r['workers']} | {r['seconds']:.2f} | {r['images_per_s']:.1f} | "
                     f"{r['mb_per_s']:.1f} |")
    lines += [
        "",
        "The server is one Python process on the same cores as the client, so extra upload threads mostly "
        "queue on it; a networked SeaweedFS/MinIO, where every object costs a round trip, is where workers=8 "
        "(the default) should matter, and that is not measured here. The synthetic PNGs carry sensor-like "
        "noise and are about twice the size of the real photos (the real zip is about 50 MB), so MB/s is representative "
        "and images/s is conservative. A re-run on unchanged data uploads nothing (manifest found).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update the Ingest section of benchmarks/RESULTS.md")
    args = parser.parse_args()
    rows, info = run(args.workers, args.repeats)
    section = table(rows, info)
    print(section)
    if args.write:
        write_section("## Ingest", section)


if __name__ == "__main__":
    main()
