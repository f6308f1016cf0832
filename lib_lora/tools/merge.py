"""Networks merged with weights: into one LoRA (kohya's svd_merge_lora.py: the weighted sum of deltas per
layer, cut to a rank by SVD) or into a checkpoint (the engine's own merge, written into its tensors)."""
from __future__ import annotations

import json

import torch
from torch import nn

from ..errors import LoraError
from ..keymap import Target, family_mismatch
from ..model_index import ModelIndex
from ..network import Network
from ..patcher import ApplyResult, Patcher, Use
from .checkpoint import as_modules
from .lowrank import RankRule, ToolProgress, ToolResult, add_modules, lora_metadata


def check_family(items: list[tuple[Network, float]], family: str | None) -> None:
    """Every network made for this base model, or one message naming the first that is not."""
    for net, _weight in items:
        mismatch = family_mismatch(net.base_model, family)
        if mismatch:
            raise LoraError(net.path, mismatch, "use a network made for this base model")


def network_deltas(items: list[tuple[Network, float]], index: ModelIndex) -> tuple[dict[Target, torch.Tensor], list[str]]:
    """Σ weight · ΔW per model target, in fp32; what could not be used is listed."""
    check_family(items, index.family)
    sums: dict[Target, torch.Tensor] = {}
    skipped: list[str] = []
    for net, weight in items:
        for target, adapter in net.modules.items():
            orig = index.weight(target)
            if orig is None:
                skipped.append(f"{net.name}: {target}: no such layer in the model")
                continue
            orig = orig.float()
            with torch.no_grad():
                d, b = adapter.delta(orig, weight)
            if b is not None and bool((b != 0).any()):
                skipped.append(f"{net.name}: {target}: its bias change is dropped (a LoRA holds no bias)")
            d = d.reshape(orig.shape)
            sums[target] = d if target not in sums else sums[target] + d
    return sums, skipped


def merge_networks(items: list[tuple[Network, float]], model: nn.Module, rule: RankRule,
                   precision: str = "fp16", progress: ToolProgress | None = None) -> ToolResult:
    """One LoRA/LoCon file holding ``Σ weight · network`` as well as the rank allows."""
    if not items:
        raise LoraError(None, "no networks to merge", "give at least one network with its weight")
    index = ModelIndex(model)
    deltas, skipped = network_deltas(items, index)
    result = ToolResult({}, {}, skipped=skipped)
    add_modules(result, deltas, index, rule, precision, progress)
    merged = ", ".join(f"{net.name}:{weight:g}" for net, weight in items)
    result.metadata = lora_metadata(result, rule, {}, index.family, f"merged from {merged}")
    result.metadata["ss_merged_from"] = json.dumps([{"name": net.name, "weight": weight,
                                                     "sshs_model_hash": net.metadata.get("sshs_model_hash", "")}
                                                    for net, weight in items])
    return result


def merge_into_checkpoint(items: list[tuple[Network, float]], tensors: dict[str, torch.Tensor]) -> ApplyResult:
    """``tensors`` (a checkpoint's state dict) changed in place to carry the networks, exactly as a generation
    would see them merged (the same Patcher)."""
    if not items:
        raise LoraError(None, "no networks to merge", "give at least one network with its weight")
    patcher = Patcher(as_modules(tensors))
    check_family(items, patcher.index.family)
    res = patcher.apply([Use(net, te=weight, unet=weight) for net, weight in items], mode="merge")
    if res.errors:
        patcher.restore()
        raise LoraError(None, "; ".join(res.errors), "the checkpoint was not changed")
    patcher.forget()
    return res
