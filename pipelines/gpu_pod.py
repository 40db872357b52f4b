"""The GPU smoke pod of scripts/gpu-check.sh, shaped like the pod KFP 2.17 makes for a GPU task of the
compiled pipeline: the same node selector, tolerations, accelerator limit, CPU and memory, and no
runtimeClassName (the KFP kubernetes platform spec has no field for one, so a task pod gets the GPU only when
the nvidia runtime is containerd's default on the node). Everything is read from the compiled YAML:
`python -m pipelines.gpu_pod [--task finetune] [--yaml pipelines/sam_finetune.yaml]` prints the pod as JSON.

How the driver builds a task pod (kubeflow/pipelines 2.17.0): backend/src/v2/driver/driver.go
`initPodSpecPatch` (resourceCpuRequest/Limit, resourceMemoryRequest/Limit, the accelerator as
`limits[<resourceType>] = <resourceCount>`) and backend/src/v2/driver/k8s.go (nodeSelector labels, tolerations).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from components.errors import UserError

DEFAULT_YAML = Path(__file__).with_name("sam_finetune.yaml")
POD_NAME = "nvidia-smi"
# nvidia-smi and the driver libraries come from the nvidia runtime, so any glibc userland will do.
IMAGE = "docker.io/library/ubuntu:24.04"
_RESOURCES = (("resourceCpuRequest", "requests", "cpu"), ("resourceMemoryRequest", "requests", "memory"),
              ("resourceCpuLimit", "limits", "cpu"), ("resourceMemoryLimit", "limits", "memory"))


class GpuPodError(UserError):
    """The compiled YAML has no such GPU task."""


def task_pod(pipeline_yaml: Path = DEFAULT_YAML, task: str = "finetune") -> dict:
    """The smoke pod for `task`'s placement and resources in the compiled pipeline."""
    spec, platform = list(yaml.safe_load_all(Path(pipeline_yaml).read_text()))[:2]
    executor = f"exec-{task}"
    container = spec["deploymentSpec"]["executors"].get(executor, {}).get("container")
    accelerator = (container or {}).get("resources", {}).get("accelerator")
    if not accelerator:
        raise GpuPodError(f"{pipeline_yaml}: no GPU task {task!r} (executor {executor} asks for no accelerator)")
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].get(executor, {})
    resources: dict = {"limits": {accelerator["resourceType"]: accelerator["resourceCount"]}}
    for field, kind, name in _RESOURCES:
        if field in container["resources"]:
            resources.setdefault(kind, {})[name] = container["resources"][field]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": POD_NAME, "namespace": "default",
                     "labels": {"app.kubernetes.io/name": "sam-pipeline-gpu-check", "sam-pipeline/shaped-as": task}},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": k8s.get("nodeSelector", {}).get("labels", {}),
            "tolerations": [{k: t[k] for k in ("key", "operator", "value", "effect") if t.get(k)}
                            for t in k8s.get("tolerations", [])],
            "containers": [{
                "name": POD_NAME, "image": IMAGE, "command": ["nvidia-smi", "-L"], "resources": resources,
                "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "runAsUser": 65534,
                                    "capabilities": {"drop": ["ALL"]}}}],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.gpu_pod", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="finetune")
    parser.add_argument("--yaml", type=Path, default=DEFAULT_YAML)
    args = parser.parse_args(argv)
    try:
        print(json.dumps(task_pod(args.yaml, args.task), indent=2))
    except (UserError, OSError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
