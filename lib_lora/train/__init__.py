"""kohya-style LoRA/LoHa/LoKr training on a model the caller has loaded (the WebUI's, or a test model).

``Trainer(TrainConfig(...), ModelBundle(...)).run(progress_callback)``; ``python -m lib_lora.train`` is the CLI.
"""
from .config import TrainConfig
from .loop import Progress, Trainer, TrainResult
from .model import ModelBundle
from .samples import SamplePrompt

__all__ = ["ModelBundle", "Progress", "SamplePrompt", "TrainConfig", "TrainResult", "Trainer"]
