"""CPU and memory of the GPU tasks: the defaults fit the smallest workstation the runbook supports, the
profiles compile to what they say, bad flags are one-line usage errors. The scheduler's rule applied here
(a pod fits a node when its requests fit the node's allocatable minus what is already requested there:
kubernetes pkg/scheduler/framework/plugins/noderesources/fit.go, `fitsRequest`) is a contract test."""
from __future__ import annotations

import pytest
import yaml

from pipelines import resources
from pipelines.cli import main
from pipelines.sam_finetune import DEFAULT_YAML

# /proc/meminfo MemTotal of a 16 GiB and a 32 GiB workstation (firmware and kernel keep a few hundred MiB).
MEM_16GB, MEM_32GB = "16265728Ki", "32826736Ki"
SMALL, LARGE = "4 cores / 16 GB", "8 cores / 32 GB"


def _gpu_resources(path) -> dict[str, dict]:
    spec = next(yaml.safe_load_all(path.read_text()))
    return {t: spec["deploymentSpec"]["executors"][f"exec-{t}"]["container"]["resources"] for t in resources.GPU_TASKS}


def test_the_defaults_are_the_smallest_profile_and_fit_a_4_core_16_gb_host():
    assert resources.DEFAULTS == resources.PROFILES[SMALL]
    lines, ok = resources.report("4", MEM_16GB, host=True)
    assert ok and lines[-1].startswith(f"largest profile that fits: {SMALL}: sam-pipeline compile --cpu embed=2")
    # The larger profile is larger for a reason: it would never schedule on the small host.
    too_big = resources.misfits(resources.PROFILES[LARGE], "4", MEM_16GB)
    assert "finetune requests 6 CPU, the node has 3900m left (Insufficient cpu)" in too_big
    assert any("finetune requests 16Gi" in p and "(Insufficient memory)" in p for p in too_big)
    lines, ok = resources.report("8", MEM_32GB, host=True)
    assert ok and f"largest profile that fits: {LARGE}" in lines[-1]


def test_a_host_too_small_for_every_profile_gets_flags_that_fit_it():
    for cpu, memory in (("2", "8Gi"), ("2", "16Gi"), ("8", "6Gi")):
        lines, ok = resources.report(cpu, memory)
        assert not ok and "these flags do: sam-pipeline compile" in lines[-1]
        assert resources.misfits(resources.fitted(cpu, memory), cpu, memory) == []
    assert any("embed requests 2 CPU, the node has 1900m left (Insufficient cpu)" in line
               for line in resources.report("2", "8Gi")[0])


def test_the_committed_pipeline_requests_the_defaults():
    for task, res in _gpu_resources(DEFAULT_YAML).items():
        want = resources.DEFAULTS[task]
        assert res["resourceCpuRequest"] == want.cpu and res["resourceMemoryRequest"] == want.memory, task
        assert res["resourceMemoryLimit"] == want.memory_limit and "resourceCpuLimit" not in res, task


def test_the_profile_flags_compile_to_the_profile(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["compile", "-o", str(out), *resources.flags(resources.PROFILES[LARGE]).split()]) == 0
    for task, res in _gpu_resources(out).items():
        want = resources.PROFILES[LARGE][task]
        assert (res["resourceCpuRequest"], res["resourceMemoryRequest"], res["resourceMemoryLimit"]) == \
            (want.cpu, want.memory, want.memory_limit), task
    assert main(["compile", "-o", str(out), "--cpu", "finetune=3:4", "--memory", "embed=12Gi"]) == 0
    res = _gpu_resources(out)
    assert res["finetune"]["resourceCpuRequest"] == "3" and res["finetune"]["resourceCpuLimit"] == "4"
    # A request above the default limit without a limit of its own raises the limit to the request.
    assert res["embed"]["resourceMemoryRequest"] == res["embed"]["resourceMemoryLimit"] == "12Gi"


@pytest.mark.parametrize("flag,value,needle", [
    ("--cpu", "train=2", "TASK one of embed, finetune, evaluate"),
    ("--cpu", "finetune=two", "'two' is not a CPU quantity"),
    ("--cpu", "finetune=0", "the request must be above zero"),
    ("--memory", "evaluate=8GB", "'8GB' is not a memory quantity"),
    ("--memory", "finetune=8Gi:4Gi", "the limit is below the request"),
])
def test_bad_resource_flags_are_one_line_usage_errors(tmp_path, capsys, flag, value, needle):
    assert main(["compile", "-o", str(tmp_path / "x.yaml"), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sam-pipeline: error: argument {flag}: ") and needle in err and err.count("\n") == 1
    assert not (tmp_path / "x.yaml").exists()


def test_the_preflight_entry_point(capsys):
    assert resources.main(["--host", "4", MEM_16GB]) == 0
    assert resources.main(["2", "8Gi"]) == 1
    assert resources.main(["4"]) == 2 and resources.main(["4", "lots"]) == 2
    assert "'lots' is not a memory quantity" in capsys.readouterr().err
