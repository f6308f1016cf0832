"""A network from two checkpoints (kohya's extract_lora_from_models.py): for every layer kohya's LoRA trains,
the difference tuned − base cut to a rank by SVD."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import LoraError
from ..keymap import Target
from ..kohya_targets import kohya_targets
from ..model_index import ModelIndex
from .lowrank import RankRule, ToolProgress, ToolResult, add_modules, lora_metadata


def extract(base: nn.Module, tuned: nn.Module, rule: RankRule, min_diff: float = 0.01,
            precision: str = "fp16", progress: ToolProgress | None = None) -> ToolResult:
    """``min_diff``: a text encoder whose largest weight change is below it is left out (kohya's rule, so a
    fine-tune that never trained the text encoder gives a UNet-only file)."""
    bi, ti = ModelIndex(base), ModelIndex(tuned)
    if bi.family != ti.family:
        raise LoraError(None, f"the checkpoints are different models ({bi.family} and {ti.family})",
                        "extract from a fine-tune and the checkpoint it was trained from")
    result = ToolResult({}, {})
    deltas: dict[Target, torch.Tensor] = {}
    for target in kohya_targets(bi, convs=bool(rule.conv_rank)):
        a, b = bi.weight(target), ti.weight(target)
        if b is None or a.shape != b.shape:
            result.skipped.append(f"{target}: not in the tuned checkpoint with the same shape")
            continue
        deltas[target] = b.float() - a.float()
    for part in ("te", "te2"):
        changes = [float(d.abs().max()) for t, d in deltas.items() if t.part == part]
        if changes and max(changes) < min_diff:
            result.skipped.append(f"{part}: largest change {max(changes):.2e} is below min_diff {min_diff}; left out")
            deltas = {t: d for t, d in deltas.items() if t.part != part}
    add_modules(result, deltas, bi, rule, precision, progress)
    result.metadata = lora_metadata(result, rule, {}, bi.family, "extracted from two checkpoints")
    return result
