"""The one device choice, used by training, evaluation and the CLI.

CUDA asked for and not usable: locally (or under an explicit `cpu`) the work runs on cpu with a notice.
Under KFP it is a failure: a pod that requested `nvidia.com/gpu` and trains on cpu holds the GPU for
hours while doing a fraction of the work. The KFP launcher's pod carries KFP_POD_NAME / KFP_POD_UID
(`EnvPodName`, `EnvPodUID` in kubeflow/pipelines backend/src/v2/component/constants.go, set through the
downward API by backend/src/v2/compiler/argocompiler/common.go).
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import gc
import logging
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

from components.errors import UserError

log = logging.getLogger(__name__)

KFP_POD_ENV = ("KFP_POD_NAME", "KFP_POD_UID")
DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")


class DeviceError(UserError, RuntimeError):
    """The requested device cannot be used where falling back would waste the request."""


def under_kfp() -> bool:
    return any(os.environ.get(name) for name in KFP_POD_ENV)


def nvidia_driver_version() -> str | None:
    """The host's NVIDIA kernel driver version, if this container can see it."""
    try:
        m = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", DRIVER_VERSION_FILE.read_text())
        if m:
            return m.group(1)
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def cuda_unusable(name: str) -> str:
    """One line: what this pod found instead of a usable CUDA device, and what to check."""
    cuda = torch.version.cuda
    built = f"torch {torch.__version__} built for CUDA {cuda}" if cuda else f"torch {torch.__version__} (a CPU-only build)"
    need = "an R580+ driver" if cuda and cuda.split(".")[0] == "13" else f"a driver for CUDA {cuda}"
    return (f"device {name!r} requested but CUDA is not usable in this pod: {built}, NVIDIA driver "
            f"{nvidia_driver_version() or 'not visible'}, NVIDIA_VISIBLE_DEVICES="
            f"{os.environ.get('NVIDIA_VISIBLE_DEVICES', 'unset')}; check the node has {need}, the NVIDIA device "
            f"plugin gives the pod a GPU (nvidia.com/gpu limit) and the container runs with the nvidia runtime; "
            f"or run with device=cpu")


def resolve_device(name: str, *, notice: bool = True) -> torch.device:
    """`name` as a torch device; CUDA that is not usable falls back to cpu (with a notice unless the
    caller gives its own), except under KFP."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"device {name!r} is not a torch device (use cuda, cuda:N or cpu)") from e
    if device.type != "cuda" or torch.cuda.is_available():
        return device
    if under_kfp():
        raise DeviceError(cuda_unusable(name))
    if notice:
        warnings.warn(f"device {name!r} requested but CUDA is not available; running on cpu", stacklevel=2)
        log.warning("CUDA is not available; falling back to cpu")
    return torch.device("cpu")


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_host_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of handing it back to the kernel; True when it took.

    By default every freed block over the mmap threshold (at most 32 MiB) goes back to the kernel, and the next
    one is page-faulted in again, zeroed. A 1024x1024 encoder pass on the CPU allocates and frees hundreds of
    MiB of activations, so over 40 % of its time went to those faults: on 2 cores 1.21 -> 0.69 s per image, 5.8
    -> 0.6 s of system time for six passes, peak RSS +6 % (1,196 -> 1,263 MiB). PyTorch's CPU tuning guide
    gets the same effect by preloading jemalloc or tcmalloc; mallopt needs nothing installed. Process-wide, so
    it is set where a model is built; elsewhere than glibc (macOS, musl) nothing changes."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
    except (ValueError, OSError):
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


@functools.cache
def freeze_objects_at_exit() -> None:
    """Spare the process the garbage collector's passes over every object at exit.

    torch, torchvision and timm (which import torch._dynamo and sympy) leave about 400,000 objects that the
    cyclic collector tracks. Python's shutdown traverses them all, again and again as it clears the modules:
    1.1 s of CPU per process that built MobileSAM, 0.25 s once they are frozen (2 cores), and a run waits for
    it in each of its embed, finetune and evaluate tasks. Freezing changes nothing else: reference counting
    frees the objects at shutdown as before, and the few reference cycles left go with the process's memory
    (`with` closes every file this code writes; logging flushes in its own exit handler)."""
    atexit.register(gc.freeze)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. On CUDA through pinned memory with a non-blocking copy, so the copy overlaps
    the kernels already queued and Python goes on queueing the next ones."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
