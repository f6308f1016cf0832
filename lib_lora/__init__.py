"""sd-webui-lora's engine: load any common LoRA/LyCORIS/PEFT file and patch SD1/SD2/SDXL/SD3 models.

Imports torch, safetensors and numpy only, never the WebUI, so it works and is tested on its own.
"""
from .blocks import BlockWeights, PRESETS
from .errors import LoraError
from .keymap import Target
from .network import Network, from_state_dict, load
from .patcher import ApplyResult, Patcher, Use
from .safetensors_io import Limits

__all__ = ["ApplyResult", "BlockWeights", "Limits", "LoraError", "Network", "PRESETS", "Patcher", "Target", "Use",
           "from_state_dict", "load"]
