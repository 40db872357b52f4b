"""Scale-out: the embed step's shards fill the store's embedding cache, and finetune reads its items from the
store through torch's DataLoader a few batches ahead, training exactly as it does on the same samples held in
memory, and resuming at the sampler position its checkpoint holds."""
from __future__ import annotations

import json
import uuid
from dataclasses import replace

import pytest

from components.training.config import TrainConfig

from components.training.loop import train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- the loader and its sampler -------------------------------------------------------------------------

def _items(n):
    """n real training items whose embedding is filled with their index (what the loader hands back names
    the item it is)."""
    import torch

    from components.datasets.synthetic import make_samples
    from components.training.data import prepare_items

    return prepare_items(make_samples(n, seed=0, size=(32, 40)), [torch.full((256, 64, 64), float(i))
                                                                 for i in range(n)])


def _drawn(batches, k):
    return [[(i, int(item.embedding[0, 0, 0])) for i, item in batches.next()] for _ in range(k)]


def test_worker_loaded_batches_follow_the_sampler_and_resume_from_its_state():
    import torch

    from components.training.data import EpochSampler, TrainBatches

    cpu, items = torch.device("cpu"), _items(5)
    ahead = TrainBatches(items, 2, seed=7, device=cpu, workers=2)
    try:
        first = _drawn(ahead, 4)
        state = ahead.state()
        rest = _drawn(ahead, 6)
    finally:
        ahead.close()
    assert all(i == loaded for batch in first + rest for i, loaded in batch)  # each item is the one drawn
    sampler = EpochSampler(5, 2, seed=7)
    assert [[i for i, _ in b] for b in first + rest] == [sampler.next_images() for _ in range(10)]
    # The position after 4 batches, restored in a fresh loader (no workers): the same 6 batches follow.
    resumed = TrainBatches(items, 2, seed=7, device=cpu, workers=0)
    resumed.load_state(state)
    assert _drawn(resumed, 6) == rest


# -- against the real store, model and trainer ----------------------------------------------------------
# One dataset version and one set of embedding shards per module: the encoder (the slow part) runs once
# for every image, and each test below reads what it needs.

@pytest.fixture(scope="module")
def dataset(tmp_path_factory, s3):
    """A synthetic dataset version ingested into the real S3 server (its own prefix), with its manifest."""
    from components.datasets import synthetic
    from components.datasets.ingest import ingest
    from components.storage import ObjectStore

    tmp = tmp_path_factory.mktemp("stream")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAM_DATA_CACHE", str(tmp / "data-cache"))
        mp.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
        mp.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
        store = ObjectStore(replace(s3, prefix=f"t-stream-{uuid.uuid4().hex[:8]}/"))
        root = synthetic.make_pennfudan(tmp / "src", 5, 2, seed=3, size_range=(96, 128))
        manifest = ingest(str(root), "auto", "stream", store, seed=0).manifest
        path = tmp / "manifest.json"
        path.write_text(json.dumps(manifest))
        yield store, manifest, path


@pytest.fixture
def store_env(s3, tmp_path, monkeypatch):
    """The store's credentials and an empty local object cache, for the test's own steps."""
    monkeypatch.setenv("SAM_DATA_CACHE", str(tmp_path / "data-cache"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)


def _embed_all(store, manifest, path, random_vit_t, shards, out_dir):
    from components.steps import embed_step

    cfg = store.config
    return [embed_step(weights_path=str(random_vit_t[0]), manifest_path=str(path), model_type="vit_t", shard=k,
                       shards=shards, device="cpu", s3_endpoint=cfg.endpoint, bucket=cfg.bucket, prefix=cfg.prefix,
                       out_index_path=str(out_dir / f"index-{k}.json")) for k in range(shards)]


@pytest.fixture(scope="module")
def embedded(dataset, random_vit_t, tmp_path_factory):
    """The embed step in 3 shards on the fresh dataset: (each shard's metadata, each shard's index keys)."""
    out = tmp_path_factory.mktemp("shards")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAM_DATA_CACHE", str(out / "data-cache"))
        first = _embed_all(*dataset, random_vit_t, 3, out)
    return first, [json.loads((out / f"index-{k}.json").read_text())["keys"] for k in range(3)]


def test_embed_shards_split_the_images_and_skip_what_the_store_has(tmp_path, dataset, embedded, random_vit_t,
                                                                   store_env, monkeypatch):
    store, manifest, path = dataset
    distinct = {it["image"]["sha256"] for it in manifest["items"]}
    first, keys = embedded
    assert sum(len(k) for k in keys) == len(set().union(*map(set, keys))) == len(distinct)  # disjoint, complete
    assert sum(m["computed"] for m in first) == len(distinct) and all(m["from_store"] == 0 for m in first)
    assert all(store.exists(k) for ks in keys for k in ks)
    assert {m["weights_sha256"] for m in first} == {random_vit_t[1]}
    # A shard with nothing to compute never builds the model.
    monkeypatch.setattr("components.sam.model.build_sam", lambda *a, **k: pytest.fail("built the model"))
    again = _embed_all(store, manifest, path, random_vit_t, 3, tmp_path)
    assert [m["computed"] for m in again] == [0, 0, 0]
    assert sum(m["from_store"] for m in again) == len(distinct)
    # Metadata a KFP 2.17 launcher can store (the local end-to-end run checks the real executor output too).
    from components.steps import artifact_metadata
    from kfp_launcher_rules import check_executor_output

    for m in first:
        out = {"artifacts": {"index": {"artifacts": [{"metadata": artifact_metadata(m)}]}}}
        assert check_executor_output("embed", json.dumps(out)) == []
        assert artifact_metadata(m) == m  # nothing had to be dropped


def test_a_damaged_image_in_the_store_fails_training_in_one_line(tmp_path, dataset, embedded, random_vit_t,
                                                                 store_env):
    """A worker's user-facing error comes back as itself: one line naming the object, no worker traceback."""
    from components.datasets.reader import SplitRefs
    from components.storage import StorageError

    store, manifest, path = dataset
    train_split = SplitRefs(store, manifest, "train", annotated_only=True)
    key = train_split.items[0]["image"]["key"]
    original = store.get_bytes(key)
    store.put_bytes(key, b"not the image the manifest names")
    try:
        cfg = TrainConfig(device="cpu", n_iterations=1, batch_size=len(train_split), show_progress=False,
                          checkpoint_dir=str(tmp_path / "ck"))
        with pytest.raises(StorageError) as err:
            train(cfg, random_vit_t[0], train_split, SplitRefs(store, manifest, "val", annotated_only=True),
                  store=store, weights_sha256=random_vit_t[1])
    finally:  # the module's other tests read this dataset
        store.put_bytes(key, original)
    assert "\n" not in str(err.value) and key in str(err.value)


def _in_memory(split):
    from components.datasets.reader import SampleSplit

    return SampleSplit([split.load(i) for i in range(len(split))], split.split)


def test_training_from_the_store_matches_in_memory_samples(tmp_path, dataset, embedded, random_vit_t, store_env):
    """The same loader over a split read from the store (resuming is the loader's sampler state:
    test_worker_loaded_batches_follow_the_sampler_and_resume_from_its_state, and byte for byte in
    tests/test_finetune.py)."""
    from components.datasets.reader import SplitRefs

    store, manifest, path = dataset
    base = dict(device="cpu", n_iterations=2, n_objects_per_batch=3, batch_size=2, val_every=1, lr=1e-4,
                show_progress=False)
    kw = dict(store=store, weights_sha256=random_vit_t[1], dataset_hash=manifest["content_hash"])
    in_memory = train(TrainConfig(**base, checkpoint_dir=str(tmp_path / "mem")), random_vit_t[0],
                      _in_memory(SplitRefs(store, manifest, "train", annotated_only=True)),
                      _in_memory(SplitRefs(store, manifest, "val", annotated_only=True)), **kw)

    streamed = train(TrainConfig(**base, checkpoint_dir=str(tmp_path / "streamed")), random_vit_t[0],
                     SplitRefs(store, manifest, "train", annotated_only=True),
                     SplitRefs(store, manifest, "val", annotated_only=True), **kw)
    assert streamed.embedding_stats["computed"] == 0  # every embedding came from the embed shards
    assert streamed.history["loss"] == pytest.approx(in_memory.history["loss"], rel=1e-6)
    assert streamed.history["val_dice"] == pytest.approx(in_memory.history["val_dice"], abs=1e-7)


def test_evaluation_from_the_store_matches_in_memory_and_keeps_its_overlays(tmp_path, dataset, embedded,
                                                                          random_vit_t, store_env):
    """A split larger than the report's overlay count (the module's five training images), scored from the store
    a few items ahead on the embeddings the shards stored, as it scores the same samples held in memory."""
    from components.datasets.reader import SplitRefs
    from components.evaluate import OVERLAY_IMAGES, evaluate

    store, manifest, _ = dataset
    split = SplitRefs(store, manifest, "train", annotated_only=True)
    assert len(split) > OVERLAY_IMAGES
    weights, sha = random_vit_t
    kw = dict(margin=0.0, device="cpu", store=store, zero_shot_sha256=sha)
    streamed = evaluate("vit_t", weights, weights, split, report_path=tmp_path / "s.html", **kw)
    in_memory = evaluate("vit_t", weights, weights, _in_memory(split), report_path=tmp_path / "m.html", **kw)
    streamed.pop("seconds"), in_memory.pop("seconds")
    assert streamed == in_memory and streamed["test_images"] == len(split)
    overlays = (tmp_path / "s.html").read_text().count("data:image/png;base64,")
    assert overlays == (tmp_path / "m.html").read_text().count("data:image/png;base64,") == OVERLAY_IMAGES * 4


def test_shard_counts_are_checked():
    from components.datasets.reader import shard_images
    from components.errors import UserError
    from components.steps import shard_indices

    assert shard_indices(3) == [0, 1, 2]
    with pytest.raises(UserError, match="embed_shards must be between 1 and 64"):
        shard_indices(0)
    manifest = {"items": [{"image": {"sha256": s, "key": s}} for s in "cab"]}
    assert [r["sha256"] for r in shard_images(manifest, 0, 2)] == ["a", "c"]
    assert [r["sha256"] for r in shard_images(manifest, 1, 2)] == ["b"]
    with pytest.raises(ValueError, match="shard 2 of 2"):
        shard_images(manifest, 2, 2)
