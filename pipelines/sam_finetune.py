"""The KFP v2 pipeline: fetch-weights + ingest-dataset -> check-changes -> embed x N (GPU, dsl.ParallelFor)
-> finetune (GPU) -> evaluate (GPU) -> register-model; everything after check-changes only when it finds
something new to train.

Everything that is fixed at compile time (images, GPU placement, resources, retries) is an argument of
`build_pipeline`; everything a run may change is a pipeline parameter. `sam_finetune` is the pipeline
with the defaults, and `compile_pipeline` writes the committed YAML.
"""
# No `from __future__ import annotations`: KFP reads the pipeline signature's types at runtime.
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components.datasets.sources import PENNFUDAN_URL as PENN_FUDAN_URL
from components.files import atomic_path
from components.kfp_components import make_components
from components.training.config import TrainConfig
from pipelines.images import image_refs
from pipelines.resources import DEFAULTS as DEFAULT_RESOURCES

PIPELINE_NAME = "sam-finetune"
DEFAULT_YAML = Path(__file__).with_name("sam_finetune.yaml")
S3_SECRET = "mlpipeline-minio-artifact"
S3_SECRET_ENV = {"accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"}
_TRAIN = TrainConfig()  # the training parameters' defaults (tests/test_pipeline.py pins names and types)


@dataclass(frozen=True)
class Placement:
    """Compile-time settings for where and how the GPU steps run."""
    images: dict = field(default_factory=image_refs)
    gpu_node_selector: dict = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    gpu_tolerations: tuple = (("nvidia.com/gpu", "NoSchedule"),)  # (key, effect), operator Exists
    gpu_accelerator: str = "nvidia.com/gpu"
    shm_size: str = "2Gi"
    # {task: pipelines.resources.Resources} for embed, finetune and evaluate; the defaults fit a 4-core / 16 GB
    # workstation (pipelines/resources.py says why), `sam-pipeline compile --cpu/--memory` change them.
    resources: dict = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    finetune_retries: int = 3
    retry_backoff: str = "60s"


def _on_gpu(task, p: Placement, name: str):
    task.set_accelerator_type(p.gpu_accelerator).set_accelerator_limit(1)
    r = p.resources[name]
    task.set_cpu_request(r.cpu).set_memory_request(r.memory)
    if r.cpu_limit:
        task.set_cpu_limit(r.cpu_limit)
    if r.memory_limit:
        task.set_memory_limit(r.memory_limit)
    for key, value in sorted(p.gpu_node_selector.items()):
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for key, effect in p.gpu_tolerations:
        kubernetes.add_toleration(task, key=key, operator="Exists", effect=effect)
    # PyTorch DataLoader workers share tensors through /dev/shm, which is 64 MiB in a default pod.
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=p.shm_size)
    return task


def _with_s3_secret(task):
    # Credentials reach the pod from the KFP artifact-store secret; nothing secret is compiled in.
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_ENV)
    return task


def build_pipeline(placement: Placement | None = None):
    """Return the @dsl.pipeline function wired for the given compile-time placement.

    Built in a thread of its own. Each of kfp's resource setters (set_cpu_request, set_accelerator_type, ...)
    calls inspect.stack() only to name itself in an error it may raise (`_ensure_container_spec_exists` in
    kfp/dsl/pipeline_task.py), and inspect.stack() looks up the source of every frame on the stack: under 80
    frames of caller (pytest's, a notebook's, `run` called from a script) a build took 2.0 s instead of 0.6 s.
    A new thread's stack is a few frames deep."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(_wired, placement or Placement()).result()


def _wired(p: Placement):
    c = make_components(p.images)

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="Fine-tune Segment Anything (MobileSAM vit_t / SAM vit_b, vit_h) for instance "
                              "segmentation, evaluate against the zero-shot checkpoint and the registered "
                              "champion, and register the model when it is better.")
    def sam_finetune(
        debug_with_one_example: bool = _TRAIN.debug_with_one_example,
        checkpoint_name: str = _TRAIN.checkpoint_name,
        model_type: str = _TRAIN.model_type,
        batch_size: int = _TRAIN.batch_size,
        n_objects_per_batch: int = _TRAIN.n_objects_per_batch,
        device: str = _TRAIN.device,
        n_iterations: int = _TRAIN.n_iterations,
        n_sub_iteration: int = _TRAIN.n_sub_iteration,
        lr: float = _TRAIN.lr,
        seed: int = _TRAIN.seed,
        val_every: int = _TRAIN.val_every,
        dataset_source: str = PENN_FUDAN_URL,
        dataset_format: str = "auto",
        dataset_categories: str = "",
        dataset_name: str = "penn-fudan",
        split_seed: int = 0,
        weights_url: str = "",
        weights_sha256: str = "",
        bucket: str = "mlpipeline",
        prefix: str = "sam-pipeline/",
        s3_endpoint: str = "seaweedfs.kubeflow:9000",
        margin: float = 0.0,
        model_name: str = "sam-pennfudan",
        model_registry_url: str = "",
        verify_data: bool = False,
        force_retrain: bool = False,
        allow_overlap: bool = False,
        resume_run_id: str = "",
        embed_shards: int = 1,
    ):
        store = dict(s3_endpoint=s3_endpoint, bucket=bucket, prefix=prefix)

        weights = c.fetch_weights(model_type=model_type, url=weights_url, sha256=weights_sha256, **store)
        weights.set_display_name("fetch-weights").set_caching_options(True)

        dataset = c.ingest_dataset(source=dataset_source, dataset_format=dataset_format,
                                   dataset_name=dataset_name, split_seed=split_seed, verify_data=verify_data,
                                   categories=dataset_categories, **store)
        # Not cached, although its output is content-addressed: the cache key is the source string, so a
        # scheduled run reading a fixed s3:// drop folder would never see new data. Ingest hashes first and
        # uploads nothing when the content is unchanged, so running it every time costs seconds.
        dataset.set_display_name("ingest-dataset").set_caching_options(False)

        # A scheduled run on unchanged data, weights and settings has nothing to train: the check compares
        # them with the registered champion's card, and everything below runs only when something differs.
        check = c.check_changes(
            dataset=dataset.outputs["dataset"], weights_sha256=weights.outputs["sha256"], model_name=model_name,
            force_retrain=force_retrain, debug_with_one_example=debug_with_one_example, model_type=model_type,
            batch_size=batch_size, n_objects_per_batch=n_objects_per_batch, n_iterations=n_iterations,
            n_sub_iteration=n_sub_iteration, lr=lr, seed=seed, val_every=val_every, **store)
        # Never cached: the champion it compares with changes between runs with the same inputs.
        check.set_display_name("check-changes").set_caching_options(False)

        with dsl.If(check.outputs["changed"] == True, name="something-changed"):  # noqa: E712 (KFP condition)
            # The embed fan-out: N GPU tasks fill the store's embedding cache, one shard of the images each.
            shards = c.embed_shards(shards=embed_shards)
            shards.set_display_name("embed-shards").set_caching_options(False)
            with dsl.ParallelFor(shards.output, name="embed-fan-out") as shard:
                emb = c.embed(weights=weights.outputs["weights"], dataset=dataset.outputs["dataset"],
                              model_type=model_type, shard=shard, shards=embed_shards, device=device, **store)
                # Cached: the key is the weights and dataset artifacts plus the shard's parameters (KFP's
                # cacheutils.GenerateCacheKey). What makes a rerun cheap even on a cache miss (a new ingest
                # artifact each run) is the store's content-addressed skip: one stat per image already there.
                emb.set_display_name("embed").set_caching_options(True)
                _on_gpu(emb, p, "embed")
                _with_s3_secret(emb)

            train = c.finetune(
                weights=weights.outputs["weights"], dataset=dataset.outputs["dataset"],
                embeddings=dsl.Collected(emb.outputs["index"]),
                debug_with_one_example=debug_with_one_example, checkpoint_name=checkpoint_name,
                model_type=model_type, batch_size=batch_size, n_objects_per_batch=n_objects_per_batch,
                device=device, n_iterations=n_iterations, n_sub_iteration=n_sub_iteration, lr=lr, seed=seed,
                val_every=val_every, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, resume_run_id=resume_run_id, **store)
            # Scheduled retraining must retrain; a retry of the same run resumes from its latest.pt.
            train.set_display_name("finetune").set_caching_options(False)
            if p.finetune_retries:
                train.set_retry(num_retries=p.finetune_retries, backoff_duration=p.retry_backoff, backoff_factor=2)
            _on_gpu(train, p, "finetune")

            ev = c.evaluate(weights=weights.outputs["weights"], model=train.outputs["model"],
                            dataset=dataset.outputs["dataset"], model_type=model_type, margin=margin,
                            model_name=model_name, device=device, allow_overlap=allow_overlap, **store)
            ev.set_display_name("evaluate").set_caching_options(False)
            _on_gpu(ev, p, "evaluate")

            with dsl.If(ev.outputs["passed"] == True, name="better-than-baseline"):  # noqa: E712
                reg = c.register_model(model=train.outputs["model"], dataset=dataset.outputs["dataset"],
                                       weights_metadata=weights.outputs["metadata"],
                                       metrics_json=ev.outputs["metrics_json"],
                                       model_name=model_name, model_registry_url=model_registry_url,
                                       run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, **store)
                reg.set_display_name("register-model").set_caching_options(False)

        for task in (weights, dataset, check, train, ev, reg):
            _with_s3_secret(task)

    return sam_finetune


sam_finetune = build_pipeline()


def compile_pipeline(path: str | Path = DEFAULT_YAML, placement: Placement | None = None) -> Path:
    """Compile to YAML; the same inputs give the same bytes (a test compares with the committed file)."""
    with atomic_path(path, suffix=".yaml") as tmp:  # the compiler picks the format from the suffix
        compiler.Compiler().compile(build_pipeline(placement), str(tmp))
    return Path(path)
