"""Fine-tuning SAM: settings (config), one iteration and validation (trainer), checkpoints, and the loop.

Names resolve on first use so that `components.training.config` (TrainConfig) imports without torch.
"""
from importlib import import_module

_WHERE = {"TrainConfig": "config", "AmpSettings": "config", "resolve_amp": "config",
          "Item": "trainer", "Trainer": "trainer", "prepare_items": "trainer",
          "TrainResult": "loop", "train": "loop"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
