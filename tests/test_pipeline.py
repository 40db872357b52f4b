"""The compiled pipeline: committed YAML is byte-identical to a fresh compile, and carries the cluster settings."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipelines.image_tag import source_tag
from pipelines.images import STEPS, image_refs
from pipelines.sam_finetune import DEFAULT_YAML, Placement, compile_pipeline

# The five steps on their own images; check-changes borrows register-model's light image, and the embed
# fan-out's two functions run on the finetune and ingest images.
EXECUTORS = {**{f"exec-{s}": s for s in STEPS}, "exec-check-changes": "register-model", "exec-embed": "finetune",
             "exec-embed-shards": "ingest-dataset"}
STORAGE_TASKS = {*STEPS, "check-changes", "embed"}  # every task that reads or writes the object store
GPU_TASKS = {"finetune", "evaluate", "embed"}


def _load(path: Path) -> tuple[dict, dict]:
    spec, platform = list(yaml.safe_load_all(path.read_text()))
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as mp:  # the committed YAML is for the default images
        mp.delenv("SAM_IMAGE_REGISTRY", raising=False)
        mp.delenv("SAM_IMAGE_TAG", raising=False)
        return compile_pipeline(tmp_path_factory.mktemp("yaml") / "sam_finetune.yaml")


def test_committed_yaml_matches_a_fresh_compile(compiled):
    assert DEFAULT_YAML.is_file(), "pipelines/sam_finetune.yaml is missing: run `sam-pipeline compile`"
    assert compiled.read_bytes() == DEFAULT_YAML.read_bytes(), \
        "pipelines/sam_finetune.yaml is stale: run `sam-pipeline compile` and commit it"


def test_the_readme_picture_is_drawn_from_the_committed_yaml():
    """docs/pipeline.svg (the README's picture of the DAG) equals a fresh drawing of the committed YAML, so it
    never shows a pipeline that is not the one users run; `make compile` redraws it."""
    from pipelines.dag_picture import DEFAULT_SVG, render

    picture = render(DEFAULT_YAML)
    assert DEFAULT_SVG.read_text() == picture, "docs/pipeline.svg is stale: run `make compile` and commit it"
    for task in ("fetch-weights", "ingest-dataset", "check-changes", "embed", "finetune", "evaluate",
                 "register-model"):
        assert f">{task}</text>" in picture
    assert "if evaluate.passed" in picture and "if check-changes.changed" in picture


def test_executors_and_their_images(compiled):
    spec, _ = _load(compiled)
    executors = spec["deploymentSpec"]["executors"]
    assert set(executors) == set(EXECUTORS)
    images = {name: ex["container"]["image"] for name, ex in executors.items()}
    tag = source_tag()  # derived from the image sources: a rebuilt image is a new reference, a new cache key
    assert images == {name: f"localhost/sam-pipeline-{step}:{tag}" for name, step in EXECUTORS.items()}
    for ex in executors.values():
        command = " ".join(ex["container"]["command"])
        assert "pip install" not in command  # install_kfp_package=False, no packages_to_install
        assert "from components." in command


def test_gpu_steps_placement_and_retry(compiled):
    spec, k8s = _load(compiled)
    executors = spec["deploymentSpec"]["executors"]
    on_gpu = {n[len("exec-"):] for n, ex in executors.items() if "accelerator" in ex["container"].get("resources", {})}
    assert on_gpu == GPU_TASKS
    for step in sorted(GPU_TASKS):
        res = spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]["resources"]
        assert res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["accelerator"]["resourceCount"] == "1"
        assert res["resourceCpuRequest"] and res["resourceMemoryRequest"]
        cfg = k8s[f"exec-{step}"]
        assert cfg["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        assert cfg["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert cfg["emptyDirMounts"] == [{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory",
                                          "sizeLimit": "2Gi"}]
    for name in set(executors) - {f"exec-{t}" for t in GPU_TASKS}:
        assert not {"nodeSelector", "tolerations", "emptyDirMounts"} & set(k8s.get(name, {})), name
    tasks = _inner_tasks(spec, "check-changes-changed")
    retry = tasks["finetune"]["retryPolicy"]
    assert retry["maxRetryCount"] == 3 and retry["backoffDuration"] == "60s" and retry["backoffFactor"] == 2.0
    # A retry of the same run resumes: finetune gets the run's id, not a fresh one per attempt.
    assert tasks["finetune"]["inputs"]["parameters"]["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"


def _inner_tasks(spec: dict, channel: str, tasks: dict | None = None) -> dict:
    """The tasks of the dsl.If sub-DAG whose condition reads `channel` (e.g. "evaluate-passed"), at any depth."""
    tasks = spec["root"]["dag"]["tasks"] if tasks is None else tasks
    for task in tasks.values():
        inner = spec["components"][task["componentRef"]["name"]].get("dag", {}).get("tasks")
        if not inner:
            continue
        condition = task.get("triggerPolicy", {}).get("condition", "")
        if f"pipelinechannel--{channel}']" in condition and "== true" in condition:
            return inner
        found = _inner_tasks(spec, channel, inner)
        if found:
            return found
    return {}


def test_caching_and_the_gates(compiled):
    spec, _ = _load(compiled)
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["fetch-weights"]["cachingOptions"] == {"enableCache": True}
    # Ingest re-reads its source every run (new data at a fixed s3:// prefix must reach training); the check
    # compares with a champion that changes between runs with the same inputs.
    for name in ("ingest-dataset", "check-changes"):
        assert tasks[name]["cachingOptions"] == {}, name
    assert {n for n in tasks if not n.startswith("condition")} == {"fetch-weights", "ingest-dataset", "check-changes"}
    # Training, evaluation and registration run only when check-changes found something new ...
    changed = _inner_tasks(spec, "check-changes-changed")
    assert {"finetune", "evaluate"} <= set(changed)
    for name in ("finetune", "evaluate"):
        assert changed[name]["cachingOptions"] == {}, name
    # ... and registration, inside that, only when evaluate passed.
    passed = _inner_tasks(spec, "evaluate-passed")
    assert list(passed) == ["register-model"] and passed["register-model"]["cachingOptions"] == {}
    assert "register-model" not in changed
    # The check reads the weights' sha256 as a parameter: the checkpoint itself is not downloaded.
    check = tasks["check-changes"]["inputs"]
    assert check["parameters"]["weights_sha256"]["taskOutputParameter"] == {
        "producerTask": "fetch-weights", "outputParameterKey": "sha256"}


def test_each_step_downloads_only_the_artifacts_it_reads(compiled):
    """The 2.17 launcher downloads every input artifact in full before the step starts
    (backend/src/v2/component/launcher_v2.go, downloadArtifacts): a step that needs a few fields of an
    artifact's metadata takes them as parameters instead (register-model: the checkpoint's, 2.5 GB for vit_h)."""
    spec, _ = _load(compiled)
    # The manifest (dataset) is read by every step that takes it: its content hash and split rule
    # (check-changes), the images trained on (register-model's card).
    reads = {"fetch-weights": set(), "ingest-dataset": set(), "check-changes": {"dataset"}, "embed-shards": set(),
             "embed": {"weights", "dataset"}, "finetune": {"weights", "dataset", "embeddings"},
             "evaluate": {"weights", "model", "dataset"}, "register-model": {"model", "dataset"}}
    found = {}

    def walk(dag):
        for name, task in dag["tasks"].items():
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                walk(component["dag"])
            else:
                found[name] = set(task.get("inputs", {}).get("artifacts", {}))

    walk(spec["root"]["dag"])
    assert found == reads
    reg = _inner_tasks(spec, "evaluate-passed")["register-model"]["inputs"]["parameters"]
    assert reg["weights_metadata"]["componentInputParameter"] == "pipelinechannel--fetch-weights-metadata"


def test_embed_fan_out_between_ingest_and_finetune(compiled):
    """embed_shards -> dsl.ParallelFor over the shard list -> dsl.Collected of the indexes -> finetune."""
    spec, _ = _load(compiled)
    tasks = _inner_tasks(spec, "check-changes-changed")  # nothing to embed when nothing is to be trained
    assert spec["root"]["inputDefinitions"]["parameters"]["embed_shards"]["defaultValue"] == 1
    # Inside the condition's sub-DAG a pipeline parameter arrives as a pipeline channel.
    assert tasks["embed-shards"]["inputs"]["parameters"]["shards"]["componentInputParameter"] in (
        "embed_shards", "pipelinechannel--embed_shards")
    (loop_name,) = [n for n in tasks if n.startswith("for-loop")]
    loop = tasks[loop_name]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--embed-shards-Output"
    # Inside the condition the loop waits for embed-shards; fetch-weights and ingest-dataset reach it through
    # the condition's inputs (the condition itself waits for them).
    assert "embed-shards" in loop["dependentTasks"]
    loop_dag = spec["components"][loop["componentRef"]["name"]]["dag"]
    embed = loop_dag["tasks"]["embed"]
    assert embed["cachingOptions"] == {"enableCache": True}
    assert embed["inputs"]["parameters"]["shard"]["componentInputParameter"].endswith("-loop-item")
    assert set(embed["inputs"]["artifacts"]) == {"weights", "dataset"}
    collected = tasks["finetune"]["inputs"]["artifacts"]["embeddings"]["taskOutputArtifact"]
    assert collected["producerTask"] == loop_name
    (out,) = loop_dag["outputs"]["artifacts"].values()
    assert out["artifactSelectors"] == [{"outputArtifactKey": "index", "producerSubtask": "embed"}]
    assert spec["components"]["comp-finetune"]["inputDefinitions"]["artifacts"]["embeddings"]["isArtifactList"]


def test_storage_tasks_get_the_secret_and_no_credential_is_compiled_in(compiled):
    _, k8s = _load(compiled)
    for step in STORAGE_TASKS:
        (sec,) = k8s[f"exec-{step}"]["secretAsEnv"]
        assert sec["secretName"] == "mlpipeline-minio-artifact"
        assert {(k["secretKey"], k["envVar"]) for k in sec["keyToEnv"]} == {
            ("accesskey", "AWS_ACCESS_KEY_ID"), ("secretkey", "AWS_SECRET_ACCESS_KEY")}
    text = compiled.read_text()
    from components.s3server import ANON_KEYS

    # The embedded server's placeholder keys and KFP's well-known default MinIO password.
    for secret in (*ANON_KEYS, "minio123"):
        assert secret not in text
    assert not re.search(r"AKIA[0-9A-Z]{12,}", text)  # an AWS access key id
    spec, _ = _load(compiled)
    for ex in spec["deploymentSpec"]["executors"].values():
        assert not [e for e in ex["container"].get("env", []) if "AWS" in e["name"] or "KEY" in e["name"]]


def test_pipeline_parameters_and_defaults(compiled):
    spec, _ = _load(compiled)
    params = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert params["debug_with_one_example"] is False and params["checkpoint_name"] == "sam_instance_seg"
    assert params["model_type"] == "vit_t" and params["device"] == "cuda"
    assert (params["batch_size"], params["n_objects_per_batch"], params["n_iterations"],
            params["n_sub_iteration"]) == (1, 25, 200, 2)
    assert params["dataset_source"].endswith("PennFudanPed.zip") and params["dataset_format"] == "auto"
    assert (params["bucket"], params["prefix"], params["s3_endpoint"]) == (
        "mlpipeline", "sam-pipeline/", "seaweedfs.kubeflow:9000")
    assert params["margin"] == 0.0 and params["model_name"] == "sam-pennfudan"
    assert params["model_registry_url"] == "" and params["weights_url"] == "" and params["weights_sha256"] == ""
    assert params["verify_data"] is False and params["force_retrain"] is False
    assert params["allow_overlap"] is False and params["resume_run_id"] == ""
    # Each reaches its step.
    ingest = spec["root"]["dag"]["tasks"]["ingest-dataset"]["inputs"]["parameters"]
    assert ingest["verify_data"] == {"componentInputParameter": "verify_data"}
    check = spec["root"]["dag"]["tasks"]["check-changes"]["inputs"]["parameters"]
    assert check["force_retrain"] == {"componentInputParameter": "force_retrain"}
    changed = _inner_tasks(spec, "check-changes-changed")
    assert changed["evaluate"]["inputs"]["parameters"]["allow_overlap"] == {
        "componentInputParameter": "pipelinechannel--allow_overlap"}
    assert changed["finetune"]["inputs"]["parameters"]["resume_run_id"] == {
        "componentInputParameter": "pipelinechannel--resume_run_id"}


def test_compile_time_overrides(tmp_path):
    placement = Placement(images=image_refs("ghcr.io/acme", "1.2.3"), gpu_node_selector={"pool": "gpu"},
                          gpu_tolerations=(("dedicated", "NoExecute"),), shm_size="8Gi", finetune_retries=0)
    spec, k8s = _load(compile_pipeline(tmp_path / "p.yaml", placement))
    assert {ex["container"]["image"] for ex in spec["deploymentSpec"]["executors"].values()} == {
        f"ghcr.io/acme/sam-pipeline-{s}:1.2.3" for s in STEPS}
    for step in GPU_TASKS:
        assert k8s[f"exec-{step}"]["nodeSelector"]["labels"] == {"pool": "gpu"}
        assert k8s[f"exec-{step}"]["tolerations"][0]["key"] == "dedicated"
        assert k8s[f"exec-{step}"]["emptyDirMounts"][0]["sizeLimit"] == "8Gi"
    assert "retryPolicy" not in _inner_tasks(spec, "check-changes-changed")["finetune"]


def test_bad_image_settings_are_rejected():
    from pipelines.images import ImageError

    with pytest.raises(ImageError, match="invalid image tag"):
        image_refs("localhost", "bad tag")
    with pytest.raises(ImageError, match="invalid image registry"):
        image_refs("Not A Registry", "1")


def test_steps_are_listed_once_in_pipeline_order():
    """images and the local runner read kfp_components' list; the local runner's task states rely on its order
    (each step after the steps it waits for), checked here against the compiled DAG."""
    from components.kfp_components import STEPS, TASKS as listed
    from pipelines import images, local, local_tasks
    from pipelines.sam_finetune import Placement, build_pipeline

    assert images.STEPS is STEPS and local.TASKS is listed and local_tasks.TASKS is listed
    assert set(STEPS) < set(listed)
    graph = local_tasks.task_graph(build_pipeline(Placement()))
    assert set(graph) == set(listed)
    for i, step in enumerate(listed):
        assert graph[step]["after"] <= set(listed[:i]), f"{step} waits for {graph[step]['after']}"


# -- training settings: TrainConfig is the one place their names, types and defaults are stated ------

def test_training_parameters_are_trainconfigs():
    """KFP needs literal signatures; this fails when a pipeline, component or CLI name, type or default
    drifts from TrainConfig."""
    import dataclasses
    import inspect

    from components.kfp_components import finetune
    from components.training.config import PIPELINE_SETTINGS, TrainConfig
    from pipelines.cli import build_parser

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(PIPELINE_SETTINGS) <= set(fields)
    component_params = inspect.signature(finetune).parameters
    run_args = vars(build_parser().parse_args(["run"]))
    for name in PIPELINE_SETTINGS:
        f = fields[name]
        assert component_params[name].annotation.__name__ == f.type, name
        assert run_args[name] == f.default, name

    # The pipeline's parameters as KFP sees them: the compiled spec (pinned to a fresh compile above).
    spec, _ = _load(DEFAULT_YAML)
    kfp_types = {"bool": "BOOLEAN", "str": "STRING", "int": "NUMBER_INTEGER", "float": "NUMBER_DOUBLE"}
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    for name in PIPELINE_SETTINGS:
        assert inputs[name]["parameterType"] == kfp_types[fields[name].type], name
        assert inputs[name].get("defaultValue", False) == fields[name].default, name
    finetune_inputs = spec["components"]["comp-finetune"]["inputDefinitions"]["parameters"]
    assert set(PIPELINE_SETTINGS) <= set(finetune_inputs)
    # check-changes compares every setting that decides the model (all but TrainConfig.NOT_TRAJECTORY).
    from components.kfp_components import check_changes
    from components.training.config import NOT_TRAJECTORY

    check_params = inspect.signature(check_changes).parameters
    assert set(PIPELINE_SETTINGS) - NOT_TRAJECTORY <= set(check_params)
    assert not set(check_params) & NOT_TRAJECTORY
    for name in set(PIPELINE_SETTINGS) - NOT_TRAJECTORY:
        assert check_params[name].annotation.__name__ == fields[name].type, name
