"""Nightly retraining that does nothing when nothing changed (components/changes.py, the check-changes step),
and the one-image overlap guard: the decision against a real registry in the real S3 server. The whole pipeline
meeting its own registry this way runs in tests/test_pipeline_local.py."""
from __future__ import annotations

import json


from components.card import build_card
from components.changes import decide
from components.changes import trained_on as _trained_on
from components.datasets.split import LEGACY_RULE, SPLIT_RULE
from components.registry import ObjectStoreRegistry

SETTINGS = {"debug_with_one_example": True, "checkpoint_name": "a", "model_type": "vit_t", "batch_size": 1,
            "n_objects_per_batch": 4, "device": "cpu", "n_iterations": 3, "n_sub_iteration": 2, "lr": 1e-5,
            "seed": 0, "val_every": 3}


def trained_on(content_hash: str, weights: str, settings: dict, rule: str = SPLIT_RULE) -> dict:
    return _trained_on(content_hash, weights, settings, rule)


def _register(store, tmp_path, settings: dict, *, content_hash="d" * 64, weights="w" * 64) -> str:
    """A version registered the way register-model does it: the card built from finetune's metadata
    (as read back from ML Metadata: ints as floats, bools as 0/1)."""
    model = tmp_path / "model.pt"
    model.write_bytes(b"model bytes")
    from_mlmd = {k: (float(v) if isinstance(v, int) and not isinstance(v, bool) else
                     int(v) if isinstance(v, bool) else v) for k, v in settings.items()}
    card = build_card({"finetuned_box_dice": 0.5, "zero_shot_box_dice": 0.4}, run_id="r1",
                      model_metadata={"config": from_mlmd, "dataset_content_hash": content_hash,
                                      "weights_sha256": weights, "model_type": "vit_t"},
                      dataset_metadata={"content_hash": content_hash, "split_rule": SPLIT_RULE},
                      weights_metadata={"sha256": weights})
    return ObjectStoreRegistry(store).register("m", model, card).version


def test_unchanged_inputs_skip_and_any_change_that_shapes_the_model_trains(store, tmp_path):
    reg = ObjectStoreRegistry(store)
    first = decide(reg, "m", trained_on("d" * 64, "w" * 64, SETTINGS))
    assert first.changed and first.reason == "no registered version of m yet"

    _register(store, tmp_path, SETTINGS)
    assert "trained_on" in reg.card("m", "v1")
    same = decide(reg, "m", trained_on("d" * 64, "w" * 64, SETTINGS))
    assert not same.changed and same.reason == "nothing changed since m v1"
    # Where and under which name it trains does not change the model.
    moved = decide(reg, "m", trained_on("d" * 64, "w" * 64, {**SETTINGS, "device": "cuda", "checkpoint_name": "b"}))
    assert not moved.changed

    for now, expected in ((trained_on("e" * 64, "w" * 64, SETTINGS), "dataset content hash dddddddddddd -> eeee"),
                          (trained_on("d" * 64, "x" * 64, SETTINGS), "weights sha256 wwwwwwwwwwww -> xxxx"),
                          (trained_on("d" * 64, "w" * 64, {**SETTINGS, "n_iterations": 4}), "n_iterations 3 -> 4"),
                          (trained_on("d" * 64, "w" * 64, {**SETTINGS, "lr": 2e-5}), "lr 1e-05 -> 2e-05"),
                          # A dataset version made under another split rule says so.
                          (trained_on("d" * 64, "w" * 64, SETTINGS, LEGACY_RULE),
                           f"split rule {SPLIT_RULE} -> {LEGACY_RULE}")):
        decision = decide(reg, "m", now)
        assert decision.changed and decision.reason.startswith("changed since m v1: "), decision.reason
        assert expected in decision.reason

    forced = decide(reg, "m", trained_on("d" * 64, "w" * 64, SETTINGS), force=True)
    assert forced.changed and "force" in forced.reason


def test_a_card_without_the_record_means_train(store, tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"x")
    ObjectStoreRegistry(store).register("m", model, {"run_id": "old"})
    decision = decide(ObjectStoreRegistry(store), "m", trained_on("d" * 64, "w" * 64, SETTINGS))
    assert decision.changed and "does not record" in decision.reason


def test_a_one_image_dataset_records_its_overlapping_splits(store, tmp_path, caplog):
    from components.datasets.ingest import ingest
    from components.datasets.synthetic import make_pennfudan_zip

    one = make_pennfudan_zip(tmp_path / "one.zip", n_fudan=1, n_penn=0, size_range=(48, 64))
    with caplog.at_level("WARNING"):
        result = ingest(str(one), name="one", store=store)
    assert result.to_json()["splits_overlap"] is True and result.manifest["splits_overlap"] is True
    assert "serve more than one of train/val/test" in caplog.text and "allow_overlap" in caplog.text

    eight = make_pennfudan_zip(tmp_path / "eight.zip", n_fudan=4, n_penn=4, size_range=(48, 64))
    assert ingest(str(eight), name="eight", store=store).to_json()["splits_overlap"] is False


def test_run_flags_become_pipeline_parameters():
    from pipelines.cli import build_parser
    from pipelines.run_args import run_params

    plain = run_params(build_parser().parse_args(["run"]))
    assert (plain["verify_data"], plain["force_retrain"], plain["allow_overlap"]) == (False, False, False)
    flags = run_params(build_parser().parse_args(["run", "--verify-data", "--force", "--allow-overlap"]))
    assert (flags["verify_data"], flags["force_retrain"], flags["allow_overlap"]) == (True, True, True)


def test_ingest_step_with_verify_repairs_a_damaged_object(store, s3_env, tmp_path):
    """The ingest step's `verify` (pipeline parameter verify_data) reaches ingest(verify=True)."""
    from components.datasets.synthetic import make_pennfudan_zip
    from components.steps import ingest_step

    src = make_pennfudan_zip(tmp_path / "d.zip", n_fudan=2, n_penn=2, size_range=(48, 64))
    cfg = store.config
    common = dict(source=str(src), dataset_format="auto", dataset_name="d", split_seed=0, s3_endpoint=cfg.endpoint,
                  bucket=cfg.bucket, prefix=cfg.prefix, out_manifest_path=str(tmp_path / "m.json"))
    first = ingest_step(**common)
    manifest = json.loads((tmp_path / "m.json").read_text())
    key = manifest["items"][0]["image"]["key"]
    store.put_bytes(key, b"garbage")
    assert ingest_step(**common)["uploaded"] == 0  # trusted without verify: the damage stays
    repaired = ingest_step(**common, verify=True)
    assert repaired["verified"] == 2 * first["images"] and repaired["uploaded"] == 1
    assert store.get_bytes(key) != b"garbage"
