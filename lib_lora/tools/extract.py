"""A network from two checkpoints (kohya's extract_lora_from_models.py): for every layer kohya's LoRA trains,
the difference tuned − base cut to a rank by SVD."""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import LoraError
from ..keymap import Target
from ..model_index import ModelIndex
from .lowrank import SAVE_DTYPES, RankRule, ToolResult, add_module, lora_metadata

# The layers kohya's networks.lora trains, by checkpoint path: the UNet's transformer blocks; with convs, the
# ResBlocks and down/upsamplers; the text encoders' attention and MLP.
_UNET_ATTN = re.compile(r"(input_blocks_\d+_1|middle_block_1|output_blocks_\d+_1)_(proj_in|proj_out|"
                        r"transformer_blocks_\d+_(attn[12]_(to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2))")
_UNET_CONV = re.compile(r"(input_blocks_\d+_0|middle_block_[02]|output_blocks_\d+_0)_(in_layers_2|emb_layers_1|"
                        r"out_layers_3|skip_connection)|input_blocks_\d+_0_op|output_blocks_\d+_[12]_conv")
_TE = re.compile(r"(text_model_)?encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])|"
                 r"transformer_resblocks_\d+_(attn|attn_out_proj|mlp_c_fc|mlp_c_proj)")


def kohya_targets(index: ModelIndex, convs: bool) -> list[Target]:
    """Every target kohya's LoRA (LoCon with ``convs``) would train in this model, q/k/v split for open_clip."""
    out = []
    for (part, path), (_name, module) in index.modules.items():
        if part == "unet":
            if _UNET_ATTN.fullmatch(path) or (convs and _UNET_CONV.fullmatch(path)):
                out.append(Target(part, path))
        elif _TE.fullmatch(path):
            if isinstance(module, nn.MultiheadAttention):
                out += [Target(part, path, sub) for sub in "qkv"]
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                out.append(Target(part, path))
    return out


def extract(base: nn.Module, tuned: nn.Module, rule: RankRule, min_diff: float = 0.01,
            precision: str = "fp16") -> ToolResult:
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
    for target, delta in deltas.items():
        add_module(result, bi.kohya_name(target), delta, rule, SAVE_DTYPES[precision])
    result.metadata = lora_metadata(result, rule, {}, bi.family, "extracted from two checkpoints")
    return result
