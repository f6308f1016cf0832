"""Network tools: resize a network's rank, merge networks (into one network or into a checkpoint), extract a
network from two checkpoints. Deltas come from the engine's own adapters and model index, so every file kind
the engine loads can be resized or merged, and the results are kohya LoRA/LoCon files."""
from .checkpoint import as_modules, read_checkpoint, save_checkpoint
from .extract import extract
from .lowrank import RankRule, ToolResult, save_network
from .merge import merge_into_checkpoint, merge_networks
from .resize import resize

__all__ = ["RankRule", "ToolResult", "as_modules", "extract", "merge_into_checkpoint", "merge_networks",
           "read_checkpoint", "resize", "save_checkpoint", "save_network"]
