"""CPU and memory of the GPU tasks (embed, finetune, evaluate): the defaults, the workstation profiles the
runbook lists, Kubernetes quantities, and whether a node can ever schedule them.

A task pod whose request exceeds what the node has left stays Pending forever (`0/2 nodes are available:
1 Insufficient cpu`). The defaults fit the smallest host the runbook supports (4 cores, 16 GB, one GPU) on a
kind GPU worker, which also runs kindnet (it requests 100m CPU and 50Mi on every node). Only one GPU task
runs on a one-GPU node at a time, so each must fit alone. No CPU limit by default: a limit only throttles the
data loading of the one task on the node. Memory limits stop a runaway task before the host's OOM killer
picks a victim among the nodes (all kind nodes share the host's memory).

Standard library only: `make preflight` runs `python3 -m pipelines.resources` before any venv exists.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass

GPU_TASKS = ("embed", "finetune", "evaluate")
# What else the GPU worker schedules: kindnet's requests (kind v0.29 manifests, kindnetd: cpu 100m,
# memory 50Mi); kube-proxy and the NVIDIA device plugin request nothing (manifests/gpu).
NODE_OVERHEAD_MILLICORES = 100
NODE_OVERHEAD_BYTES = 50 * 2**20
# kubelet's default eviction threshold (memory.available<100Mi) is taken off a node's allocatable memory; a
# kind node's capacity is the host's, so before a cluster exists the host's memory minus this is a node's.
EVICTION_BYTES = 100 * 2**20


@dataclass(frozen=True)
class Resources:
    cpu: str                       # request
    memory: str                    # request
    cpu_limit: str | None = None
    memory_limit: str | None = None


# The workstation profiles of docs/kubernetes.md ("Sizing the GPU tasks"); the first is the default.
PROFILES = {
    "4 cores / 16 GB": {"embed": Resources("2", "4Gi", None, "8Gi"),
                        "finetune": Resources("2", "6Gi", None, "10Gi"),
                        "evaluate": Resources("2", "4Gi", None, "8Gi")},
    "8 cores / 32 GB": {"embed": Resources("6", "8Gi", None, "12Gi"),
                        "finetune": Resources("6", "16Gi", None, "24Gi"),
                        "evaluate": Resources("6", "8Gi", None, "16Gi")},
}
DEFAULTS = PROFILES["4 cores / 16 GB"]

_CPU = re.compile(r"^(\d+(\.\d{1,3})?|\d+m)$")
_MEMORY = re.compile(r"^(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def millicores(q: str) -> int:
    """A Kubernetes CPU quantity ("2", "1.5", "500m") in millicores; ValueError otherwise."""
    if not _CPU.match(str(q)):
        raise ValueError(f"{q!r} is not a CPU quantity (e.g. 2, 1.5, 500m)")
    return int(q[:-1]) if q.endswith("m") else round(float(q) * 1000)


def memory_bytes(q: str) -> int:
    """A Kubernetes memory quantity ("6Gi", "512Mi", "8G", bytes) in bytes; ValueError otherwise."""
    m = _MEMORY.match(str(q))
    if not m:
        raise ValueError(f"{q!r} is not a memory quantity (e.g. 6Gi, 512Mi)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def parse_flag(text: str, kind: str) -> tuple[str, str, str | None]:
    """`TASK=REQUEST[:LIMIT]` of --cpu (kind "cpu") or --memory (kind "memory") as (task, request, limit)."""
    task, sep, value = text.partition("=")
    if not sep or task not in GPU_TASKS:
        raise ValueError(f"{text!r}: expected TASK=REQUEST[:LIMIT] with TASK one of {', '.join(GPU_TASKS)}")
    request, _, limit = value.partition(":")
    size = millicores if kind == "cpu" else memory_bytes
    if size(request) <= 0:
        raise ValueError(f"{text!r}: the request must be above zero")
    if limit and size(limit) < size(request):
        raise ValueError(f"{text!r}: the limit is below the request")
    return task, request, limit or None


def _kept(old_limit: str | None, request: str, size) -> str | None:
    """A flag without a limit keeps the old one, raised to the new request if it was below it."""
    return None if old_limit is None else max(old_limit, request, key=size)


def with_flags(base: dict[str, Resources], cpu: list | None, memory: list | None) -> dict[str, Resources]:
    """`base` with parsed --cpu and --memory flags applied ((task, request, limit) tuples)."""
    out = dict(base)
    for task, request, limit in cpu or ():
        r = out[task]
        out[task] = Resources(request, r.memory, limit or _kept(r.cpu_limit, request, millicores), r.memory_limit)
    for task, request, limit in memory or ():
        r = out[task]
        out[task] = Resources(r.cpu, request, r.cpu_limit, limit or _kept(r.memory_limit, request, memory_bytes))
    return out


def flags(resources: dict[str, Resources]) -> str:
    """The `sam-pipeline compile` flags that give these resources."""
    words = []
    for task, r in resources.items():
        words.append(f"--cpu {task}={r.cpu}" + (f":{r.cpu_limit}" if r.cpu_limit else ""))
        words.append(f"--memory {task}={r.memory}" + (f":{r.memory_limit}" if r.memory_limit else ""))
    return " ".join(words)


def misfits(resources: dict[str, Resources], cpu: str, memory: str) -> list[str]:
    """Why a GPU node with this allocatable CPU and memory could never run each task (empty: all fit)."""
    free_m = millicores(cpu) - NODE_OVERHEAD_MILLICORES
    free_b = memory_bytes(memory) - NODE_OVERHEAD_BYTES
    out = []
    for task, r in resources.items():
        if millicores(r.cpu) > free_m:
            out.append(f"{task} requests {r.cpu} CPU, the node has {free_m}m left (Insufficient cpu)")
        for what, q in (("requests", r.memory), ("may use (limit)", r.memory_limit)):
            if q and memory_bytes(q) > free_b:
                out.append(f"{task} {what} {q}, the node has {free_b / 2**30:.1f}Gi left"
                           + (" (Insufficient memory)" if what == "requests" else ""))
    return out


def fitted(cpu: str, memory: str) -> dict[str, Resources]:
    """The defaults cut down to a node too small for every profile: 90 % of the CPU it has left, requests
    of at most 40 % and limits of at most 75 % of its memory (the rest of the host needs some too)."""
    free_m = millicores(cpu) - NODE_OVERHEAD_MILLICORES
    free_b = memory_bytes(memory) - NODE_OVERHEAD_BYTES
    cpu_m = max(100, free_m * 9 // 10 // 100 * 100)
    out = {}
    for task, r in DEFAULTS.items():
        request = min(memory_bytes(r.memory), free_b * 2 // 5) // 2**20
        limit = min(memory_bytes(r.memory_limit), free_b * 3 // 4) // 2**20
        out[task] = Resources(f"{min(millicores(r.cpu), cpu_m)}m", f"{request}Mi", None, f"{max(limit, request)}Mi")
    return out


def report(cpu: str, memory: str, host: bool = False) -> tuple[list[str], bool]:
    """The lines `make preflight` prints for a GPU node with this allocatable CPU and memory (`host`: the
    host's capacity, a kind node's before kubelet's eviction threshold), and whether the defaults fit it."""
    if host:
        memory = str(memory_bytes(memory) - EVICTION_BYTES)
    lines = [f"allocatable: cpu {cpu}, memory {memory_bytes(memory) / 2**30:.1f}Gi"]
    fitting = [name for name, res in PROFILES.items() if not misfits(res, cpu, memory)]
    for problem in misfits(DEFAULTS, cpu, memory):
        lines.append(f"the compile defaults do not fit: {problem}")
    if fitting:
        best = fitting[-1]
        lines.append(f"largest profile that fits: {best}: sam-pipeline compile {flags(PROFILES[best])}")
    else:
        lines.append(f"no profile fits; these flags do: sam-pipeline compile {flags(fitted(cpu, memory))}")
    return lines, not misfits(DEFAULTS, cpu, memory)


def main(argv: list[str]) -> int:
    """`python3 -m pipelines.resources [--host] CPU MEMORY`: exit 1 when the defaults cannot be scheduled there."""
    host = argv[:1] == ["--host"]
    argv = argv[1:] if host else argv
    if len(argv) != 2:
        print("usage: python3 -m pipelines.resources [--host] <allocatable cpu> <allocatable memory>", file=sys.stderr)
        return 2
    try:
        lines, ok = report(*argv, host=host)
    except ValueError as e:
        print(f"pipelines.resources: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
