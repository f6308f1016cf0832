"""kohya-style training of every adapter kind with a trainable form (LoRA/LoCon and LyCORIS kinds) on a model the
caller has loaded (the WebUI's, a test model) or one built from a checkpoint file (``loader.load_checkpoint``, the CLI's).

``Trainer(TrainConfig(...), ModelBundle(...)).run(progress_callback)``; ``python -m lib_lora.train`` is the CLI.
"""
from .config import TrainConfig
from .loop import Progress, Trainer, TrainResult
from .model import ModelBundle
from .samples import SamplePrompt

__all__ = ["ModelBundle", "Progress", "SamplePrompt", "TrainConfig", "TrainResult", "Trainer"]
