"""Finetune's peak memory against the number of training images: it must stay flat as the dataset grows.

For each size: a synthetic folder dataset is ingested into the embedded S3 server (its own prefix), and every
image's embedding is pre-seeded there (random fp16 tensors of the real shape: the encoder's cost is out of the
picture, only reading them is measured). Each training run is a subprocess of its own, so its peak RSS
(VmHWM) is its own; its DataLoader workers are its children, and the largest of their peaks is reported too
(they are forked from it, so their RSS counts the pages they share with it).

    .venv/bin/python -m benchmarks.finetune_memory --sizes 200 1000 2000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

warnings.filterwarnings("ignore")


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    """One training run; prints its numbers as one JSON line."""
    import resource

    from components.datasets.reader import SplitRefs
    from components.storage import ObjectStore, S3Config
    from components.training.config import TrainConfig
    from components.training.loop import train

    store = ObjectStore(S3Config.from_env(endpoint=args.endpoint, bucket=args.bucket, prefix=args.prefix))
    manifest = json.loads(Path(args.manifest).read_text())
    tr, va = (SplitRefs(store, manifest, s, annotated_only=True) for s in ("train", "val"))
    cfg = TrainConfig(device="cpu", n_iterations=args.iterations, val_every=args.iterations, batch_size=2,
                      n_objects_per_batch=8, checkpoint_dir=args.work, show_progress=False, seed=0)
    t0 = time.perf_counter()
    result = train(cfg, args.weights, tr, va, store=store, weights_sha256=args.weights_sha256,
                   dataset_hash=manifest["content_hash"])
    workers_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the loader's, ended by train()
    print(json.dumps({"train_images": len(tr), "val_images": len(va), "peak_rss_mib": round(_peak_rss_mib(), 1),
                      "worker_peak_rss_mib": round(workers_mib, 1), "it_per_s": result.embedding_stats["it_per_s"],
                      "embeddings_computed": result.embedding_stats["computed"],
                      "seconds": round(time.perf_counter() - t0, 1)}))


def seed_dataset(store, n: int, work: Path, weights_sha256: str) -> Path:
    import numpy as np
    import torch

    from components.datasets.ingest import ingest
    from components.datasets.synthetic import make_folder
    from components.sam.embeddings import EMBEDDING_SHAPE, embedding_key, encode_bytes

    folder = make_folder(work / f"data-{n}", [f"img{i:05d}" for i in range(n)], seed=n, size=(48, 64))
    manifest = ingest(str(folder), "folder", f"bench-{n}", store, seed=0,
                      fractions={"train": 0.9, "val": 0.05, "test": 0.05}).manifest
    shas = sorted({it["image"]["sha256"] for it in manifest["items"]})
    rng = np.random.default_rng(n)

    def put(sha: str) -> None:
        emb = torch.from_numpy(rng.standard_normal(EMBEDDING_SHAPE, dtype=np.float32) * 0.1)
        store.put_bytes(embedding_key(store, weights_sha256, "fp32", sha), encode_bytes(emb))  # train()'s CPU default

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(put, shas))
    path = work / f"manifest-{n}.json"
    path.write_text(json.dumps(manifest))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[200, 1000, 2000])
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("manifest", "endpoint", "bucket", "prefix", "weights", "weights_sha256", "work"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    import torch

    from components.hashing import sha256_file
    from components.s3server import embedded_s3
    from components.sam.model import atomic_torch_save, build_sam
    from components.storage import ObjectStore

    rows = []
    with tempfile.TemporaryDirectory() as tmp, embedded_s3() as cfg:
        work = Path(tmp)
        os.environ.update({"AWS_ACCESS_KEY_ID": cfg.access_key, "AWS_SECRET_ACCESS_KEY": cfg.secret_key,
                           "SAM_DATA_CACHE": str(work / "data-cache")})
        torch.manual_seed(0)
        weights = work / "vit_t_random.pt"
        atomic_torch_save(build_sam("vit_t").state_dict(), weights)
        weights_sha = sha256_file(weights)
        for n in args.sizes:
            store = ObjectStore(replace(cfg, prefix=f"bench-{n}/"))
            t0 = time.perf_counter()
            manifest = seed_dataset(store, n, work, weights_sha)
            print(f"seeded {n} images and embeddings in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            cmd = [sys.executable, "-m", "benchmarks.finetune_memory", "--child",
                   "--manifest", str(manifest), "--endpoint", cfg.endpoint, "--bucket", cfg.bucket,
                   "--prefix", store.config.prefix, "--weights", str(weights), "--weights_sha256", weights_sha,
                   "--work", str(work / f"ck-{n}"), "--iterations", str(args.iterations)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| train images | val images | peak RSS (MiB) | largest worker peak RSS (MiB) | it/s | "
          "embeddings computed |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['train_images']} | {r['val_images']} | {r['peak_rss_mib']:.0f} | {r['worker_peak_rss_mib']:.0f} | "
              f"{r['it_per_s']:.2f} | {r['embeddings_computed']} |")


if __name__ == "__main__":
    main()
