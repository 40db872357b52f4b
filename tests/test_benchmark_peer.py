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


def test_the_comparison_splits_as_ingest_splits_penn_fudan_by_default(tmp_path):
    """Both sides train and validate on the split a real ingest of a 170-image Penn-Fudan gives."""
    from components.datasets.ingest import prepare
    from components.datasets.synthetic import make_pennfudan

    folder = make_pennfudan(tmp_path, n_fudan=74, n_penn=96, seed=0, size_range=(32, 40))
    with prepare(str(folder)) as prep:
        ingested = {split: {it.id for it in prep.items if split in it.splits} for split in ("train", "val")}
    train, val = seed_split(170, 32)
    assert {s.id for s in train} == ingested["train"]
    assert {s.id for s in val} == ingested["val"]
    assert (len(train), len(val)) == (120, 25)  # 70 / 15 / 15 per group, the test split left out


def test_the_peer_dataset_yields_torch_em_pairs_and_pickles_as_its_recipe():
    """torch_em pickles the loader's dataset into every checkpoint: pixels there would slow the peer down."""
    data = PeerImages(12, 48, "val")
    image, labels = data[0]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32 and float(image.max()) > 1
    assert labels.shape == (1, 48, 48) and int(labels.max()) >= 1  # instance ids, not a binary mask
    blob = pickle.dumps(data)
    assert len(blob) < 1000
    again = pickle.loads(blob)
    assert len(again) == len(data) == 2
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
    assert (result["train_images"], result["val_images"]) == (2, 1)
    assert result["iterations"] == 3
    assert result["validations"] == 3  # iterations 0, 2 and 3
    assert result["embedded"] == 3  # every train and val image once
    assert 0 < result["embed_s"] + result["validation_s"] < result["whole_s"]
