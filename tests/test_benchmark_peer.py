"""benchmarks/peer_microsam.py --seed-defaults (benchmarks/peer_whole_run.py): the parts that run without
micro-sam's venv. The peer's side itself needs that venv and is exercised by running the benchmark."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.peer_whole_run import PeerImages, seed_split

ROOT = Path(__file__).resolve().parent.parent


def test_the_comparison_splits_by_ingests_rule():
    """Both sides train and validate on the split ingest's rule gives these images (each image's split from
    its content hash, components/datasets/split.py): disjoint, about 70 / 15 of 170, the test split left out."""
    from benchmarks.pedestrians import pedestrian_samples
    from components.datasets.split import DEFAULT_FRACTIONS, position

    train, val = seed_split(170, 32)
    assert not {s.id for s in train} & {s.id for s in val}
    cut = DEFAULT_FRACTIONS["train"]
    for s in pedestrian_samples(170, (32, 32)):
        p = position(s.image_sha256, 0)
        assert (s.id in {t.id for t in train}) == (p < cut)
        assert (s.id in {v.id for v in val}) == (cut <= p < cut + DEFAULT_FRACTIONS["val"])
    assert 100 <= len(train) <= 138 and 12 <= len(val) <= 40  # binomial(170, p) within ~3.5 sd


def test_the_peer_dataset_yields_torch_em_pairs_and_pickles_as_its_recipe():
    """torch_em pickles the loader's dataset into every checkpoint: pixels there would slow the peer down."""
    data = PeerImages(12, 48, "val")
    image, labels = data[0]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32 and float(image.max()) > 1
    assert labels.shape == (1, 48, 48) and int(labels.max()) >= 1  # instance ids, not a binary mask
    blob = pickle.dumps(data)
    assert len(blob) < 1000
    again = pickle.loads(blob)
    assert len(again) == len(data) >= 1
    assert all(torch.equal(a, b) for pa, pb in zip(again, data) for a, b in zip(pa, pb))


def test_our_side_times_one_train_call_with_its_validations(pipeline_sources):
    """`--seed-defaults --side ours`, as the comparison runs it: the product's train() on the split, with
    validation before training, every `--val-every` iterations and after the last one."""
    folder, _ = pipeline_sources
    cmd = [sys.executable, "-m", "benchmarks.peer_microsam", "--seed-defaults", "--side", "ours",
           "--weights", str(folder / "vit_t_random.pth"), "--images", "3", "--iters", "3", "--val-every", "2",
           "--size", "64", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    assert (result["train_images"], result["val_images"]) == (1, 1)  # 3 images: one per split
    assert result["iterations"] == 3
    assert result["validations"] == 3  # iterations 0, 2 and 3
    assert result["embedded"] == 2  # every train and val image once
    assert 0 < result["embed_s"] + result["validation_s"] < result["whole_s"]
