"""Training on CPU with synthetic data and a randomly initialised vit_t: it learns, resumes exactly,
exports a model the official builder loads, caches embeddings in the object store."""
from __future__ import annotations

import shutil
import uuid
from dataclasses import replace

import numpy as np
import pytest
import torch
from official_decode import decode

from components.datasets.reader import SampleSplit
from components.datasets.synthetic import make_samples
from components.training.config import TrainConfig, resolve_amp
from components.training.loop import train
from components.training.trainer import Trainer, prepare_items
from components.sam.embeddings import EmbeddingCache, compute_embeddings, decode_bytes
from components.sam.model import build_sam, load_trainable_state_dict

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="session")
def samples():
    return make_samples(8, seed=1, size=(128, 160), max_instances=3)


@pytest.fixture(scope="session")
def emb_store(s3, random_vit_t, samples):
    """An object store whose embedding cache is warm for `samples`: the encoder (~1.5 s/image on
    two cores) runs once per session and every train() below reads the cache, as a pipeline re-run does."""
    from components.storage import ObjectStore

    store = ObjectStore(replace(s3, prefix=f"t-finetune-{uuid.uuid4().hex[:8]}/"))
    model = build_sam("vit_t", random_vit_t[0])
    cache = EmbeddingCache(model, random_vit_t[1], store, batch_size=2)
    cache.ensure([s.image_sha256 for s in samples], lambda i: samples[i].image)
    assert cache.stats["computed"] == len(samples)
    return store


def _splits(samples, val_images: int = 1):
    """The in-memory train (6 images) and val splits the runs below train on: one val image where what is
    tested does not depend on the score (each validation decodes every val instance)."""
    return SampleSplit(samples[:6], "train"), SampleSplit(samples[6:6 + val_images], "val")


def cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(device="cpu", n_iterations=4, n_objects_per_batch=3, batch_size=2, val_every=2, lr=1e-4,
                checkpoint_dir=str(tmp_path / "ck"), show_progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_embedding_cache_round_trips_through_the_store(emb_store, random_vit_t, samples):
    model = build_sam("vit_t", random_vit_t[0])
    cache = EmbeddingCache(model, random_vit_t[1], emb_store)
    shas = [s.image_sha256 for s in samples[:2] + samples[:1]]
    assert cache.ensure(shas, lambda i: pytest.fail("nothing to compute")) == {"store": 2, "computed": 0}
    got = cache.from_store(shas[0])
    key = cache.key(shas[0])
    raw = emb_store.get_bytes(key)
    assert len(raw) < 256 * 64 * 64 * 2 + 4096  # stored as fp16
    torch.testing.assert_close(decode_bytes(raw), got)
    # Fresh computation equals what the store returns (both rounded through fp16).
    fresh = compute_embeddings(model, [samples[0].image], batch_size=1)[0]
    torch.testing.assert_close(fresh, got, atol=1e-3, rtol=0)
    # A damaged object is recomputed, never used.
    emb_store.put_bytes(key, b"not a tensor")
    again = EmbeddingCache(model, random_vit_t[1], emb_store)
    torch.testing.assert_close(again.stored_or_computed(shas[0], lambda: samples[0].image, "s0"), got,
                               atol=1e-3, rtol=0)
    assert again.stats["computed"] == 1
    torch.testing.assert_close(decode_bytes(emb_store.get_bytes(key)), got, atol=1e-3, rtol=0)


def test_decode_matches_the_official_predictor(random_vit_t, samples):
    from mobile_sam import SamPredictor

    model = build_sam("vit_t", random_vit_t[0])
    s = samples[0]
    predictor = SamPredictor(model)
    predictor.set_image(s.image)
    box = np.array([10.0, 12.0, 90.0, 70.0])
    masks, iou, low = predictor.predict(box=box, multimask_output=False, return_logits=True)
    d = decode(model, predictor.features, s.image.shape[:2], boxes=box[None])
    torch.testing.assert_close(d.low_res_logits[0].detach(), torch.as_tensor(low), atol=1e-4, rtol=1e-4)
    assert (d.masks[0, 0].numpy() == (masks[0] > 0)).mean() > 0.999
    torch.testing.assert_close(d.iou_pred[0].detach(), torch.as_tensor(iou), atol=1e-4, rtol=1e-4)


def test_it_learns(tmp_path, random_vit_t, samples, emb_store, capsys):
    """A short run lifts per-instance validation Dice by >= 0.15 over the untrained decoder."""
    # Box prompts: with a random encoder the decoder can still learn "fill the box" from the box
    # embedding and the positional encoding. One round per iteration (corrective rounds: test_training_step.py).
    # Measured on 2 shared cores: 0.110 -> 0.284, 0.306 in 7 s of training; seeds 1-3 reach 0.282, 0.265, 0.291.
    c = cfg(tmp_path, n_iterations=20, val_every=10, n_objects_per_batch=4, batch_size=1, n_sub_iteration=1,
            lr=1e-3, prompt_mode="box")
    result = train(c, random_vit_t[0], *_splits(samples, val_images=2), store=emb_store,
                   weights_sha256=random_vit_t[1])
    dice = result.history["val_dice"]
    with capsys.disabled():
        print(f"\nval Dice by validation: {[round(x, 3) for x in dice]}, {result.train_seconds:.0f}s of training")
    assert result.history["val_iteration"] == [0, 10, 20]
    assert result.best_val_dice >= dice[0] + 0.15, dice
    assert result.embedding_stats["computed"] == 0 and result.embedding_stats["store"] == len(samples)
    out = capsys.readouterr().out
    assert "Epoch 0: Dice Score = " in out and "(best: " in out
    assert (result.best_path.exists() and result.latest_path.exists() and result.model_path.exists())


STRAIGHT_RUN_ID = f"run-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory, random_vit_t, samples, emb_store):
    """One uninterrupted 4-iteration run (validations at 0, 2, 4) that every resume test below compares with,
    trained once per module."""
    tmp = tmp_path_factory.mktemp("straight")
    return train(cfg(tmp, n_iterations=4), random_vit_t[0], *_splits(samples), store=emb_store,
                 run_id=STRAIGHT_RUN_ID, weights_sha256=random_vit_t[1])


def test_neither_another_run_nor_another_config_is_resumed(tmp_path, straight, random_vit_t, samples, emb_store):
    """A second local `sam-pipeline run` (or tonight's scheduled run) in the same folder trains, it does not
    resume the last one (here the module's uninterrupted run, in this folder; its other iteration count alone
    would not stop a resume); nor does the same run with other settings."""
    shutil.copytree(straight.latest_path.parent, tmp_path / "ck" / straight.latest_path.parent.name)
    second = train(cfg(tmp_path, n_iterations=1), random_vit_t[0], *_splits(samples), store=emb_store,
                   run_id="run-b", weights_sha256=random_vit_t[1])
    assert second.resumed_from is None and second.history["iteration"] == [1]
    other = train(cfg(tmp_path, n_iterations=1, lr=2e-4), random_vit_t[0], *_splits(samples), store=emb_store,
                  run_id="run-b", weights_sha256=random_vit_t[1])
    assert other.resumed_from is None
    ckpt = torch.load(other.latest_path, map_location="cpu", weights_only=True)
    assert ckpt["config"]["lr"] == 2e-4 and ckpt["weights_sha256"] == random_vit_t[1]
    assert {"optimizer", "scheduler", "scaler", "rng", "iteration", "best_val_dice", "dataset_hash"} <= ckpt.keys()


def test_exported_model_loads_in_the_official_builder(straight, random_vit_t, samples, emb_store):
    from mobile_sam import sam_model_registry

    official = sam_model_registry["vit_t"](checkpoint=str(straight.model_path))
    ours = build_sam("vit_t", random_vit_t[0])
    best = torch.load(straight.best_path, map_location="cpu", weights_only=True)
    load_trainable_state_dict(ours, best["trainable_state"])
    emb = EmbeddingCache(ours, random_vit_t[1], emb_store).from_store(samples[6].image_sha256)
    boxes = np.array([[5.0, 5.0, 80.0, 60.0], [40.0, 30.0, 150.0, 120.0]])
    with torch.no_grad():
        a = decode(official, emb, samples[6].image.shape[:2], boxes=boxes)
        b = decode(ours, emb, samples[6].image.shape[:2], boxes=boxes)
    torch.testing.assert_close(a.low_res_logits, b.low_res_logits)
    assert torch.equal(a.masks, b.masks)
    # The exported decoder is the trained one, not the starting point.
    start = build_sam("vit_t", random_vit_t[0])
    with torch.no_grad():
        c = decode(start, emb, samples[6].image.shape[:2], boxes=boxes)
    assert not torch.allclose(a.low_res_logits, c.low_res_logits)


def test_bf16_autocast_trains_on_cpu(tmp_path, random_vit_t, samples, emb_store):
    result = train(cfg(tmp_path, n_iterations=1, amp=True, amp_dtype="bf16", n_sub_iteration=3), random_vit_t[0],
                   *_splits(samples), store=emb_store, weights_sha256=random_vit_t[1])
    assert result.amp == "bf16"
    assert all(np.isfinite(result.history["loss"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback; this machine has CUDA")
def test_cuda_request_falls_back_to_cpu_with_a_warning(tmp_path, random_vit_t, samples, emb_store):
    with pytest.warns(UserWarning, match="CUDA is not available"):
        result = train(cfg(tmp_path, n_iterations=1, device="cuda", debug_with_one_example=True), random_vit_t[0],
                       SampleSplit(samples[:6]), SampleSplit([], "val"), store=emb_store,
                       weights_sha256=random_vit_t[1])
    # The CPU's own precision (fp32), not CUDA's fp16 carried over.
    assert result.device == "cpu" and result.amp == "off"
    assert result.history["val_iteration"] == [0, 1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; none on this machine")
@pytest.mark.parametrize("amp_dtype", ["fp16", "bf16"])
def test_cuda_amp_paths_train(tmp_path, random_vit_t, samples, emb_store, amp_dtype):
    result = train(cfg(tmp_path, n_iterations=4, device="cuda", amp=True, amp_dtype=amp_dtype), random_vit_t[0],
                   *_splits(samples), store=emb_store, weights_sha256=random_vit_t[1])
    assert result.device.startswith("cuda")
    assert result.amp.startswith(amp_dtype if torch.cuda.is_bf16_supported() else "fp16")
    assert all(np.isfinite(result.history["loss"]))


def test_nonfinite_losses_skip_steps_then_stop(random_vit_t, samples):
    model = build_sam("vit_t", random_vit_t[0])
    nan = torch.full((256, 64, 64), float("nan"))
    items = prepare_items(samples[:2], [nan, nan])
    c = TrainConfig(device="cpu", n_objects_per_batch=2, n_sub_iteration=1)  # one round per step is enough
    trainer = Trainer(c, model, items, items, torch.device("cpu"), resolve_amp(c, torch.device("cpu")))
    before = {k: v.clone() for k, v in model.mask_decoder.state_dict().items()}
    for i in range(4):
        assert np.isnan(trainer.train_step(i + 1))
    for k, v in model.mask_decoder.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(FloatingPointError, match="5 non-finite losses in a row"):
        trainer.train_step(5)


def test_bad_config_and_inputs_are_clear_errors(tmp_path, random_vit_t, samples):
    with pytest.raises(ValueError, match="n_sub_iteration must be >= 1"):
        train(cfg(tmp_path, n_sub_iteration=0), random_vit_t[0], *_splits(samples), store=None)
    with pytest.raises(ValueError, match="no validation samples"):
        train(cfg(tmp_path), random_vit_t[0], SampleSplit(samples[:1]), SampleSplit([], "val"), store=None)
    bad = tmp_path / "bad.pt"
    torch.save({"something": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="does not fit SAM vit_t"):
        build_sam("vit_t", bad)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_sam("vit_t", tmp_path / "missing.pt")


def test_finetune_step_from_a_manifest_and_its_retry(tmp_path, random_vit_t, s3_env, store, monkeypatch):
    """The KFP body end to end on the object store: ingest a tiny dataset, fine-tune, then a retry on
    a fresh pod (empty working dir) resumes from runs/<run_id>/ and never runs the encoder."""
    import json

    from components.datasets import synthetic
    from components.datasets.ingest import ingest
    from components.steps import finetune_step

    monkeypatch.setenv("SAM_DATA_CACHE", str(tmp_path / "data-cache"))
    root = synthetic.make_pennfudan(tmp_path / "src", 2, 2, seed=0, size_range=(96, 140))
    result = ingest(str(root), "auto", "tiny", store, seed=0)
    manifest_path = tmp_path / "manifest.json"
    manifest_path.write_text(json.dumps(result.manifest))
    cfg = store.config
    kw = dict(weights_path=str(random_vit_t[0]), manifest_path=str(manifest_path), debug_with_one_example=True,
              model_type="vit_t", n_objects_per_batch=4, device="cpu", n_iterations=1, val_every=1,
              run_id="run-a", s3_endpoint=cfg.endpoint, bucket=cfg.bucket, prefix=cfg.prefix)
    m1 = finetune_step(**kw, out_model_path=str(tmp_path / "out1" / "model.pt"),
                       out_report_path=str(tmp_path / "out1" / "report.html"),
                       checkpoint_dir=str(tmp_path / "pod1"))
    assert m1["resumed_from"] is None and m1["embeddings_computed"] == 1
    assert m1["dataset_content_hash"] == result.content_hash and m1["weights_sha256"] == random_vit_t[1]
    assert 0.0 <= m1["best_val_dice"] <= 1.0 and m1["device"] == "cpu"
    assert "Validation Dice" in (tmp_path / "out1" / "report.html").read_text()
    assert store.list(store.key("embeddings", random_vit_t[1]))
    json.dumps(m1)  # JSON-serialisable metadata for the artifact

    m2 = finetune_step(**kw, out_model_path=str(tmp_path / "out2" / "model.pt"),
                       out_report_path=str(tmp_path / "out2" / "report.html"),
                       checkpoint_dir=str(tmp_path / "pod2"))
    assert m2["resumed_from"] == 1 and m2["embeddings_computed"] == 0 and m2["embeddings_from_store"] == 1
    assert m2["model_sha256"] == m1["model_sha256"]


@pytest.mark.parametrize("name", ["../../x", "a/b", "/abs", "..", ".", ""])
def test_checkpoint_name_is_one_folder_name(tmp_path, name):
    """`-p checkpoint_name=../../x` must not write outside checkpoint_dir: a one-line UserError in the
    component, before any data is read."""
    from components.errors import UserError
    from components.steps import finetune_step

    with pytest.raises(UserError, match="checkpoint_name must be one folder name"):
        finetune_step("never-read.pt", "never-read.json", checkpoint_name=name, device="cpu",
                      checkpoint_dir=str(tmp_path / "ck"))
    assert not (tmp_path / "ck").exists()
    TrainConfig(checkpoint_name="sam_instance_seg.v2-1").validate()


class _Killed(Exception):
    pass


def test_a_run_stopped_between_validations_resumes_byte_identical_on_another_pod(straight, random_vit_t, samples,
                                                                                 emb_store, monkeypatch):
    """Stopped at iteration 3 (validations at 0, 2, 4), the run's KFP retry lands on a fresh pod (no local
    files): it fetches both checkpoints from runs/<run_id>/ in the store, resumes from 2 and ends with best.pt,
    latest.pt and the exported model byte for byte those of the module's run that was never stopped."""
    import shutil

    from components.training import trainer as trainer_module

    paths = [straight.best_path, straight.latest_path, straight.model_path]
    expected = {p: p.read_bytes() for p in paths}
    folder = straight.latest_path.parents[1]  # <tmp>/ck: same folder and run id (both are in the checkpoint)
    assert folder.name == "ck"
    c = cfg(folder.parent, n_iterations=4)
    try:
        # Nothing left of the uninterrupted run, locally or in the store.
        shutil.rmtree(folder)
        for key in emb_store.list(emb_store.key("runs", STRAIGHT_RUN_ID)):
            emb_store.delete(key)
        step = trainer_module.Trainer.train_step

        def killed_at_3(self, iteration, *a, **kw):
            if iteration == 3:
                raise _Killed
            return step(self, iteration, *a, **kw)

        monkeypatch.setattr(trainer_module.Trainer, "train_step", killed_at_3)
        with pytest.raises(_Killed):
            train(c, random_vit_t[0], *_splits(samples), store=emb_store, run_id=STRAIGHT_RUN_ID,
                  weights_sha256=random_vit_t[1])
        monkeypatch.undo()
        shutil.rmtree(folder)  # the fresh pod: the same checkpoint_dir, empty
        for name in ("best.pt", "latest.pt"):
            assert emb_store.exists(emb_store.key("runs", STRAIGHT_RUN_ID, "checkpoints", name))
        resumed = train(c, random_vit_t[0], *_splits(samples), store=emb_store, run_id=STRAIGHT_RUN_ID,
                        weights_sha256=random_vit_t[1])
        assert resumed.resumed_from == 2
        got = {p: p.read_bytes() for p in (resumed.best_path, resumed.latest_path, resumed.model_path)}
        assert list(got) == paths
        for p, data in expected.items():
            assert got[p] == data, p.name
    finally:  # the other tests of the module read the uninterrupted run's files
        for p, data in expected.items():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
