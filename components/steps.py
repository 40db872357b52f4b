"""The pipeline steps' glue: object store from the step's parameters, artifacts in and out.

One function per KFP component (`components.kfp_components` wraps each in a few lines); the domain
modules (weights, datasets.ingest, training, evaluate, registry) know nothing of artifacts.
"""
from __future__ import annotations

import shutil
from pathlib import Path


def connect(endpoint: str, bucket: str, prefix: str):
    """The object store a step was pointed at (credentials from the environment)."""
    from components.storage import ObjectStore, S3Config

    return ObjectStore(S3Config.from_env(endpoint=endpoint, bucket=bucket, prefix=prefix))


def write_finetune_report(path: str | Path, metrics: dict, history: dict) -> Path:
    """The finetune step's page: the run's metrics and its loss / validation Dice curves."""
    from components.report import Report

    return Report("SAM fine-tuning").kv(metrics).history(history).write(path)


def finetune_step(weights_path: str, manifest_path: str, debug_with_one_example: bool = False,
                  checkpoint_name: str = "sam_instance_seg", model_type: str = "vit_t", batch_size: int = 1,
                  n_objects_per_batch: int = 25, device: str = "cuda", n_iterations: int = 200,
                  n_sub_iteration: int = 2, lr: float = 1e-5, seed: int = 0, val_every: int = 10,
                  run_id: str = "", s3_endpoint: str = "", bucket: str = "", prefix: str = "",
                  out_model_path: str = "model.pt", out_report_path: str = "report.html",
                  checkpoint_dir: str = "checkpoints") -> dict:
    """Read the dataset version named by the manifest, train, write the model (plain state dict) and an
    HTML report, and return the run's metrics."""
    from components.datasets.reader import load_manifest, load_split
    from components.hashing import sha256_file
    from components.training import TrainConfig, train

    store = connect(s3_endpoint, bucket, prefix)
    manifest = load_manifest(store, manifest_path)
    train_samples = load_split(store, manifest, "train")
    val_samples = [] if debug_with_one_example else load_split(store, manifest, "val")
    cfg = TrainConfig(debug_with_one_example=bool(debug_with_one_example), checkpoint_name=checkpoint_name,
                      model_type=model_type, batch_size=int(batch_size), n_objects_per_batch=int(n_objects_per_batch),
                      device=device, n_iterations=int(n_iterations), n_sub_iteration=int(n_sub_iteration),
                      lr=float(lr), seed=int(seed), val_every=int(val_every), checkpoint_dir=checkpoint_dir)
    weights_sha = sha256_file(weights_path)
    result = train(cfg, weights_path, train_samples, val_samples, store=store, run_id=run_id or None,
                   dataset_hash=manifest["content_hash"], weights_sha256=weights_sha)
    out_model = Path(out_model_path)
    out_model.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.model_path, out_model)
    val_dice = result.history["val_dice"]
    metrics = {
        "best_val_dice": round(result.best_val_dice, 6),
        "initial_val_dice": round(val_dice[0], 6) if val_dice and result.resumed_from is None else None,
        "best_iteration": result.best_iteration,
        "iterations": result.iterations,
        "resumed_from": result.resumed_from,
        "final_loss": next((x for x in reversed(result.history["loss"]) if x == x), None),
        "train_images": 1 if debug_with_one_example else len(train_samples),
        "val_images": 1 if debug_with_one_example else len(val_samples),
        "model_type": model_type,
        "device": result.device,
        "amp": result.amp,
        "iterations_per_second": result.embedding_stats.get("it_per_s"),
        "embeddings_computed": result.embedding_stats.get("computed"),
        "embeddings_from_store": result.embedding_stats.get("store"),
        "seconds": round(result.seconds, 1),
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
    return metrics
