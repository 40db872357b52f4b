"""The pipeline steps' glue: the object store from a step's parameters, files and metadata in and out.

One function per KFP component (`components.kfp_components` wraps each in a few lines); the domain
modules (weights, datasets.ingest, training, evaluate, registry) know nothing of artifacts.

Artifact metadata goes through `artifact_metadata()` on the way out and `read_metadata()` on the way in,
because a real KFP 2.17 backend is stricter than kfp.local: its launcher stores each top-level metadata
value as an ML Metadata custom property (`StructValueToMLMDValue` in kubeflow/pipelines
backend/src/v2/metadata/converter.go) and fails the task on a null; what comes back downstream
(`toRuntimeArtifact`, same file) has booleans and integers as numbers and dicts wrapped as {"struct": ...}.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import tempfile
from pathlib import Path

from components.datasets.split import overlap_warning
from components.errors import UserError, first_line

log = logging.getLogger(__name__)


class EmbedShardsError(UserError):
    """embed_shards is not a positive count."""


def connect(endpoint: str, bucket: str, prefix: str):
    """The object store a step was pointed at (credentials from the environment)."""
    from components.storage import ObjectStore, S3Config

    return ObjectStore(S3Config.from_env(endpoint=endpoint, bucket=bucket, prefix=prefix))


# -- metadata out and back ---------------------------------------------------------------------------

def _storable(value):
    """`value` without what JSON or ML Metadata cannot hold (None, NaN, infinities), or None if nothing is left."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    if isinstance(value, dict):
        return {str(k): v for k, v in ((k, _storable(v)) for k, v in value.items()) if v is not None}
    if isinstance(value, (list, tuple)):
        return [v for v in (_storable(v) for v in value) if v is not None]
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # a Path or similar: its text is what a reader wants


def artifact_metadata(result: dict) -> dict:
    """A step's result as artifact metadata the KFP 2.17 launcher can record: a missing value is left out,
    never written as null (the launcher has no case for null: `// TODO: support null`)."""
    return _storable(result)


def read_metadata(meta: dict | None) -> dict:
    """Artifact metadata as a step wrote it, whether it comes straight from the producer (kfp.local) or
    back from ML Metadata, which wraps dicts as {"struct": ...} and lists as {"list": ...}."""
    def unwrap(v):
        if isinstance(v, dict):
            if len(v) == 1 and ("struct" in v or "list" in v):
                return unwrap(next(iter(v.values())))
            return {k: unwrap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [unwrap(x) for x in v]
        return v

    return {k: unwrap(v) for k, v in (meta or {}).items() if k != "display_name"}


def publish(result: dict, artifact=None, metrics=None) -> None:
    """Put a step's result on its output artifact, and its numbers on the Metrics artifact so they show
    in the KFP UI."""
    meta = artifact_metadata(result)
    if artifact is not None:
        artifact.metadata.update(meta)
    if metrics is not None:
        for key, value in sorted(meta.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics.log_metric(key, float(value))


def _copy_out(src: str | Path, dest: str | Path) -> Path:
    out = Path(dest)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out)
    return out


# -- the steps --------------------------------------------------------------------------------------

def fetch_step(model_type: str, url: str, sha256: str, s3_endpoint: str, bucket: str, prefix: str,
               out_path: str) -> dict:
    """Fetch (or find) the checkpoint and copy it to the output artifact."""
    from components.weights import fetch_weights

    result = fetch_weights(model_type, url or None, sha256 or None, store=connect(s3_endpoint, bucket, prefix))
    _copy_out(result.path, out_path)
    return {"model_type": model_type, "sha256": result.sha256, "source_url": result.source_url,
            "bytes": result.bytes, "object_uri": result.object_uri}


def ingest_step(source: str, dataset_format: str, dataset_name: str, split_seed: int, s3_endpoint: str,
                bucket: str, prefix: str, out_manifest_path: str, verify: bool = False, categories: str = "") -> dict:
    """Ingest (`verify`: re-hash every stored object and repair what is wrong; `categories`: COCO categories to
    keep, comma-separated), write the manifest to the Dataset artifact, return its metadata."""
    from components.datasets.coco import parse_categories
    from components.datasets.ingest import ingest

    result = ingest(source, dataset_format or "auto", dataset_name, connect(s3_endpoint, bucket, prefix),
                    seed=int(split_seed), verify=bool(verify), categories=parse_categories(categories))
    if verify:  # said where a person looks (a local run's console shows these lines), not only in the log
        print(f"sam-pipeline: verify-data: {result.verified} stored objects of {dataset_name} checked against "
              f"their sha256; {result.uploaded} missing or damaged re-uploaded", file=sys.stderr, flush=True)
    out = Path(out_manifest_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result.manifest, indent=2, sort_keys=True))
    meta = {k: v for k, v in result.to_json().items() if k != "splits"}
    for split, counts in result.manifest["totals"]["splits"].items():
        meta[f"{split}_images"] = counts["images"]
        meta[f"{split}_instances"] = counts["instances"]
    return meta


def check_step(manifest_path: str, weights_sha256: str, model_name: str, force_retrain: bool, s3_endpoint: str,
               bucket: str, prefix: str, **settings) -> dict:
    """Whether this run has anything new to train compared with the registered champion (components/changes.py):
    {"changed": bool, "reason": str}."""
    from components.changes import decide, trained_on
    from components.datasets.split import split_rule
    from components.registry import ObjectStoreRegistry

    manifest = json.loads(Path(manifest_path).read_text())
    now = trained_on(manifest["content_hash"], weights_sha256, settings, split_rule(manifest))
    decision = decide(ObjectStoreRegistry(connect(s3_endpoint, bucket, prefix)), model_name, now,
                      force=bool(force_retrain))
    print(("training: " if decision.changed else "skipping training: ") + decision.reason)
    return {"changed": decision.changed, "reason": decision.reason}


# Each shard's index artifact (~0.7 KB with its metadata) travels in finetune's executor input, which the KFP
# 2.17 driver passes as ONE command-line argument; Linux caps one at 128 KiB. 64 shards stay under half of it
# (tests/test_launcher_rules.py builds that run).
MAX_EMBED_SHARDS = 64


def shard_indices(shards: int) -> list[int]:
    """The embed fan-out's items: 0..shards-1."""
    if not 1 <= int(shards) <= MAX_EMBED_SHARDS:
        raise EmbedShardsError(f"embed_shards must be between 1 and {MAX_EMBED_SHARDS} (got {shards}): each shard "
                               "adds to finetune's --executor_input, one argument of at most 128 KiB")
    return list(range(int(shards)))


def embed_step(weights_path: str, manifest_path: str, model_type: str, shard: int, shards: int, device: str,
               s3_endpoint: str, bucket: str, prefix: str, out_index_path: str) -> dict:
    """Compute the frozen encoder's embeddings of one shard of a dataset version's images into the store's
    content-addressed cache (`embeddings/<weights_sha256>/<precision>/<image_sha256>`), skipping those already
    there; write the shard's index (its keys) and return its counts.

    A shard that cannot finish does not raise: in KFP 2.17 a failed iteration of the dsl.ParallelFor fails the
    run (finetune waits for the whole loop, and set_retry is ignored inside one: kubeflow/pipelines#12389), and
    `.ignore_upstream_failure()` is no way out (the 2.17 Argo compiler makes such a task an exit hook, and
    kfp.local still fails the run). The index and the result say `failed` and why; finetune computes what is
    missing. Only a pod that dies (OOM-killed, node lost) still fails the run."""
    try:
        index, result = _embed_shard(weights_path, manifest_path, model_type, int(shard), int(shards), device,
                                     connect(s3_endpoint, bucket, prefix))
    except Exception as e:  # noqa: BLE001 -- whatever stops one shard costs time only (finetune catches up)
        log.exception("embed shard %s of %s failed; finetune computes its embeddings", shard, shards)
        error = f"{type(e).__name__}: {first_line(e)}"
        index = {"format_version": 1, "shard": int(shard), "shards": int(shards), "failed": True, "error": error,
                 "keys": []}
        result = {"shard": int(shard), "shards": int(shards), "failed": True, "error": error}
    out = Path(out_index_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(index, indent=2))
    return result


def _embed_shard(weights_path: str, manifest_path: str, model_type: str, shard: int, shards: int, device: str,
                 store) -> tuple[dict, dict]:
    from components.datasets.reader import load_image_ref, load_manifest, shard_images
    from components.hashing import sha256_file
    from components.sam.device import resolve_device
    from components.sam.embeddings import EmbeddingCache, encoder_batch
    from components.sam.model import build_sam
    from components.training.config import TrainConfig

    manifest = load_manifest(store, manifest_path)
    refs = shard_images(manifest, shard, shards)
    weights_sha = sha256_file(weights_path)
    dev = resolve_device(device)
    # The batch finetune embeds with: the same kernels, so the same (fp16-rounded) embeddings.
    cache = EmbeddingCache(lambda: build_sam(model_type, weights_path, dev), weights_sha, store,
                           batch_size=encoder_batch(dev, TrainConfig().embed_batch_size), amp=dev.type == "cuda",
                           device=dev)
    counts = cache.ensure([r["sha256"] for r in refs], lambda i: load_image_ref(store, manifest, refs[i]))
    index = {"format_version": 1, "weights_sha256": weights_sha, "dataset_content_hash": manifest["content_hash"],
             "shard": shard, "shards": shards, "failed": False, "keys": [cache.key(r["sha256"]) for r in refs]}
    return index, {"shard": shard, "shards": shards, "failed": False, "images": len(refs),
                   "computed": counts["computed"], "from_store": counts["store"],
                   "encode_seconds": round(cache.stats["encode_seconds"], 2), "weights_sha256": weights_sha,
                   "dataset_content_hash": manifest["content_hash"], "device": str(dev),
                   "embeddings_prefix": store.uri(store.key("embeddings", weights_sha)) + "/"}


def failed_embed_shards(index_paths: list[str] | None) -> dict[int, str]:
    """{shard: error} of the embed shards whose index says they failed (an index of an older image, without
    the flag, did not fail: a failing shard then failed its task)."""
    failed = {}
    for path in index_paths or ():
        index = json.loads(Path(path).read_text())
        if index.get("failed"):
            failed[int(index["shard"])] = str(index.get("error", ""))
    return dict(sorted(failed.items()))


def write_finetune_report(path: str | Path, metrics: dict, history: dict) -> Path:
    """The finetune step's page: the run's metrics and its loss / validation Dice curves."""
    from components.report import Report

    return Report("SAM fine-tuning").kv(metrics).history(history).write(path)


def finetune_step(weights_path: str, manifest_path: str, *, run_id: str = "", resume_run_id: str = "",
                  embed_index_paths: list[str] | None = None, s3_endpoint: str = "",
                  bucket: str = "", prefix: str = "", out_model_path: str = "model.pt",
                  out_report_path: str = "report.html", checkpoint_dir: str = "checkpoints", **settings) -> dict:
    """Read the dataset version named by the manifest, train with `settings` (TrainConfig fields), write
    the model (plain state dict) and an HTML report, and return the run's metrics and settings.

    resume_run_id: train as that run (its checkpoints under runs/<id>/ in the store, and the local
    checkpoint's identity, which names the run) instead of this one: how `sam-pipeline run --resume`, or a
    user on a cluster, continues a run that was killed. A checkpoint of another run is never resumed.

    embed_index_paths: the embed shards' indexes; the metrics and the report name the shards that failed and
    count the embeddings this step computed itself (`embeddings_computed`)."""
    from components.datasets.reader import SplitRefs, load_manifest
    from components.hashing import sha256_file
    from components.training.config import TrainConfig
    from components.training.loop import train

    cfg = TrainConfig.from_params(settings, checkpoint_dir=checkpoint_dir)
    cfg.validate()  # before anything is read or written: e.g. checkpoint_name must not leave checkpoint_dir
    run_id = resume_run_id or run_id
    store = connect(s3_endpoint, bucket, prefix)
    manifest = load_manifest(store, manifest_path)
    overlap = overlap_warning(manifest)
    if overlap:
        log.warning("WARNING: %s", overlap)
    failed_shards = failed_embed_shards(embed_index_paths)
    for shard, error in failed_shards.items():
        log.warning("WARNING: embed shard %d failed (%s); computing its embeddings here", shard, error)
    # Read from the store (images, masks and the embed step's embeddings) a few batches ahead, never all in memory.
    train_samples = SplitRefs(store, manifest, "train", annotated_only=True)
    val_samples = SplitRefs(store, manifest, "val", annotated_only=True)
    weights_sha = sha256_file(weights_path)
    result = train(cfg, weights_path, train_samples, val_samples, store=store, run_id=run_id or None,
                   dataset_hash=manifest["content_hash"], weights_sha256=weights_sha)
    out_model = _copy_out(result.model_path, out_model_path)
    val_dice = result.history["val_dice"]
    metrics = {
        "best_val_dice": round(result.best_val_dice, 6),
        # Absent rather than null: a resumed run did not measure the untrained model itself.
        "initial_val_dice": round(val_dice[0], 6) if val_dice and result.resumed_from is None else None,
        "best_iteration": result.best_iteration,
        "iterations": result.iterations,
        "resumed_from": result.resumed_from,
        "final_loss": next((x for x in reversed(result.history["loss"]) if x == x), None),
        "train_images": 1 if cfg.debug_with_one_example else len(train_samples),
        "val_images": 1 if cfg.debug_with_one_example else len(val_samples),
        "model_type": cfg.model_type,
        "device": result.device,
        "amp": result.amp,
        "iterations_per_second": result.embedding_stats.get("it_per_s"),
        "embeddings_computed": result.embedding_stats.get("computed"),
        "embeddings_from_store": result.embedding_stats.get("store"),
        "embed_shards_failed": len(failed_shards),
        "embed_failed_shards": ", ".join(f"{k} ({v})" for k, v in failed_shards.items()) or None,
        "seconds": round(result.seconds, 1),
        # Where the loop's time went besides the iterations (benchmarks/RESULTS.md reads these).
        "validation_seconds": round(result.validation_seconds, 1),
        "checkpoint_seconds": round(result.checkpoint_seconds, 1),
        "weights_sha256": weights_sha,
        "dataset_content_hash": manifest["content_hash"],
        "model_sha256": sha256_file(out_model),
        "run_id": run_id,
    }
    if run_id:
        metrics["checkpoint_uri"] = store.uri(store.key("runs", run_id, "checkpoints", "best.pt"))
        metrics["history_uri"] = store.uri(store.put_json(store.key("runs", run_id, "history.json"),
                                                          result.history).key)
    write_finetune_report(out_report_path, metrics, result.history)
    # The model card records how the model was trained: the run's own settings travel with the model.
    return {**metrics, "config": settings}


def evaluate_step(weights_path: str, model_path: str, manifest_path: str, model_type: str, margin: float,
                  model_name: str, device: str, s3_endpoint: str, bucket: str, prefix: str, out_report_path: str,
                  model_metadata: dict | None = None, allow_overlap: bool = False) -> dict:
    """Load the test split, find the champion, evaluate, write the report. `passed` (the registration gate)
    is also false when the splits overlap, unless `allow_overlap`: this is the one place of that rule."""
    from components.card import champion_training_data
    from components.datasets.reader import SplitRefs, load_manifest
    from components.datasets.split import split_rule
    from components.eval_metrics import verdict_lines
    from components.evaluate import EvaluationError, evaluate, training_history
    from components.hashing import sha256_file
    from components.registry import ObjectStoreRegistry

    if not math.isfinite(float(margin)):
        raise EvaluationError(f"margin must be a finite number (got {margin})")
    store = connect(s3_endpoint, bucket, prefix)
    manifest = load_manifest(store, manifest_path)
    test = SplitRefs(store, manifest, "test", annotated_only=True)  # streamed: any size of test split
    registry = ObjectStoreRegistry(store)
    pointer = registry.latest(model_name) if model_name else None
    history = training_history(read_metadata(model_metadata).get("history_uri"), store)
    overlap = overlap_warning(manifest)
    refused = ()
    if overlap and not allow_overlap:
        refused = (f"{overlap} (allow_overlap / run --allow-overlap registers anyway)",)
    elif overlap:
        log.warning("WARNING: %s; registering anyway (allow_overlap)", overlap)
    champion_data = None
    with tempfile.TemporaryDirectory() as tmp:
        champion, champion_type, seen, note = None, None, frozenset(), ""
        if pointer is not None:
            champion = registry.fetch(model_name, pointer["version"], Path(tmp) / "champion.pt")
            champion_type = registry.card(model_name, pointer["version"]).get("model", {}).get("model_type")
            champion_data = champion_training_data(registry, model_name, pointer["version"])
            seen = None if champion_data is None else frozenset(champion_data["train"]) | set(champion_data["val"])
            note = _rule_note(pointer["version"], champion_data, manifest)
            log.info("champion: %s %s (%s)", model_name, pointer["version"], pointer.get("model_uri"))
        metrics = evaluate(model_type, weights_path, model_path, test, champion_weights=champion,
                           champion_model_type=champion_type, champion_name=pointer["version"] if pointer else "",
                           champion_seen=seen, margin=float(margin), device=device, report_path=out_report_path,
                           history=history, store=store, zero_shot_sha256=sha256_file(weights_path), refused=refused,
                           champion_note=note)
    metrics.update({"dataset_content_hash": manifest.get("content_hash"), "split_rule": split_rule(manifest),
                    "splits_overlap": bool(overlap)})
    if champion_data is not None:
        # Which dataset version the champion was compared through, and whether another rule split it.
        metrics.update({"champion_dataset_content_hash": champion_data.get("content_hash"),
                        "champion_split_rule": champion_data.get("split_rule")})
    for line in verdict_lines(metrics):
        print(line)
    return metrics


def _rule_note(version: str, champion_data: dict | None, manifest: dict) -> str:
    """Said wherever two dataset versions split by different rules are compared (components/datasets/split.py)."""
    from components.datasets.split import split_rule

    if champion_data is None or champion_data.get("split_rule") == split_rule(manifest):
        return ""
    note = (f"champion {version} was trained on dataset version {str(champion_data.get('content_hash'))[:12]}, "
            f"split by rule {champion_data.get('split_rule')}; this one is split by rule {split_rule(manifest)}: "
            "the images it trained and validated on are left out by content, whichever rule placed them")
    log.warning("NOTE: %s", note)
    return note


def register_step(model_path: str, metrics_json: str | dict, model_name: str, model_registry_url: str,
                  run_id: str, s3_endpoint: str, bucket: str, prefix: str, *, version: str = "",
                  model_metadata: dict | None = None, dataset_metadata: dict | None = None,
                  weights_metadata: dict | None = None, manifest_path: str = "") -> dict:
    """Register the fine-tuned model with its card and, from the dataset version's manifest, the images it
    trained and validated on (components/card.py); returns the version, its uris and the Model Registry id."""
    from components.card import TRAINING_DATA_FILE, build_card, parse_metrics_json, training_data
    from components.registry import ObjectStoreRegistry, register_in_model_registry

    metrics = parse_metrics_json(metrics_json)
    model_metadata = read_metadata(model_metadata)
    card = build_card(metrics, run_id=run_id, model_metadata=model_metadata,
                      dataset_metadata=read_metadata(dataset_metadata), weights_metadata=read_metadata(weights_metadata))
    extra = {TRAINING_DATA_FILE: training_data(json.loads(Path(manifest_path).read_text()))} if manifest_path else {}
    registered = ObjectStoreRegistry(connect(s3_endpoint, bucket, prefix)).register(model_name, model_path, card,
                                                                                    version or None, extra=extra)
    result = {"model_name": registered.name, "version": registered.version, "model_uri": registered.model_uri,
              "card_uri": registered.card_uri, "sha256": registered.card["model"]["sha256"]}
    if model_registry_url:
        result.update(register_in_model_registry(
            model_registry_url, registered, format_version=str(model_metadata.get("torch_version") or "2")))
    return result
