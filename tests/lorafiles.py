"""Network files built in the tests, in the key styles real tools write (no downloads)."""
from __future__ import annotations

import re

import torch
from safetensors.torch import save_file

from lib_lora.model_index import ROOTS, checkpoint_name

KOHYA_PREFIX = {"unet": "lora_unet_", "te": "lora_te_", "te2": "lora_te2_"}
# Text-encoder names as kohya writes them (HF CLIP naming) for the open_clip modules of SD2/SDXL.
OPEN_CLIP_TO_HF = (("transformer_resblocks_", "text_model_encoder_layers_"), ("_mlp_c_fc", "_mlp_fc1"),
                   ("_mlp_c_proj", "_mlp_fc2"), ("_attn_out_proj", "_self_attn_out_proj"), ("_ln_1", "_layer_norm1"),
                   ("_ln_2", "_layer_norm2"))


def module_targets(model: torch.nn.Module, kinds=(torch.nn.Linear, torch.nn.Conv2d, torch.nn.MultiheadAttention)):
    """(part, underscored path, module) for every patchable module of a checkpoint-named model."""
    out = []
    for raw, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        name = checkpoint_name(raw)
        for prefix, part, open_clip in ROOTS:
            if name.startswith(prefix):
                out.append((part, name[len(prefix):].replace(".", "_"), module, open_clip))
                break
    return out


def kohya_key(part: str, path: str, open_clip: bool, sdxl: bool) -> str:
    if open_clip:
        for a, b in OPEN_CLIP_TO_HF:
            path = path.replace(a, b)
    prefix = KOHYA_PREFIX[part]
    if sdxl and part == "te":
        prefix = "lora_te1_"
    return prefix + path


def random_kohya_lora(model: torch.nn.Module, rank: int = 4, alpha: float | None = 2.0, seed: int = 0,
                      scale: float = 0.1, conv: bool = True, dtype=torch.float32, sdxl: bool = False) -> dict[str, torch.Tensor]:
    """A kohya-style LoRA (compvis UNet names, HF text-encoder names) on every Linear/Conv of ``model``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for part, path, module, open_clip in module_targets(model):
        if isinstance(module, torch.nn.MultiheadAttention):
            e = module.embed_dim
            for sub in "qkv":
                base = kohya_key(part, path, open_clip, sdxl).replace("_attn", "_self_attn") + f"_{sub}_proj"
                sd[base + ".lora_down.weight"] = torch.randn(rank, e, generator=g) * scale
                sd[base + ".lora_up.weight"] = torch.randn(e, rank, generator=g) * scale
                if alpha is not None:
                    sd[base + ".alpha"] = torch.tensor(alpha)
            continue
        key = kohya_key(part, path, open_clip, sdxl)
        if isinstance(module, torch.nn.Conv2d):
            if not conv and module.kernel_size != (1, 1):
                continue
            down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=g) * scale
            up = torch.randn(module.out_channels, rank, 1, 1, generator=g) * scale
        else:
            down = torch.randn(rank, module.in_features, generator=g) * scale
            up = torch.randn(module.out_features, rank, generator=g) * scale
        sd[key + ".lora_down.weight"] = down
        sd[key + ".lora_up.weight"] = up
        if alpha is not None:
            sd[key + ".alpha"] = torch.tensor(alpha)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def save(path, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return str(path)


def diffusers_unet_name(path: str) -> str:
    """compvis → diffusers names for the SD1/SD2 attention blocks (how kohya writes SD1 UNet keys)."""
    m = re.match(r"input_blocks_(\d+)_1_(.+)", path)
    if m:
        n = int(m[1]) - 1
        return f"down_blocks_{n // 3}_attentions_{n % 3}_{m[2]}"
    m = re.match(r"middle_block_1_(.+)", path)
    if m:
        return f"mid_block_attentions_0_{m[1]}"
    m = re.match(r"output_blocks_(\d+)_1_(.+)", path)
    if m:
        n = int(m[1])
        return f"up_blocks_{n // 3}_attentions_{n % 3}_{m[2]}"
    return path


def attention_lora(model: torch.nn.Module, rank: int = 4, alpha: float = 4.0, seed: int = 0, scale: float = 0.15,
                   diffusers_names: bool = True, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """A kohya LoRA on the transformer blocks' Linear/1x1 layers and the text encoder (the common kind: 264
    modules on SD1.5), for any model size.

    Works on meta-device models: only names and shapes are read."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for part, path, module, open_clip in module_targets(model, kinds=(torch.nn.Linear, torch.nn.Conv2d)):
        if part == "unet" and not re.match(r"(input_blocks_\d+_1_|middle_block_1_|output_blocks_\d+_1_)", path):
            continue
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1):
            continue
        if part == "unet" and diffusers_names:
            path = diffusers_unet_name(path)
        key = kohya_key(part, path, open_clip, False)
        w = module.weight
        out_f, in_f = w.shape[0], w.shape[1]
        down = torch.randn(rank, in_f, generator=g) / in_f ** 0.5 * scale
        up = torch.randn(out_f, rank, generator=g) / rank ** 0.5 * scale
        if w.dim() == 4:
            down, up = down.reshape(rank, in_f, 1, 1), up.reshape(out_f, rank, 1, 1)
        sd[key + ".lora_down.weight"] = down.to(dtype)
        sd[key + ".lora_up.weight"] = up.to(dtype)
        sd[key + ".alpha"] = torch.tensor(alpha, dtype=dtype)
    return sd


def as_peft(kohya_sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The same LoRA as ``attention_lora(..., diffusers_names=False)`` in diffusers/PEFT key layout
    (``unet.down_blocks.0.attentions.0….to_q.lora_A.weight``, ``text_encoder.text_model….lora_B.weight``);
    alpha is folded into B since PEFT files carry no per-module alpha."""
    dotted = {}
    for part, path, _module, open_clip in module_targets(model, kinds=(torch.nn.Linear, torch.nn.Conv2d)):
        dotted[kohya_key(part, path, open_clip, False)] = (part, path)
    out = {}
    for key, t in kohya_sd.items():
        base, _, param = key.partition(".")
        if param == "alpha" or base not in dotted:
            continue
        part, path = dotted[base]
        name = _dotted(model, part, path)
        if part == "unet":
            m = re.match(r"input_blocks\.(\d+)\.1\.(.+)", name) or None
            if m:
                n = int(m[1]) - 1
                name = f"down_blocks.{n // 3}.attentions.{n % 3}.{m[2]}"
            elif name.startswith("middle_block.1."):
                name = "mid_block.attentions.0." + name[len("middle_block.1."):]
            else:
                m = re.match(r"output_blocks\.(\d+)\.1\.(.+)", name)
                if not m:
                    continue
                n = int(m[1])
                name = f"up_blocks.{n // 3}.attentions.{n % 3}.{m[2]}"
            prefix = "unet."
        else:
            prefix = "text_encoder."
        rank = kohya_sd[base + ".lora_down.weight"].shape[0]
        scale = float(kohya_sd[base + ".alpha"]) / rank
        if param == "lora_down.weight":
            out[prefix + name + ".lora_A.weight"] = t
        else:
            out[prefix + name + ".lora_B.weight"] = (t.float() * scale).to(t.dtype)
    return out


def _dotted(model: torch.nn.Module, part: str, path: str) -> str:
    for p, pth, module, _ in module_targets(model, kinds=(torch.nn.Linear, torch.nn.Conv2d)):
        if p == part and pth == path:
            for raw, mod in model.named_modules():
                if mod is module:
                    name = checkpoint_name(raw)
                    for prefix, _part, _oc in ROOTS:
                        if name.startswith(prefix):
                            return name[len(prefix):]
    raise KeyError(path)


def as_loha(kohya_sd: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A LyCORIS LoHa with the same modules: hada factors of the same rank, random."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in kohya_sd.items():
        base, _, param = key.partition(".")
        if param == "lora_down.weight":
            r, n_in = t.shape[0], t.reshape(t.shape[0], -1).shape[1]
            n_out = kohya_sd[base + ".lora_up.weight"].shape[0]
            for i in (1, 2):
                out[f"{base}.hada_w{i}_a"] = (torch.randn(n_out, r, generator=g) * 0.3).to(t.dtype)
                out[f"{base}.hada_w{i}_b"] = (torch.randn(r, n_in, generator=g) / n_in ** 0.5).to(t.dtype)
            out[f"{base}.alpha"] = torch.tensor(float(r), dtype=t.dtype)
    return out
