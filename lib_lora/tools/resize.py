"""A network at another rank (kohya's resize_lora.py, for every kind the engine loads): each module's weight
delta is rebuilt on the base model, then cut to the rank by SVD."""
from __future__ import annotations

from torch import nn

from ..model_index import ModelIndex
from ..network import Network
from .lowrank import RankRule, ToolProgress, ToolResult, add_modules, lora_metadata
from .merge import network_deltas


def resize(network: Network, model: nn.Module, rule: RankRule, precision: str = "fp16",
           progress: ToolProgress | None = None) -> ToolResult:
    """``model`` gives the layer shapes and, for kinds whose delta depends on it (DoRA, IA3, OFT), the weights."""
    index = ModelIndex(model)
    deltas, skipped = network_deltas([(network, 1.0)], index)
    result = ToolResult({}, {}, skipped=skipped)
    add_modules(result, deltas, index, rule, precision, progress)
    new = f"{rule.dynamic} {rule.dynamic_param} up to rank {rule.rank}" if rule.dynamic else f"rank {rule.rank}"
    result.metadata = lora_metadata(result, rule, network.metadata, index.family,
                                    f"dimension is resized from {network.rank} to {new}")
    return result
