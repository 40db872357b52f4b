"""Kubernetes side, validated offline: manifests against the Kubernetes 1.31+ schemas (strict), local
kustomizations rendered with kubectl, remote bases checked structurally, the kind config's GPU worker
against the compiled pipeline's placement, and the shell scripts with bash -n, shellcheck and real runs
of the preflight against fake tools on PATH.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
KIND_CONFIG = MANIFESTS / "kind" / "cluster.yaml"
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))
MK = ROOT / "mk" / "kubernetes.mk"
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
    assert ds["runtimeClassName"] == docs["RuntimeClass"]["metadata"]["name"] == "nvidia"
    assert docs["RuntimeClass"]["handler"] == "nvidia"


def test_smoke_pod_requests_a_gpu_where_the_pipeline_would():
    pod = gpu_docs()["Pod"]["spec"]
    [ctr] = pod["containers"]
    assert ctr["resources"]["limits"][GPU_RESOURCE] == 1
    assert "nvidia-smi" in ctr["command"]
    assert selector_fits(pod["nodeSelector"], worker_labels())
    assert all(tolerates(pod["tolerations"], t) for t in worker_taints())


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
    expected = {f"localhost/sam-pipeline-{s}:0.1.0" for s in
                ("fetch-weights", "ingest-dataset", "finetune", "evaluate", "register-model")}
    assert images == expected, "compiled images differ from what `make images kind-load` provides"


# --- scripts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_syntax_and_shellcheck(script):
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    subprocess.run(["bash", "-n", str(script)], check=True)
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    proc = subprocess.run(["shellcheck", "--severity=style", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def make_fake_path(tmp_path: Path, fakes: dict[str, str]) -> str:
    """A PATH with only the basic utilities the scripts use, plus fake tools (shell snippets)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "cat", "grep", "head", "tail", "sed", "printf", "dirname"):
        real = shutil.which(tool)
        if real:
            (bin_dir / tool).symlink_to(real)
    for name, body in fakes.items():
        f = bin_dir / name
        f.write_text(f"#!{shutil.which('bash')}\n{body}\n")
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return str(bin_dir)


def run_preflight(tmp_path, fakes, config_text=None, *args):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "config.toml"
    if config_text is not None:
        config.write_text(config_text)
    env = {"PATH": make_fake_path(tmp_path, fakes), "NVIDIA_CTK_CONFIG": str(config), "HOME": str(tmp_path)}
    return subprocess.run([shutil.which("bash"), str(ROOT / "scripts" / "preflight.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=30)


def fake_nvidia_smi(driver: str) -> str:
    return f"""case "$*" in
  -L) echo 'GPU 0: NVIDIA H100 (UUID: GPU-0)';;
  *--query-gpu=driver_version*) echo {driver};;
  *) exit 2;;
esac"""


def fake_sysctl(instances: int, watches: int) -> str:
    return f"""[ "$1" = -n ] || exit 2
case "$2" in
  fs.inotify.max_user_instances) echo {instances};;
  fs.inotify.max_user_watches) echo {watches};;
  *) exit 1;;
esac"""


HEALTHY = {
    "docker": 'case "$1" in info) [ "${2:-}" = --format ] && echo nvidia; exit 0;; version) echo 28.2.2;; esac',
    "kind": "echo kind v0.29.0 go1.24.2 linux/amd64",
    "kubectl": "printf 'Client Version: v1.33.1\\nKustomize Version: v5.6.0\\n'",
    "helm": "echo v3.18.0",
    "git": "echo git version 2.43.0",
    "nvidia-smi": fake_nvidia_smi("580.65.06"),
    "nvidia-ctk": "echo NVIDIA Container Toolkit CLI version 1.17.8",
    "sysctl": fake_sysctl(8192, 524288),
}
CTK_OK = "[nvidia-container-runtime]\naccept-nvidia-visible-devices-as-volume-mounts = true\n"


def test_preflight_lists_every_missing_piece_with_its_fix(tmp_path):
    proc = run_preflight(tmp_path, {})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    for piece, fix in [("docker", "docs.docker.com"), ("kind", "sigs.k8s.io/kind"), ("kubectl", "kubernetes.io"),
                       ("git", "apt-get install -y git"), ("NVIDIA driver", "nvidia.com/download"),
                       ("nvidia-ctk", "container-toolkit"),
                       ("accept-nvidia-visible-devices-as-volume-mounts",
                        "nvidia-ctk config --set accept-nvidia-visible-devices-as-volume-mounts=true")]:
        assert re.search(rf"MISSING\s+.*{re.escape(piece)}", out), f"{piece} not reported:\n{out}"
        assert fix in out, f"no fix for {piece}:\n{out}"
    assert "preflight FAILED: 7 missing" in out
    # helm is for the GPU Operator route only; its absence is noted, not counted.
    assert not re.search(r"MISSING\s+helm", out) and "not needed for 'make kind-up'" in out


def test_preflight_passes_on_a_ready_host(tmp_path):
    proc = run_preflight(tmp_path, HEALTHY, CTK_OK)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MISSING" not in proc.stdout and "preflight passed" in proc.stdout


def test_preflight_flags_docker_default_runtime_and_mount_flag(tmp_path):
    fakes = dict(HEALTHY, docker='case "$1" in info) [ "${2:-}" = --format ] && echo runc; exit 0;; version) echo 28;; esac')
    proc = run_preflight(tmp_path, fakes, "accept-nvidia-visible-devices-as-volume-mounts = false\n")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert "default runtime is 'runc'" in out
    assert "nvidia-ctk runtime configure --runtime=docker --set-as-default" in out
    assert "preflight FAILED: 2 missing" in out


def test_preflight_enforces_the_versions_it_prints(tmp_path):
    fakes = dict(HEALTHY, kind="echo kind v0.20.0 go1.20.4 linux/amd64",
                 kubectl="printf 'Client Version: v1.29.3\\nKustomize Version: v5.0.4\\n'")
    proc = run_preflight(tmp_path, fakes, CTK_OK)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert re.search(r"MISSING\s+kind >= v0\.29\.0\s+found 'kind v0\.20\.0", out), out
    assert "go install sigs.k8s.io/kind@v0.29.0" in out
    assert re.search(r"MISSING\s+kubectl >= v1\.31\s+found 'Client Version: v1\.29\.3'", out), out
    assert "preflight FAILED: 2 missing" in out
    # Newer minors and patch levels pass (numeric, not string, comparison: 0.100 > 0.29).
    fakes = dict(HEALTHY, kind="echo kind v0.100.0", kubectl="echo Client Version: v1.31.0")
    assert run_preflight(tmp_path / "newer", fakes, CTK_OK).returncode == 0


def test_preflight_requires_an_r580_driver_for_the_cuda13_images(tmp_path):
    proc = run_preflight(tmp_path, dict(HEALTHY, **{"nvidia-smi": fake_nvidia_smi("570.172.08")}), CTK_OK)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert re.search(r"MISSING\s+NVIDIA driver >= R580\s+driver 570\.172\.08 is too old", out), out
    assert "torch 2.14.1's CUDA 13 build" in out and "install an R580+ driver" in out
    ok = run_preflight(tmp_path / "ok", HEALTHY, CTK_OK).stdout
    assert re.search(r"ok\s+NVIDIA driver >= R580\s+580\.65\.06", ok), ok


def test_preflight_checks_inotify_watches_and_instances(tmp_path):
    proc = run_preflight(tmp_path, dict(HEALTHY, sysctl=fake_sysctl(128, 8192)), CTK_OK)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert "sudo sysctl -w fs.inotify.max_user_watches=524288" in out
    assert "sudo sysctl -w fs.inotify.max_user_instances=512" in out
    assert "preflight FAILED: 2 missing: fs.inotify.max_user_instances >= 512, fs.inotify.max_user_watches >= 524288" in out
    proc = run_preflight(tmp_path / "watches", dict(HEALTHY, sysctl=fake_sysctl(512, 524287)), CTK_OK)
    assert "preflight FAILED: 1 missing: fs.inotify.max_user_watches" in proc.stderr


def test_preflight_requires_helm_only_for_the_gpu_operator_route(tmp_path):
    no_helm = {k: v for k, v in HEALTHY.items() if k != "helm"}
    assert run_preflight(tmp_path, no_helm, CTK_OK).returncode == 0
    proc = run_preflight(tmp_path / "operator", no_helm, CTK_OK, "--gpu-operator")
    assert proc.returncode == 1 and re.search(r"MISSING\s+helm", proc.stdout) and "helm.sh" in proc.stdout


def test_preflight_flags_a_broken_driver(tmp_path):
    fakes = dict(HEALTHY, **{"nvidia-smi": "echo 'NVIDIA-SMI has failed because it could not communicate' ; exit 9"})
    proc = run_preflight(tmp_path, fakes, CTK_OK)
    assert proc.returncode == 1 and "could not communicate" in proc.stdout


def run_gpu_check(tmp_path, statuses: list[str], timeout: str = "300s"):
    """scripts/gpu-check.sh against a fake kubectl whose `get pod` answers the given "<phase> <waiting
    reason>" lines in turn (the last one repeats) and a fake sleep; returns the run and the calls made."""
    calls = tmp_path / "calls"
    answers = tmp_path / "answers"
    answers.write_text("\n".join(statuses) + "\n")
    kubectl = f"""echo "kubectl $*" >> {calls}
case "$*" in
  *" get pod nvidia-smi "*)
    n=$(grep -c ' get pod nvidia-smi ' {calls})
    line=$(sed -n "${{n}}p" {answers}); [ -n "$line" ] || line=$(tail -n1 {answers})
    printf '%s' "$line";;
  *" logs "*) echo 'GPU 0: NVIDIA H100 (UUID: GPU-0)';;
  *" describe "*) echo 'Events: ...';;
esac"""
    env = {"PATH": make_fake_path(tmp_path, {"kubectl": kubectl, "sleep": f'echo "sleep $*" >> {calls}'}),
           "GPU_CHECK_TIMEOUT": timeout, "HOME": str(tmp_path)}
    proc = subprocess.run([shutil.which("bash"), str(ROOT / "scripts" / "gpu-check.sh")], env=env,
                          capture_output=True, text=True, timeout=30)
    return proc, calls.read_text().splitlines()


def test_gpu_check_stops_at_once_when_the_pod_fails(tmp_path):
    proc, calls = run_gpu_check(tmp_path, ["Failed "])
    assert proc.returncode == 1
    assert "GPU check FAILED: pod nvidia-smi failed" in proc.stderr
    assert len([c for c in calls if " get pod nvidia-smi " in c]) == 1, calls
    assert not [c for c in calls if c.startswith("sleep")], "waited after the pod had failed"
    assert any(" describe pod nvidia-smi" in c for c in calls) and "Events:" in proc.stderr


def test_gpu_check_stops_at_once_when_the_container_cannot_start(tmp_path):
    proc, calls = run_gpu_check(tmp_path, ["Pending ContainerCreating", "Pending ErrImagePull"])
    assert proc.returncode == 1 and "cannot run its container: ErrImagePull" in proc.stderr
    assert len([c for c in calls if c.startswith("sleep")]) == 1, calls


def test_gpu_check_passes_and_waits_for_a_pending_pod(tmp_path):
    proc, calls = run_gpu_check(tmp_path, ["Pending ", "Running ", "Succeeded "])
    assert proc.returncode == 0, proc.stderr
    assert "GPU check passed" in proc.stdout and "NVIDIA H100" in proc.stdout
    assert len([c for c in calls if c.startswith("sleep")]) == 2


def test_gpu_check_gives_up_after_its_timeout(tmp_path):
    proc, calls = run_gpu_check(tmp_path, ["Pending "], timeout="4s")
    assert proc.returncode == 1 and "did not succeed within 4s (phase Pending)" in proc.stderr
    assert [c for c in calls if c.startswith("sleep")] == ["sleep 2", "sleep 2"]


# --- make fragment and runbook ---------------------------------------------------------------------

def mk_targets() -> set[str]:
    targets = set(re.findall(r"^([a-z][\w-]*):(?!=)", MK.read_text(), re.M))
    return targets | {f"image-{s}" for s in re.search(r"^IMAGE_STEPS := (.+)$", MK.read_text(), re.M).group(1).split()}


def make_dry(*args: str) -> str:
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    proc = subprocess.run(["make", "-n", "-f", str(MK), *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_targets_exist():
    required = {"images", "kind-load", "kind-up", "kind-down", "kind-submit", "kind-schedule",
                "kind-model-registry", "preflight", "kind-gpu-check"}
    assert required <= mk_targets(), required - mk_targets()


def test_kind_submit_and_schedule_commands():
    package = ROOT / "build" / "sam_finetune.yaml"
    out = make_dry("kind-submit", "SUBMIT_ARGS=-p n_iterations=5", "IMAGE_TAG=0.2.0").replace("\\\n", " ")
    # The package for the images just built goes to build/, never over the committed YAML.
    assert f"compile --registry localhost --tag 0.2.0 -o {package}" in out
    assert "port-forward.sh kubeflow ml-pipeline-ui 8080:80 --" in out
    assert re.search(rf"sam-pipeline submit --host http://localhost:8080 --package {package} .*--wait\s+-p n_iterations=5", out)
    out = make_dry("kind-schedule").replace("\\\n", " ")
    assert re.search(rf'schedule --host http://localhost:8080 --package {package} .*--cron "0 0 3 \* \* \*"', out)


def test_kind_up_does_not_need_helm():
    """Nothing in `make kind-up` uses helm: not the make recipe, not the scripts it runs (the preflight
    passing without helm is tested above)."""
    out = make_dry("kind-up")
    assert "helm" not in out
    scripts = re.findall(r"scripts/[\w-]+\.sh", out)
    assert "scripts/preflight.sh" in scripts and "scripts/kind-up.sh" in scripts
    ran = set(scripts) | set(re.findall(r"scripts/[\w-]+\.sh", (ROOT / "scripts" / "kind-up.sh").read_text()))
    for script in ran - {"scripts/preflight.sh"}:
        assert "helm" not in (ROOT / script).read_text(), f"{script} uses helm"


def test_kind_up_configures_containerd_like_upstream_nvkind():
    """NVIDIA/nvkind PR #76: --config-source=file (command mis-detects the config version on containerd
    2.x); plus --set-as-default, since KFP task pods cannot choose a runtime class."""
    text = (ROOT / "scripts" / "kind-up.sh").read_text()
    [configure] = re.findall(r"nvidia-ctk runtime configure [^\n]*", text)
    assert "--runtime=containerd" in configure and "--config-source=file" in configure
    assert "--set-as-default" in configure and "--config-source=command" not in text


def test_kind_load_sends_gpu_images_to_gpu_nodes_only():
    out = make_dry("kind-load", "IMAGE_TAG=1.2.3")
    light, gpu = out.split("--nodes", 1)
    for s in ("fetch-weights", "ingest-dataset", "register-model"):
        assert f"localhost/sam-pipeline-{s}:1.2.3" in light
    for s in ("finetune", "evaluate"):
        assert f"localhost/sam-pipeline-{s}:1.2.3" in gpu and s not in light
    assert "-l nvidia.com/gpu.present=true" in out


def test_runbook_only_uses_existing_targets():
    text = DOCS.read_text()
    lead_targets = {"run", "test", "compile", "setup", "demo"}
    used = set(re.findall(r"\bmake ((?:kind-|image|preflight)[\w-]*)", text))
    assert used, "the runbook should show the make targets"
    assert used <= mk_targets() | lead_targets, used - mk_targets()


def kfp_commands(text: str) -> list[list[str]]:
    """`kfp ...` invocations in the runbook's code blocks, continuation lines joined."""
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S)
    cmds = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("kfp "):
                cmds.append(shlex.split(line))
    return cmds


def group_rest(group, ctx, args: list[str]) -> list[str]:
    """What a click group leaves for its subcommand: the subcommand name first (click 8.2+ keeps it
    apart in _protected_args, older click in protected_args)."""
    group.parse_args(ctx, args)
    protected = getattr(ctx, "_protected_args", None)
    if protected is None:
        protected = ctx.protected_args
    return [*protected, *ctx.args]


def test_runbook_kfp_cli_commands_parse_with_kfp_2_17(tmp_path, monkeypatch):
    """The plain `kfp` equivalents in the runbook must be valid for the installed CLI (e.g. in
    `kfp run create`, -p means pipeline id, not parameter). Parsed by the CLI's own click definitions,
    without contacting a server."""
    import click
    from kfp.cli import cli as kfp_cli

    cmds = kfp_commands(DOCS.read_text())
    assert any(c[c.index("run") + 1] == "create" for c in cmds if "run" in c), "no `kfp run create` example"
    assert any("recurring-run" in c for c in cmds), "no `kfp recurring-run create` example"
    # Package paths are checked for existence by click: give them something to find.
    monkeypatch.chdir(tmp_path)
    for argv in cmds:
        for a in argv:
            if a.endswith((".yaml", ".yml")) and not a.startswith("-"):
                (tmp_path / a).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / a).touch()
        cmd: click.Command = kfp_cli.cli
        ctx = click.Context(cmd, info_name="kfp")
        rest = group_rest(cmd, ctx, list(argv[1:]))
        while isinstance(cmd, click.Group):
            assert rest, f"{shlex.join(argv)}: no subcommand"
            name, cmd, rest = cmd.resolve_command(ctx, rest)
            if isinstance(cmd, click.Group):
                ctx = click.Context(cmd, info_name=name, parent=ctx)
                rest = group_rest(cmd, ctx, rest)
        try:
            leaf = cmd.make_context(name, rest, parent=ctx)
        except click.ClickException as e:
            pytest.fail(f"{shlex.join(argv)}: {e.format_message()}")
        params = leaf.params
        assert "=" not in (params.get("pipeline_id") or ""), (
            f"{shlex.join(argv)}: -p is --pipeline-id in `kfp run create`; parameters are bare key=value")
        if "cron_expression" in params and params["cron_expression"]:
            assert len(params["cron_expression"].split()) == 6, f"KFP cron has 6 fields (seconds first): {argv}"
        for kv in params.get("args") or ():
            assert "=" in kv, f"{shlex.join(argv)}: pipeline parameters are key=value after the options"


# --- air-gapped path of the runbook -----------------------------------------------------------------

def test_air_gapped_dataset_source_is_the_staged_uri(store, tmp_path):
    """Runbook section 3: after `sam-pipeline ingest` staged a dataset from a workstation, the pipeline's
    ingest step pointed at the printed dataset_uri (no internet) must find the same version and upload
    nothing. Also a raw zip dropped into the store works as a source."""
    from components.datasets.ingest import ingest
    from components.datasets.synthetic import make_pennfudan_zip

    zip_path = make_pennfudan_zip(tmp_path / "PennFudanPed.zip", n_fudan=3, n_penn=3, seed=1, size_range=(48, 72))
    staged = ingest(str(zip_path), "penn-fudan", "penn-fudan", store, seed=0)
    again = ingest(staged.dataset_uri, "auto", "penn-fudan", store, seed=0)
    assert (again.content_hash, again.uploaded) == (staged.content_hash, 0)
    store.put_file(store.key("incoming", "PennFudanPed.zip"), zip_path)
    dropped = ingest(store.uri(store.key("incoming", "PennFudanPed.zip")), "auto", "penn-fudan", store, seed=0)
    assert (dropped.content_hash, dropped.uploaded) == (staged.content_hash, 0)
