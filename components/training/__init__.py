"""Fine-tuning SAM: settings (config), one iteration and validation (trainer), checkpoints, and the loop."""
from components.training.config import AmpSettings, TrainConfig, resolve_amp
from components.training.loop import TrainResult, train
from components.training.trainer import Item, Trainer, prepare_items

__all__ = ["AmpSettings", "Item", "TrainConfig", "TrainResult", "Trainer", "prepare_items", "resolve_amp", "train"]
