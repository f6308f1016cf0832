"""The layers kohya's networks train (``networks.lora``, and LyCORIS' kohya wrapper, which picks the same), as
targets of a model: the UNet's transformer blocks; with convs, its ResBlocks and down/upsamplers; the text
encoders' attention and MLP. kohya picks them by module class (``Transformer2DModel``, ``ResnetBlock2D``,
``CLIPAttention``, ...); these checkpoint paths are the same layers, so a tree of bare tensors (the tools')
gets them too. The trainer and the extraction tool both ask here."""
from __future__ import annotations

import re

from torch import nn

from .keymap import Target
from .model_index import ModelIndex

_UNET_ATTN = re.compile(r"(input_blocks_\d+_1|middle_block_1|output_blocks_\d+_1)_(proj_in|proj_out|"
                        r"transformer_blocks_\d+_(attn[12]_(to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2))")
_UNET_CONV = re.compile(r"(input_blocks_\d+_0|middle_block_[02]|output_blocks_\d+_0)_(in_layers_2|emb_layers_1|"
                        r"out_layers_3|skip_connection)|input_blocks_\d+_0_op|output_blocks_\d+_[12]_conv")
_TE = re.compile(r"(text_model_)?encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])|"
                 r"transformer_resblocks_\d+_(attn|attn_out_proj|mlp_c_fc|mlp_c_proj)")


def kohya_targets(index: ModelIndex, convs: bool) -> list[Target]:
    """Every target kohya's LoRA (LoCon with ``convs``) would train in this model, in the model's module order;
    an open_clip ``nn.MultiheadAttention`` gives its q, k and v."""
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
