"""The training settings (the one place a training default or rule is stated) and the AMP choice.

torch is imported only where the AMP choice needs it: the CLI and the light register-model image read
TrainConfig without torch installed.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from components.errors import UserError
from components.weights import MODEL_TYPES

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


# The settings a pipeline run sets (pipeline parameters, the finetune component's inputs, the CLI's
# seed flags); the rest keep TrainConfig's defaults in a pipeline run.
PIPELINE_SETTINGS = ("debug_with_one_example", "checkpoint_name", "model_type", "batch_size", "n_objects_per_batch",
                     "device", "n_iterations", "n_sub_iteration", "lr", "seed", "val_every")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Fields that say where or how training runs, not what it computes: the same data, weights and other
# settings give the same model under any value of these (a checkpoint's identity and the nightly
# change check, components/changes.py, both leave them out).
NOT_TRAJECTORY = frozenset({"device", "checkpoint_dir", "checkpoint_name", "resume", "embed_batch_size",
                            "show_progress", "compile"})


class TrainConfigError(UserError, ValueError):
    """One line naming every invalid training setting."""


@dataclass
class TrainConfig:
    debug_with_one_example: bool = False
    checkpoint_name: str = "sam_instance_seg"
    model_type: str = "vit_t"
    batch_size: int = 1
    n_objects_per_batch: int = 25
    device: str = "cuda"
    n_iterations: int = 200
    n_sub_iteration: int = 2
    lr: float = 1e-5
    seed: int = 0
    val_every: int = 10
    # None: on for CUDA (fp16 + GradScaler, fp16 encoder), off on a CPU (fp32). True on a CPU: bf16 autocast for
    # training, the encoder fp32. Not the CPU default although a 4-seed paired study found bf16 training on fp32
    # embeddings learning as fp32 does (benchmarks/RESULTS.md, "Training precision on CPU"): the learning test
    # (tests/test_finetune.py::test_it_learns, lr 1e-3) collapses in bf16 (val Dice 0.11, 0.20, 0.12, 0.00)
    # where fp32 learns. Until that is understood, fp32 stays. False: fp32 throughout.
    amp: bool | None = None
    amp_dtype: str = "fp16"  # "fp16" (CUDA, with GradScaler) or "bf16" (CUDA where supported, CPU)
    # The decoder rounds through torch.compile (components/training/compiled_step.py): the same numbers
    # within rounding. None: COMPILE_BY_DEFAULT decides per device type.
    compile: bool | None = None
    freeze_prompt_encoder: bool = False
    checkpoint_dir: str = "checkpoints"
    prompt_mode: str = "alternate"  # "alternate" box/point per object, or only "box" / only "point"
    box_jitter: float = 0.05  # fraction of the box's size each edge may move
    mask_prompt_prob: float = 0.5  # chance that a corrective round also gets the previous mask (micro-sam's 0.5)
    n_points: int = 1  # positive points for point-prompted objects
    click_largest_area: bool = False  # corrective clicks in the largest-area region, not the thickest (slower)
    embed_batch_size: int = 4
    resume: bool = True
    show_progress: bool = True

    def validate(self) -> None:
        problems = []
        for name in ("batch_size", "n_objects_per_batch", "n_iterations", "n_sub_iteration", "val_every",
                     "n_points", "embed_batch_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be a finite number > 0 (got {self.lr})")
        if int(self.seed) < 0:  # numpy's generators (the split, the prompt sampling) refuse negative seeds
            problems.append(f"seed must be >= 0 (got {self.seed})")
        if not 0.0 <= self.mask_prompt_prob <= 1.0:
            problems.append(f"mask_prompt_prob must be in [0, 1] (got {self.mask_prompt_prob})")
        if not 0.0 <= self.box_jitter < 1.0:
            problems.append(f"box_jitter must be in [0, 1) (got {self.box_jitter})")
        if self.amp_dtype not in ("fp16", "bf16"):
            problems.append(f"amp_dtype must be 'fp16' or 'bf16' (got {self.amp_dtype!r})")
        if self.prompt_mode not in ("alternate", "box", "point"):
            problems.append(f"prompt_mode must be alternate, box or point (got {self.prompt_mode!r})")
        if self.model_type not in MODEL_TYPES:
            problems.append(f"model_type must be {', '.join(MODEL_TYPES)} (got {self.model_type!r})")
        if not _SAFE_NAME.fullmatch(str(self.checkpoint_name)):
            # It names a folder under checkpoint_dir: one path component, never "..", "a/b" or "/x".
            problems.append(f"checkpoint_name must be one folder name of letters, digits, '.', '_', '-' "
                            f"(got {self.checkpoint_name!r})")
        if problems:
            raise TrainConfigError("invalid training config: " + "; ".join(problems))

    @classmethod
    def from_params(cls, params: dict[str, Any], **overrides) -> "TrainConfig":
        """A config from pipeline parameters or metadata read back from a backend, where a bool may
        arrive as 0/1 and an int as 3.0: each value is cast to its field's type."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise ValueError(f"unknown training setting(s): {', '.join(unknown)}")
        values = {}
        for name, value in {**params, **overrides}.items():
            kind = fields[name].type
            if value is None or kind not in ("bool", "int", "float", "str"):
                values[name] = value
            else:
                values[name] = {"bool": bool, "int": int, "float": float, "str": str}[kind](value)
        return cls(**values)


# Where compiling pays for the seed's 200 iterations, compile time included (benchmarks/RESULTS.md,
# "Compiled decoder rounds"). CUDA: not yet measured on a GPU, so off until it is.
COMPILE_BY_DEFAULT = {"cpu": False, "cuda": False}


def resolve_compile(cfg: TrainConfig, device: torch.device) -> bool:
    return COMPILE_BY_DEFAULT.get(device.type, False) if cfg.compile is None else bool(cfg.compile)


def trajectory_settings(cfg: TrainConfig) -> dict:
    """The settings that decide the trained model (every field but NOT_TRAJECTORY)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_TRAJECTORY}


@dataclass(frozen=True)
class AmpSettings:
    enabled: bool
    dtype: torch.dtype
    scaler: bool

    @property
    def label(self) -> str:
        import torch

        if not self.enabled:
            return "off"
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype] + ("+scaler" if self.scaler else "")

    def autocast(self, device: torch.device):
        if not self.enabled:
            return nullcontext()
        import torch

        return torch.autocast(device.type, dtype=self.dtype)


def resolve_amp(cfg: TrainConfig, device: torch.device) -> AmpSettings:
    import torch

    enabled = device.type == "cuda" if cfg.amp is None else bool(cfg.amp)
    if not enabled:
        return AmpSettings(False, torch.float32, False)
    if device.type != "cuda":
        if cfg.amp_dtype != "bf16" and cfg.amp:  # asked for fp16 on a CPU
            log.warning("fp16 autocast is CUDA-only; using bf16 autocast on %s", device.type)
        return AmpSettings(True, torch.bfloat16, False)
    if cfg.amp_dtype == "bf16":
        if torch.cuda.is_bf16_supported():
            return AmpSettings(True, torch.bfloat16, False)
        log.warning("this GPU does not support bf16; using fp16 with GradScaler")
    return AmpSettings(True, torch.float16, True)
