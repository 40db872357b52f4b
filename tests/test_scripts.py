"""The shell scripts behind the kind targets: bash -n and shellcheck on every one, and real runs of the
preflight and the GPU smoke check against fake tools on PATH (what they print, what they count as
missing, when they stop). What `make kind-up` runs is read from `make -n`.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from test_manifests import ROOT, SCRIPTS
from test_runbook import make_dry

# --- syntax ----------------------------------------------------------------------------------------

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
  *"apply -f -"*) cat > {tmp_path / "applied.json"};;
  *" get pod nvidia-smi "*)
    n=$(grep -c ' get pod nvidia-smi ' {calls})
    line=$(sed -n "${{n}}p" {answers}); [ -n "$line" ] || line=$(tail -n1 {answers})
    printf '%s' "$line";;
  *" logs "*) echo 'GPU 0: NVIDIA H100 (UUID: GPU-0)';;
  *" describe "*) echo 'Events: ...';;
esac"""
    env = {"PATH": make_fake_path(tmp_path, {"kubectl": kubectl, "sleep": f'echo "sleep $*" >> {calls}'}),
           "GPU_CHECK_TIMEOUT": timeout, "HOME": str(tmp_path), "SAM_PYTHON": sys.executable}
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


def test_gpu_check_applies_the_compiled_task_pod_without_a_runtime_class(tmp_path):
    """The pod KFP would make for finetune (pipelines/gpu_pod.py reads the compiled YAML), not a copy."""
    import json

    from pipelines.gpu_pod import task_pod

    proc, calls = run_gpu_check(tmp_path, ["Succeeded "])
    assert proc.returncode == 0, proc.stderr
    applied = json.loads((tmp_path / "applied.json").read_text())
    assert applied == task_pod() and "runtimeClassName" not in applied["spec"]
    assert "shaped as the 'finetune' task of" in proc.stdout


def test_gpu_check_needs_the_projects_python(tmp_path):
    env = {"PATH": make_fake_path(tmp_path, {}), "SAM_PYTHON": str(tmp_path / "nope"), "HOME": str(tmp_path)}
    proc = subprocess.run([shutil.which("bash"), str(ROOT / "scripts" / "gpu-check.sh")], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "run 'make setup' first" in proc.stderr


def test_gpu_check_gives_up_after_its_timeout(tmp_path):
    proc, calls = run_gpu_check(tmp_path, ["Pending "], timeout="4s")
    assert proc.returncode == 1 and "did not succeed within 4s (phase Pending)" in proc.stderr
    assert [c for c in calls if c.startswith("sleep")] == ["sleep 2", "sleep 2"]


# --- kind-up ---------------------------------------------------------------------------------------

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


# --- sizing of the GPU tasks -------------------------------------------------------------------------

PYTHON3 = f"exec {sys.executable} \"$@\""  # the stdlib-only pipelines.resources: any python3 will do


def test_preflight_sizes_the_gpu_tasks_from_the_kind_worker(tmp_path):
    """Contract test of `kubectl get nodes -o jsonpath` (status.allocatable as the API returns it): a worker
    of a 4-core host fits the compile defaults; one of a 2-core host gets the flags that fit it."""
    def kubectl(alloc):
        return ('case "$*" in *"get nodes -l nvidia.com/gpu.present=true"*) printf "%s" "' + alloc + '";; '
                "*) printf 'Client Version: v1.33.1\\n';; esac")
    proc = run_preflight(tmp_path / "4", dict(HEALTHY, python3=PYTHON3, kubectl=kubectl("4 16163328Ki")), CTK_OK)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"ok +GPU task sizing \(GPU node of kind-sam-pipeline\) +the compile defaults fit", proc.stdout)
    assert "largest profile that fits: 4 cores / 16 GB" in proc.stdout
    proc = run_preflight(tmp_path / "2", dict(HEALTHY, python3=PYTHON3, kubectl=kubectl("2 8029624Ki")), CTK_OK)
    assert proc.returncode == 0  # a warning, not a missing piece: smaller flags make the pipeline run
    assert "warning  GPU task sizing (GPU node of kind-sam-pipeline)" in proc.stdout
    assert "embed requests 2 CPU, the node has 1900m left (Insufficient cpu)" in proc.stdout
    assert "these flags do: sam-pipeline compile --cpu embed=1700m" in proc.stdout


def test_preflight_sizes_from_the_host_before_the_cluster_exists(tmp_path):
    meminfo = tmp_path / "meminfo"
    tmp_path.mkdir(exist_ok=True)
    meminfo.write_text("MemTotal:       32826736 kB\nMemFree:         1000 kB\n")
    no_cluster = 'case "$*" in *"get nodes"*) echo "context kind-sam-pipeline not found" >&2; exit 1;; ' \
                 "*) printf 'Client Version: v1.33.1\\n';; esac"
    fakes = dict(HEALTHY, python3=PYTHON3, kubectl=no_cluster, nproc="echo 8")
    config = tmp_path / "config.toml"
    config.write_text(CTK_OK)
    env = {"PATH": make_fake_path(tmp_path, fakes), "NVIDIA_CTK_CONFIG": str(config), "HOME": str(tmp_path),
           "MEMINFO": str(meminfo)}
    proc = subprocess.run([shutil.which("bash"), str(ROOT / "scripts" / "preflight.sh")], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "GPU task sizing (host (no kind GPU node yet))" in proc.stdout
    assert "largest profile that fits: 8 cores / 32 GB: sam-pipeline compile --cpu embed=6" in proc.stdout


def test_preflight_without_python3_says_it_cannot_size(tmp_path):
    proc = run_preflight(tmp_path, HEALTHY, CTK_OK)
    assert proc.returncode == 0 and "GPU task sizing" in proc.stdout and "python3 not on PATH" in proc.stdout
