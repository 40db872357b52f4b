"""The KFP components (the steps, the check and the embed fan-out): thin wrappers that call one step
function of `components.steps` each.

KFP ships a component's *source* to the container, so each body imports what it needs from `components`
(installed in every image) and runs a single step. `base_image` is fixed at decoration time, which is why
the components are made by `make_components(images)` instead of being decorated at import.
"""
from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output


# -- component bodies (module level: KFP extracts their source) ------------------------------------

def fetch_weights(model_type: str, url: str, sha256: str, s3_endpoint: str, bucket: str, prefix: str,
                  weights: Output[Model]) -> NamedTuple("Outputs", [("sha256", str)]):
    """Download (or reuse from the object store) a verified SAM checkpoint."""
    from components.steps import fetch_step, publish

    result = fetch_step(model_type=model_type, url=url, sha256=sha256, s3_endpoint=s3_endpoint, bucket=bucket,
                        prefix=prefix, out_path=weights.path)
    publish(result, weights)
    # Also a parameter: check-changes compares it without downloading the checkpoint (2.5 GB for vit_h).
    outputs = NamedTuple("Outputs", [("sha256", str)])
    return outputs(result["sha256"])


def ingest_dataset(source: str, dataset_format: str, dataset_name: str, split_seed: int, verify_data: bool,
                   s3_endpoint: str, bucket: str, prefix: str, dataset: Output[Dataset], categories: str = ""):
    """Validate, split and upload a dataset version; the artifact is its manifest. `verify_data` re-hashes every
    object already stored and repairs what is wrong (named like the pipeline parameter, as the others are).
    `categories`: COCO only, comma-separated names to keep (empty: all)."""
    from components.steps import ingest_step, publish

    publish(ingest_step(source=source, dataset_format=dataset_format, dataset_name=dataset_name,
                        split_seed=split_seed, s3_endpoint=s3_endpoint, bucket=bucket, prefix=prefix,
                        out_manifest_path=dataset.path, verify=verify_data, categories=categories), dataset)


def check_changes(dataset: Input[Dataset], weights_sha256: str, model_name: str, force_retrain: bool,
                  debug_with_one_example: bool, model_type: str, batch_size: int, n_objects_per_batch: int,
                  n_iterations: int, n_sub_iteration: int, lr: float, seed: int, val_every: int, s3_endpoint: str,
                  bucket: str, prefix: str) -> NamedTuple("Outputs", [("changed", bool), ("reason", str)]):
    """Whether the dataset, the weights or the training settings differ from the registered champion's;
    finetune, evaluate and register run only when they do (or with force_retrain)."""
    from components.steps import check_step

    result = check_step(
        manifest_path=dataset.path, weights_sha256=weights_sha256, model_name=model_name,
        force_retrain=force_retrain, s3_endpoint=s3_endpoint, bucket=bucket, prefix=prefix,
        debug_with_one_example=debug_with_one_example, model_type=model_type, batch_size=batch_size,
        n_objects_per_batch=n_objects_per_batch, n_iterations=n_iterations, n_sub_iteration=n_sub_iteration,
        lr=lr, seed=seed, val_every=val_every)
    outputs = NamedTuple("Outputs", [("changed", bool), ("reason", str)])
    return outputs(bool(result["changed"]), result["reason"])


def embed_shards(shards: int) -> List[int]:
    """The shard indices 0..shards-1 that the embed fan-out (dsl.ParallelFor) iterates over."""
    from components.steps import shard_indices

    return shard_indices(shards)


def embed(weights: Input[Model], dataset: Input[Dataset], model_type: str, shard: int, shards: int, device: str,
          s3_endpoint: str, bucket: str, prefix: str, index: Output[Artifact]):
    """Embed one shard of the dataset's images with the frozen encoder into the object store's cache."""
    from components.steps import embed_step, publish

    publish(embed_step(weights_path=weights.path, manifest_path=dataset.path, model_type=model_type, shard=shard,
                       shards=shards, device=device, s3_endpoint=s3_endpoint, bucket=bucket, prefix=prefix,
                       out_index_path=index.path), index)


def finetune(weights: Input[Model], dataset: Input[Dataset], embeddings: Input[List[Artifact]],
             debug_with_one_example: bool, checkpoint_name: str,
             model_type: str, batch_size: int, n_objects_per_batch: int, device: str, n_iterations: int,
             n_sub_iteration: int, lr: float, seed: int, val_every: int, run_id: str, resume_run_id: str,
             s3_endpoint: str, bucket: str, prefix: str, model: Output[Model], metrics: Output[Metrics],
             report: Output[HTML]):
    """Fine-tune SAM's mask decoder; resumes from the run's latest.pt in the object store on a retry (or from
    run `resume_run_id`'s when set). `embeddings` (the embed shards' indexes) orders it after the fan-out; it
    reads the store's cache itself."""
    from components.steps import finetune_step, publish

    # The training settings are this body's parameters (tests/test_pipeline.py pins them to TrainConfig).
    result = finetune_step(
        weights_path=weights.path, manifest_path=dataset.path, run_id=run_id, resume_run_id=resume_run_id,
        s3_endpoint=s3_endpoint,
        bucket=bucket, prefix=prefix, out_model_path=model.path, out_report_path=report.path,
        debug_with_one_example=debug_with_one_example, checkpoint_name=checkpoint_name, model_type=model_type,
        batch_size=batch_size, n_objects_per_batch=n_objects_per_batch, device=device, n_iterations=n_iterations,
        n_sub_iteration=n_sub_iteration, lr=lr, seed=seed, val_every=val_every)
    publish(result, model, metrics)


def evaluate(weights: Input[Model], model: Input[Model], dataset: Input[Dataset], model_type: str, margin: float,
             model_name: str, device: str, allow_overlap: bool, s3_endpoint: str, bucket: str, prefix: str,
             metrics: Output[Metrics], report: Output[HTML]
             ) -> NamedTuple("Outputs", [("passed", bool), ("finetuned_box_dice", float),
                                         ("zero_shot_box_dice", float), ("metrics_json", str)]):
    """Zero-shot vs fine-tuned (vs the registered champion) on the test split; `passed` gates registration."""
    import json

    from components.steps import artifact_metadata, evaluate_step, publish

    result = evaluate_step(
        weights_path=weights.path, model_path=model.path, manifest_path=dataset.path, model_type=model_type,
        margin=margin, model_name=model_name, device=device, s3_endpoint=s3_endpoint, bucket=bucket,
        prefix=prefix, out_report_path=report.path, model_metadata=dict(model.metadata),
        allow_overlap=allow_overlap)
    publish(result, None, metrics)
    outputs = NamedTuple("Outputs", [("passed", bool), ("finetuned_box_dice", float),
                                     ("zero_shot_box_dice", float), ("metrics_json", str)])
    return outputs(bool(result["passed"]), float(result["finetuned_box_dice"]),
                   float(result["zero_shot_box_dice"]), json.dumps(artifact_metadata(result), sort_keys=True))


def register_model(model: Input[Model], weights: Input[Model], dataset: Input[Dataset], metrics_json: str,
                   model_name: str, model_registry_url: str, run_id: str, s3_endpoint: str, bucket: str,
                   prefix: str) -> NamedTuple("Outputs", [("version", str), ("model_uri", str)]):
    """Store an immutable model version with its card; mirror it to Kubeflow Model Registry when configured."""
    from components.steps import register_step

    result = register_step(
        model_path=model.path, metrics_json=metrics_json, model_name=model_name,
        model_registry_url=model_registry_url, run_id=run_id, s3_endpoint=s3_endpoint, bucket=bucket,
        prefix=prefix, model_metadata=dict(model.metadata), dataset_metadata=dict(dataset.metadata),
        weights_metadata=dict(weights.metadata), manifest_path=dataset.path)
    print("registered", result["model_name"], result["version"], "at", result["model_uri"])
    outputs = NamedTuple("Outputs", [("version", str), ("model_uri", str)])
    return outputs(result["version"], result["model_uri"])


# Every task of the pipeline, in the pipeline's order (each task after the tasks it waits for), with the
# step whose image it runs on. The one list of task and step names: images, the local runner's task states
# and the tests read TASKS and STEPS from here. Five images for eight tasks: check-changes needs only the
# registry code (the light register-model image), the shard list only Python (the light ingest image), and
# embed the encoder (torch: the finetune image).
_BODIES = {"fetch-weights": (fetch_weights, "fetch-weights"),
           "ingest-dataset": (ingest_dataset, "ingest-dataset"),
           "check-changes": (check_changes, "register-model"),
           "embed-shards": (embed_shards, "ingest-dataset"),
           "embed": (embed, "finetune"),
           "finetune": (finetune, "finetune"),
           "evaluate": (evaluate, "evaluate"),
           "register-model": (register_model, "register-model")}
TASKS = tuple(_BODIES)
TASK_IMAGES = {task: image for task, (_, image) in _BODIES.items()}  # the step whose image each task runs on
STEPS = tuple(task for task, image in TASK_IMAGES.items() if image == task)  # each has an image of its own


class Components(NamedTuple):
    fetch_weights: object
    ingest_dataset: object
    finetune: object
    evaluate: object
    register_model: object
    check_changes: object
    embed_shards: object
    embed: object


def make_components(images: dict[str, str]) -> Components:
    """Decorate the bodies with their images ({step: image ref}, see pipelines.images)."""
    missing = set(STEPS) - set(images)
    if missing:
        raise ValueError(f"no image given for step(s) {', '.join(sorted(missing))}")
    made = {task.replace("-", "_"): dsl.component(body, base_image=images[image], install_kfp_package=False)
            for task, (body, image) in _BODIES.items()}
    return Components(**made)
