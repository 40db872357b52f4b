"""Kubernetes side, validated offline: manifests against the Kubernetes 1.31+ schemas (strict), local
kustomizations rendered with kubectl, remote bases checked structurally, the kind config's GPU worker
against the compiled pipeline's placement, and the shell scripts with bash -n, shellcheck and real runs
of the preflight against fake tools on PATH.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pipelines.image_tag import source_tag

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
KIND_CONFIG = MANIFESTS / "kind" / "cluster.yaml"
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))
DOCS = ROOT / "docs" / "kubernetes.md"
COMPILED = ROOT / "pipelines" / "sam_finetune.yaml"
KUBECTL = shutil.which("kubectl")

# Oldest supported API level, and the one the kind node runs.
K8S_VERSIONS = ("1.31.0", "1.33.0")
KFP_VERSION = "2.17.0"
KFP_REMOTE = "github.com/kubeflow/pipelines/manifests/kustomize/"
GPU_LABEL = ("nvidia.com/gpu.present", "true")
GPU_RESOURCE = "nvidia.com/gpu"


# --- helpers ---------------------------------------------------------------------------------------

def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def is_remote(resource: str) -> bool:
    return bool(re.match(r"^(https?://|git@|github\.com/)", resource))


def kustomizations() -> list[Path]:
    return sorted(MANIFESTS.rglob("kustomization.yaml"))


def local_kustomizations() -> list[Path]:
    return [k for k in kustomizations() if not any(is_remote(r) for r in yaml.safe_load(k.read_text()).get("resources", []))]


def remote_kustomizations() -> list[Path]:
    return [k for k in kustomizations() if k not in local_kustomizations()]


def plain_manifests() -> list[Path]:
    """Every YAML file under manifests/ that is a Kubernetes resource (not kind's config, not a kustomization)."""
    return sorted(p for p in MANIFESTS.rglob("*.yaml")
                  if p.name != "kustomization.yaml" and KIND_CONFIG != p)


def validate_strict(doc: dict, where: str) -> None:
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{where}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')} invalid for "
                        f"Kubernetes {version}: {e.message} at {'.'.join(map(str, e.path))}")


def tolerates(tolerations: list[dict], taint: dict) -> bool:
    """Kubernetes' rule: a toleration matches a taint on key (or empty key with Exists), effect (or empty
    effect) and, for Equal, value."""
    for t in tolerations or []:
        if t.get("effect") and t["effect"] != taint["effect"]:
            continue
        op = t.get("operator", "Equal")
        if op == "Exists":
            if not t.get("key") or t["key"] == taint["key"]:
                return True
        elif t.get("key") == taint["key"] and str(t.get("value", "")) == str(taint.get("value", "")):
            return True
    return False


def kind_config() -> dict:
    return yaml.safe_load(KIND_CONFIG.read_text())


def gpu_worker() -> dict:
    workers = [n for n in kind_config()["nodes"] if n["role"] == "worker"]
    assert len(workers) == 1, "one GPU worker expected"
    return workers[0]


def worker_labels() -> dict[str, str]:
    return {k: str(v) for k, v in (gpu_worker().get("labels") or {}).items()}


def worker_taints() -> list[dict]:
    taints = []
    for patch in gpu_worker().get("kubeadmConfigPatches") or []:
        doc = yaml.safe_load(patch)
        if doc.get("kind") == "JoinConfiguration":
            taints += doc.get("nodeRegistration", {}).get("taints") or []
    return taints


def selector_fits(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == str(v) for k, v in (selector or {}).items())


# --- kind config -----------------------------------------------------------------------------------

def test_kind_config_has_control_plane_and_gpu_worker():
    cfg = kind_config()
    assert cfg["kind"] == "Cluster" and cfg["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    roles = [n["role"] for n in cfg["nodes"]]
    assert sorted(roles) == ["control-plane", "worker"], roles
    for node in cfg["nodes"]:
        image = node.get("image", "")
        m = re.match(r"^kindest/node:v1\.(\d+)\.\d+@sha256:[0-9a-f]{64}$", image)
        assert m, f"{node['role']}: node image must be pinned by digest, got {image!r}"
        assert int(m.group(1)) >= 31, "Kubernetes 1.31 or newer"
    control = next(n for n in cfg["nodes"] if n["role"] == "control-plane")
    assert not control.get("extraMounts") and not control.get("labels"), "the control plane gets no GPU"


def test_kind_worker_gets_gpus_the_nvkind_way():
    mounts = gpu_worker().get("extraMounts") or []
    assert {"hostPath": "/dev/null", "containerPath": "/var/run/nvidia-container-devices/all"} in mounts


def test_kind_worker_labelled_and_tainted_for_gpus():
    assert worker_labels() == {GPU_LABEL[0]: GPU_LABEL[1]}
    assert worker_taints() == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    # Unknown kind fields make `kind create cluster` fail; keep to the ones kind v1alpha4 defines.
    allowed = {"role", "image", "labels", "extraMounts", "extraPortMappings", "kubeadmConfigPatches",
               "kubeadmConfigPatchesJSON6902"}
    assert set(gpu_worker()) <= allowed


# --- schema validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("path", plain_manifests(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_manifest_passes_strict_schema(path):
    docs = load_all(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        validate_strict(doc, str(path.relative_to(ROOT)))


def test_every_plain_manifest_is_reachable():
    """A manifest no kustomization or script uses is dead weight (or a forgotten install step)."""
    used = set()
    for k in local_kustomizations():
        used |= {(k.parent / r).resolve() for r in yaml.safe_load(k.read_text()).get("resources", [])}
    scripts = " ".join(p.read_text() for p in SCRIPTS)
    for path in plain_manifests():
        rel = str(path.relative_to(ROOT))
        assert path.resolve() in used or rel in scripts, f"{rel} is neither in a kustomization nor used by a script"


@pytest.mark.parametrize("kustomization", local_kustomizations(), ids=lambda p: str(p.parent.relative_to(MANIFESTS)))
def test_local_kustomization_renders_and_validates(kustomization):
    if not KUBECTL:
        pytest.skip("kubectl is not installed: cannot render kustomizations")
    proc = subprocess.run([KUBECTL, "kustomize", str(kustomization.parent)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs
    for doc in docs:
        validate_strict(doc, f"kubectl kustomize {kustomization.parent.relative_to(ROOT)}")


def test_remote_kustomizations_pin_kfp_standalone():
    """Remote bases cannot be fetched offline; check they are the standalone install at one pinned release,
    in the documented order, and platform-agnostic (SeaweedFS) rather than env/dev."""
    cluster = yaml.safe_load((MANIFESTS / "kfp" / "cluster-scoped" / "kustomization.yaml").read_text())
    platform = yaml.safe_load((MANIFESTS / "kfp" / "platform" / "kustomization.yaml").read_text())
    assert cluster["resources"] == [f"{KFP_REMOTE}cluster-scoped-resources?ref={KFP_VERSION}"]
    assert platform["resources"] == [f"{KFP_REMOTE}env/platform-agnostic?ref={KFP_VERSION}"]
    for k in remote_kustomizations():
        doc = yaml.safe_load(k.read_text())
        assert doc["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and doc["kind"] == "Kustomization"
        for r in doc["resources"]:
            assert re.search(r"\?ref=v?\d+\.\d+\.\d+$", r), f"{k}: remote base {r} must pin a release tag"
            assert "env/dev" not in r
    install = (ROOT / "scripts" / "kfp-install.sh").read_text()
    assert install.index("manifests/kfp/cluster-scoped") < install.index("Established") < install.index("manifests/kfp/platform")


def test_kfp_backend_matches_sdk_minor():
    """A backend older than the SDK silently drops what it does not know (e.g. the GPU request)."""
    import kfp

    assert kfp.__version__.split(".")[:2] == KFP_VERSION.split(".")[:2]


def test_model_registry_server_and_client_are_one_release():
    """Upstream tags the REST server and the Python client together; a server of another release line
    speaks another REST API (v0.3.5 serves /api/model_registry/v1alpha3/, client 0.3.18 calls /v1/)."""
    doc = yaml.safe_load((MANIFESTS / "model-registry" / "kustomization.yaml").read_text())
    assert doc["namespace"] == "kubeflow"
    [base] = doc["resources"]
    m = re.fullmatch(r"github\.com/kubeflow/hub/manifests/kustomize/overlays/db\?ref=v(\d+\.\d+\.\d+)", base)
    assert m, base
    pin = re.search(r'"model-registry==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml pins no model-registry client"
    assert m.group(1) == pin.group(1), f"server v{m.group(1)} vs client {pin.group(1)}"
    assert f"v{m.group(1)}" in DOCS.read_text(), "docs/kubernetes.md does not name the Model Registry pair"


# --- GPU pieces agree with the worker --------------------------------------------------------------

def gpu_docs() -> dict[str, dict]:
    docs = {}
    for path in (MANIFESTS / "gpu").rglob("*.yaml"):
        for d in load_all(path):
            if "kind" in d and d["kind"] != "Kustomization":
                docs[d["kind"]] = d
    return docs


def test_device_plugin_lands_on_the_gpu_worker():
    docs = gpu_docs()
    ds = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert selector_fits(ds["nodeSelector"], worker_labels())
    for taint in worker_taints():
        assert tolerates(ds["tolerations"], taint), f"device plugin does not tolerate {taint}"
    [ctr] = ds["containers"]
    assert re.fullmatch(r"nvcr\.io/nvidia/k8s-device-plugin:v0\.17\.\d+", ctr["image"])
    # The GPU path KFP task pods take: containerd's default runtime, no runtime class (kfp-kubernetes 2.17.3
    # has no API for one), so the device plugin proves that default too.
    assert "runtimeClassName" not in ds
    assert docs["RuntimeClass"]["handler"] == "nvidia"


@pytest.mark.parametrize("task", ["embed", "finetune", "evaluate"])
def test_smoke_pod_is_shaped_as_the_compiled_gpu_task(task):
    """scripts/gpu-check.sh's pod, read from the compiled YAML as KFP 2.17's driver reads it
    (backend/src/v2/driver/driver.go initPodSpecPatch, driver/k8s.go): schedulable on the kind GPU worker."""
    from pipelines.gpu_pod import task_pod

    pod = task_pod(task=task)["spec"]
    assert "runtimeClassName" not in pod
    [ctr] = pod["containers"]
    assert ctr["resources"]["limits"][GPU_RESOURCE] == "1"
    assert ctr["command"] == ["nvidia-smi", "-L"]
    assert selector_fits(pod["nodeSelector"], worker_labels())
    assert all(tolerates(pod["tolerations"], t) for t in worker_taints())
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod},
                                 K8S_VERSIONS[-1], strict=True)


def test_smoke_pod_follows_the_compiled_placement_not_a_copy(tmp_path):
    """Compiled with other placement and resources, the smoke pod changes with it: nothing is restated."""
    from pipelines.gpu_pod import GpuPodError, task_pod
    from pipelines.resources import Resources
    from pipelines.sam_finetune import Placement, compile_pipeline

    path = compile_pipeline(tmp_path / "p.yaml", Placement(
        gpu_node_selector={"pool": "a100"}, gpu_tolerations=(("dedicated", "NoExecute"),),
        resources={"embed": Resources("1", "2Gi"), "finetune": Resources("3", "5Gi", "4", "7Gi"),
                   "evaluate": Resources("1", "2Gi")}))
    pod = task_pod(path, "finetune")["spec"]
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}]
    assert pod["containers"][0]["resources"] == {"limits": {GPU_RESOURCE: "1", "cpu": "4", "memory": "7Gi"},
                                                 "requests": {"cpu": "3", "memory": "5Gi"}}
    with pytest.raises(GpuPodError, match="no GPU task 'register-model'"):
        task_pod(path, "register-model")


def test_toleration_matcher_is_strict():
    taint = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    assert tolerates([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}], taint)
    assert tolerates([{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present"}], taint)
    assert not tolerates([{"key": "nvidia.com/gpu", "operator": "Equal", "value": "true"}], taint)
    assert not tolerates([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"}], taint)
    assert not tolerates([{"key": "gpu", "operator": "Exists"}], taint)
    assert not selector_fits({"nvidia.com/gpu.present": "yes"}, {"nvidia.com/gpu.present": "true"})


# --- compiled pipeline vs the kind node ------------------------------------------------------------

def compiled() -> tuple[dict, dict]:
    if not COMPILED.exists():
        pytest.fail(f"{COMPILED.relative_to(ROOT)} does not exist yet: run `make compile` (the pipeline "
                    f"engineer's output); placement cannot be checked against the kind GPU worker without it")
    docs = load_all(COMPILED)
    spec = docs[0]
    platform = next((d for d in docs[1:] if "platforms" in d), {})
    return spec, platform.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})


def executors_for(step: str) -> list[str]:
    spec, _ = compiled()
    return [name for name, ex in spec["deploymentSpec"]["executors"].items()
            if re.search(rf"/sam-pipeline-{step}:", ex.get("container", {}).get("image", ""))]


@pytest.mark.parametrize("step", ["finetune", "evaluate"])
def test_compiled_gpu_steps_fit_the_kind_gpu_worker(step):
    spec, platform = compiled()
    names = executors_for(step)
    assert names, f"no executor in {COMPILED.name} runs the sam-pipeline-{step} image"
    for name in names:
        container = spec["deploymentSpec"]["executors"][name]["container"]
        accel = container.get("resources", {}).get("accelerator", {})
        assert GPU_RESOURCE in (accel.get("resourceType"), accel.get("type")), f"{name}: no {GPU_RESOURCE} request"
        k8s = platform.get(name, {})
        selector = k8s.get("nodeSelector", {}).get("labels", {})
        assert selector, f"{name}: no node selector; it could land on the control plane and wait for a GPU forever"
        assert selector_fits(selector, worker_labels()), (
            f"{name}: node selector {selector} does not match the kind GPU worker's labels {worker_labels()} "
            f"({KIND_CONFIG.relative_to(ROOT)}): the pod would stay Pending")
        for taint in worker_taints():
            assert tolerates(k8s.get("tolerations", []), taint), (
                f"{name}: tolerations {k8s.get('tolerations')} do not tolerate the GPU worker's taint {taint}")


def test_compiled_pipeline_matches_cluster_store_and_images():
    """The compiled defaults must point at what `make kind-up` installs and `make images` builds."""
    spec, platform = compiled()
    params = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    endpoint = next((p.get("defaultValue") for n, p in params.items() if "endpoint" in n and "s3" in n), None)
    assert endpoint == "seaweedfs.kubeflow:9000", f"pipeline's S3 endpoint default is {endpoint!r}"
    secrets = {s.get("secretName") for ex in platform.values() for s in ex.get("secretAsEnv", [])}
    assert secrets == {"mlpipeline-minio-artifact"}, secrets
    images = {ex["container"]["image"] for ex in spec["deploymentSpec"]["executors"].values()}
    expected = {f"localhost/sam-pipeline-{s}:{source_tag()}" for s in
                ("fetch-weights", "ingest-dataset", "finetune", "evaluate", "register-model")}
    assert images == expected, "compiled images differ from what `make images kind-load` provides"


def test_one_gpu_worker_gets_every_gpu_so_nvkind_proc_patch_is_not_needed():
    """Contract test of NVIDIA/nvkind pkg/nvkind/node.go `PatchProcDriverNvidia` (called from
    cmd/nvkind/cluster_create.go): it masks /proc/driver/nvidia/params (ModifyDeviceFiles: 0) and removes the
    /dev/nvidia* nodes of GPUs a worker was NOT given, so a worker holding a subset cannot reach the others;
    its `removeDeviceNodes` returns at once for a worker given "all". Our cluster has one GPU worker and it is
    given all GPUs, the case where the patch changes nothing. A second GPU worker or a subset mount would need it:
    this fails first (docs/kubernetes.md, "Why nvkind's /proc/driver/nvidia patch is not ported")."""
    [cluster] = load_all(MANIFESTS / "kind" / "cluster.yaml")
    gpu_workers = [n for n in cluster["nodes"] if n.get("labels", {}).get("nvidia.com/gpu.present") == "true"]
    assert len(gpu_workers) == 1
    mounts = [m["containerPath"] for m in gpu_workers[0]["extraMounts"]
              if m["containerPath"].startswith("/var/run/nvidia-container-devices/")]
    assert mounts == ["/var/run/nvidia-container-devices/all"]
