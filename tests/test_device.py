"""The device choice on this CPU-only machine: a local fallback with a notice, a one-line failure under KFP."""
from __future__ import annotations

import pytest
import torch

from components.errors import UserError
from components.sam import device as dev

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable CUDA device")


def test_local_cuda_falls_back_to_cpu_with_a_notice(monkeypatch):
    for name in dev.KFP_POD_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.warns(UserWarning, match="CUDA is not available; running on cpu"):
        assert dev.resolve_device("cuda") == torch.device("cpu")
    assert dev.resolve_device("cpu") == torch.device("cpu")


def test_under_kfp_cuda_fails_in_one_line_saying_what_it_found(monkeypatch, tmp_path):
    # The env the KFP 2.17 launcher's pod carries (backend/src/v2/component/constants.go).
    monkeypatch.setenv("KFP_POD_NAME", "sam-finetune-abc-123")
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "all")
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\n"
                       "GCC version:  gcc version 12.2.0\n")
    monkeypatch.setattr(dev, "DRIVER_VERSION_FILE", version)
    with pytest.raises(dev.DeviceError) as e:
        dev.resolve_device("cuda")
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg
    assert f"torch {torch.__version__}" in msg and "NVIDIA driver 550.54.14" in msg
    assert "NVIDIA_VISIBLE_DEVICES=all" in msg and "device plugin" in msg and "nvidia runtime" in msg
    # An explicit cpu is still fine under KFP.
    assert dev.resolve_device("cpu") == torch.device("cpu")


def test_under_kfp_without_a_visible_driver(monkeypatch, tmp_path):
    monkeypatch.setenv("KFP_POD_UID", "0f0e")
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(dev, "DRIVER_VERSION_FILE", tmp_path / "absent")
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    with pytest.raises(dev.DeviceError, match="NVIDIA driver not visible, NVIDIA_VISIBLE_DEVICES=unset"):
        dev.resolve_device("cuda:0")


def test_finetune_under_kfp_fails_before_training(monkeypatch, tmp_path):
    """The training entry point uses the same helper: no model is built, nothing is written."""
    from components.training.config import TrainConfig
    from components.training.loop import train

    monkeypatch.setenv("KFP_POD_NAME", "p")
    cfg = TrainConfig(device="cuda", checkpoint_dir=str(tmp_path / "ck"), show_progress=False)
    with pytest.raises(dev.DeviceError, match="CUDA is not usable in this pod"):
        train(cfg, tmp_path / "never-read.pt", [object()], [object()], store=None)
    assert not (tmp_path / "ck").exists()


def test_not_a_device():
    with pytest.raises(dev.DeviceError, match="'gpu0' is not a torch device"):
        dev.resolve_device("gpu0")


def test_amp_default_is_fp32_on_a_cpu_and_fp16_on_cuda(caplog):
    """amp=None: fp32 on a CPU (bf16 training collapsed in the learning test, components/training/config.py
    says why), fp16 + GradScaler on CUDA; amp=True on a CPU is bf16 autocast, with a warning when fp16 was
    asked for; amp=False is fp32 everywhere. The encoder's precision is its own rule (encoder_precision)."""
    from components.training.config import TrainConfig, resolve_amp

    cpu = torch.device("cpu")
    with caplog.at_level("WARNING"):
        assert resolve_amp(TrainConfig(device="cpu"), cpu).label == "off"
        assert resolve_amp(TrainConfig(device="cpu", amp=True, amp_dtype="bf16"), cpu).label == "bf16"
    assert not caplog.records
    with caplog.at_level("WARNING"):
        amp = resolve_amp(TrainConfig(device="cpu", amp=True), cpu)
    assert (amp.enabled, amp.dtype, amp.scaler) == (True, torch.bfloat16, False)
    assert "fp16 autocast is CUDA-only" in caplog.text
    assert resolve_amp(TrainConfig(device="cpu", amp=False), cpu).label == "off"
    assert resolve_amp(TrainConfig(device="cuda"), torch.device("cuda")).label == "fp16+scaler"



_FREED_AND_KEPT = """
import torch
from components.sam.device import keep_freed_host_memory

def kept_mib():
    \"\"\"How much of a freed 256 MiB block (over glibc's largest default mmap threshold) the process still holds.\"\"\"
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
    before = rss()
    x = torch.ones(256 << 20, dtype=torch.uint8)
    del x
    return rss() - before

default = kept_mib()
assert keep_freed_host_memory()
print(default, kept_mib())
"""


def _glibc() -> bool:
    try:
        return dev.os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError):
        return False


@pytest.mark.skipif(not _glibc(), reason="needs glibc")
def test_freed_host_memory_stays_for_the_next_encoder_pass_once_asked():
    """By default glibc gives a freed 256 MiB block back to the kernel (the next pass faults it in again, zeroed);
    after keep_freed_host_memory() (build_sam calls it) the process keeps it for reuse."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FREED_AND_KEPT], capture_output=True, text=True, check=True).stdout
    default, kept = map(int, out.split())
    assert default < 32 and kept >= 200, (default, kept)
