"""Fine-tuning SAM: settings (config.py, torch-free: the CLI and the light register-model image read it), one
iteration and validation (trainer.py), checkpoints (checkpoints.py), the stream of items (data.py) and the loop
(loop.py). Import what you need from its module."""
