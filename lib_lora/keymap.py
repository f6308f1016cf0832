"""File keys → model targets, for every key style in circulation, and base-model detection.

A target is (part, path, sub): part is "unet" (SD3: the MMDiT), "te" (the first or only text encoder, CLIP-L),
"te2" (SDXL's and SD3's CLIP-G) or "te3" (SD3's T5); path is the module's checkpoint name inside that part with
dots as underscores (the WebUI's own ``network_layer_name`` convention), e.g. ``input_blocks_1_1_proj_in``,
``joint_blocks_0_x_block_attn_qkv`` or ``text_model_encoder_layers_0_self_attn_q_proj``; sub picks a third of a
fused weight (``q``/``k``/``v`` of a MultiheadAttention's ``in_proj_weight`` or of SD3's ``qkv`` Linear).
"""
from __future__ import annotations

import re
from typing import NamedTuple

from .adapters import tensor_names

FAMILIES = ("sd1", "sd2", "sdxl", "sd3")


class Target(NamedTuple):
    part: str
    path: str
    sub: str | None = None

    def __str__(self) -> str:
        return f"{self.part}:{self.path}" + (f".{self.sub}" if self.sub else "")


# Other spellings of the LoRA factors' names (PEFT, diffusers).
PARAM_ALIASES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                 "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
                 "lora_linear_layer.down.weight": "lora_down.weight", "lora_linear_layer.up.weight": "lora_up.weight"}
# Every per-module tensor name, longest first so "lora_down.weight" wins over "weight".
PARAMS = sorted(tensor_names() | set(PARAM_ALIASES), key=len, reverse=True)

_KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "te"), ("lora_te2_", "te2"), ("lora_te3_", "te3"),
                   ("lora_te_", "te"), ("oft_unet_", "unet"), ("lora_transformer_", "unet"))
_DOTTED_PREFIXES = (
    ("model.diffusion_model.", "unet"), ("diffusion_model.", "unet"), ("unet.", "unet"),
    ("cond_stage_model.transformer.", "te"), ("cond_stage_model.model.", "te"),
    ("conditioner.embedders.0.transformer.", "te"), ("conditioner.embedders.1.model.", "te2"),
    ("text_encoder_2.", "te2"), ("text_encoder_3.", "te3"), ("text_encoder.", "te"), ("te1.", "te"), ("te2.", "te2"),
    ("text_encoders.clip_l.transformer.", "te"), ("text_encoders.clip_g.transformer.", "te2"),
    ("text_encoders.t5xxl.transformer.", "te3"), ("transformer.", "unet"), ("base_model.model.", "unet"),
)
_RE_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(up|down)\.weight$")


def split_key(key: str) -> tuple[str, str, str] | None:
    """(part, module name with underscores, param) of one file key, or None for an unknown style."""
    m = _RE_PROCESSOR.search(key)
    if m:  # diffusers' old attention-processor format
        proj = m.group(1) + (".0" if m.group(1) == "to_out" else "")
        key = f"{key[:m.start()]}.{proj}.lora_{m.group(2)}.weight"
    for prefix in ("base_model.model.", "transformer."):
        if key.startswith(prefix + "unet.") or key.startswith(prefix + "text_encoder"):
            key = key[len(prefix):]
    for prefix, part in _KOHYA_PREFIXES:
        if key.startswith(prefix):
            module, _, param = key[len(prefix):].partition(".")
            if not module or not param:
                return None
            return part, module, PARAM_ALIASES.get(param, param)
    for prefix, part in _DOTTED_PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            for param in PARAMS:
                if rest.endswith("." + param):
                    module = rest[: -len(param) - 1]
                    return part, module.replace(".", "_"), PARAM_ALIASES.get(param, param)
            return None
    return None


# ---- UNet: diffusers naming → original (compvis) naming -----------------------------------------
_RESNET = {"norm1": "in_layers_0", "conv1": "in_layers_2", "time_emb_proj": "emb_layers_1",
           "norm2": "out_layers_0", "conv2": "out_layers_3", "conv_shortcut": "skip_connection"}
_UNET_RULES = [
    (re.compile(r"conv_in(.*)"), lambda m, f: f"input_blocks_0_0{m[1]}"),
    (re.compile(r"conv_norm_out(.*)"), lambda m, f: f"out_0{m[1]}"),
    (re.compile(r"conv_out(.*)"), lambda m, f: f"out_2{m[1]}"),
    (re.compile(r"time_embedding_linear_(\d+)(.*)"), lambda m, f: f"time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
    (re.compile(r"add_embedding_linear_(\d+)(.*)"), lambda m, f: f"label_emb_0_{int(m[1]) * 2 - 2}{m[2]}"),
    (re.compile(r"down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"),
     lambda m, f: f"input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{_suffix(m[2], m[4])}"),
    (re.compile(r"down_blocks_(\d+)_downsamplers_0_conv(.*)"), lambda m, f: f"input_blocks_{3 + int(m[1]) * 3}_0_op{m[2]}"),
    (re.compile(r"mid_block_(attentions|resnets)_(\d+)_(.+)"),
     lambda m, f: f"middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{_suffix(m[1], m[3])}"),
    (re.compile(r"up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"),
     lambda m, f: f"output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{_suffix(m[2], m[4])}"),
    (re.compile(r"up_blocks_(\d+)_upsamplers_0_conv(.*)"),
     lambda m, f: f"output_blocks_{2 + int(m[1]) * 3}_{1 if (f != 'sdxl' and m[1] == '0') else 2}_conv{m[2]}"),
]


def _suffix(block: str, rest: str) -> str:
    if block != "resnets":
        return rest
    for name, new in _RESNET.items():
        if rest == name or rest.startswith(name + "_"):
            return new + rest[len(name):]
    return rest


def unet_path(name: str, family: str | None) -> str:
    """A UNet module name in original naming (diffusers names converted; original names kept)."""
    for rx, fn in _UNET_RULES:
        m = rx.fullmatch(name)
        if m:
            return fn(m, family)
    return name


# ---- SD3 MMDiT: diffusers naming → checkpoint naming ----------------------------------------------
# What diffusers' convert_sd3_transformer_checkpoint_to_diffusers does, per module: q/k/v are thirds of one qkv
# Linear; ``attn2`` is SD3.5 Medium's second x-block attention.
_SD3_TOP = {"context_embedder": "context_embedder", "pos_embed_proj": "x_embedder_proj",
            "time_text_embed_timestep_embedder_linear_1": "t_embedder_mlp_0",
            "time_text_embed_timestep_embedder_linear_2": "t_embedder_mlp_2",
            "time_text_embed_text_embedder_linear_1": "y_embedder_mlp_0",
            "time_text_embed_text_embedder_linear_2": "y_embedder_mlp_2",
            "norm_out_linear": "final_layer_adaLN_modulation_1", "proj_out": "final_layer_linear"}
_SD3_BLOCK = {"norm1_linear": "x_block_adaLN_modulation_1", "norm1_context_linear": "context_block_adaLN_modulation_1",
              "attn_to_out_0": "x_block_attn_proj", "attn_to_add_out": "context_block_attn_proj",
              "attn2_to_out_0": "x_block_attn2_proj", "ff_net_0_proj": "x_block_mlp_fc1", "ff_net_2": "x_block_mlp_fc2",
              "ff_context_net_0_proj": "context_block_mlp_fc1", "ff_context_net_2": "context_block_mlp_fc2"}
_RE_SD3_QKV = re.compile(r"(attn|attn2)_(?:to_([qkv])|add_([qkv])_proj)")
_RE_SD3_BLOCK = re.compile(r"transformer_blocks_(\d+)_(.+)")
_RE_SD3_SWAPPED = re.compile(r"norm_out_linear|transformer_blocks_\d+_norm1_context_linear")


def sd3_target(name: str) -> Target:
    """An MMDiT target in checkpoint naming (diffusers names converted; checkpoint names kept)."""
    if name in _SD3_TOP:
        return Target("unet", _SD3_TOP[name])
    m = _RE_SD3_BLOCK.fullmatch(name)
    if not m:
        return Target("unet", name)
    block, rest = f"joint_blocks_{m[1]}_", m[2]
    if rest in _SD3_BLOCK:
        return Target("unet", block + _SD3_BLOCK[rest])
    q = _RE_SD3_QKV.fullmatch(rest)
    if q:
        return Target("unet", block + ("context_block_attn_qkv" if q[3] else f"x_block_{q[1]}_qkv"), q[2] or q[3])
    return Target("unet", block + rest)


def scale_shift_swapped(part: str, name: str, family: str | None) -> bool:
    """diffusers' AdaLayerNormContinuous (the final norm, and the last block's context norm) puts scale before
    shift, where SD3's checkpoint puts shift first: a delta for it has its two halves the other way round."""
    return family == "sd3" and part == "unet" and _RE_SD3_SWAPPED.fullmatch(name) is not None


# ---- text encoders: HF CLIP naming ↔ open_clip naming --------------------------------------------
_RE_HF_LAYER = re.compile(r"(?:text_model_)?encoder_layers_(\d+)_(.+)")
_OPENCLIP_SUFFIX = {"mlp_fc1": "mlp_c_fc", "mlp_fc2": "mlp_c_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "self_attn_out_proj": "attn_out_proj"}
_RE_QKV = re.compile(r"(.*)_(q|k|v)_proj$")


def te_target(part: str, name: str, open_clip: bool) -> Target:
    """A text-encoder target; HF CLIP names are converted when the model's encoder is open_clip."""
    if name.startswith("model_"):  # checkpoint open_clip names (cond_stage_model.model.*) arrive as model_...
        name = name[len("model_"):]
    if not open_clip:
        if name.startswith("encoder_"):
            name = "text_model_" + name
        return Target(part, name)
    m = _RE_HF_LAYER.fullmatch(name)
    if m:
        layer, rest = m.groups()
        q = re.fullmatch(r"self_attn_(q|k|v)_proj", rest)
        if q:
            return Target(part, f"transformer_resblocks_{layer}_attn", q[1])
        return Target(part, f"transformer_resblocks_{layer}_{_OPENCLIP_SUFFIX.get(rest, rest)}")
    if name in ("text_model_final_layer_norm", "final_layer_norm"):
        return Target(part, "ln_final")
    q = re.fullmatch(r"(transformer_resblocks_\d+_attn)_(q|k|v)(?:_proj)?", name)
    if q:
        return Target(part, q[1], q[2])
    return Target(part, name)


def target_for(part: str, name: str, family: str | None) -> Target:
    """The model target of one file module name, given the file's base model."""
    if part == "unet":
        return sd3_target(name) if family == "sd3" else Target("unet", unet_path(name, family))
    if part == "te3":  # T5: the same module names in every naming
        return Target(part, name)
    open_clip = family == "sd2" or (part == "te2" and family != "sd3")  # SD3's CLIP-G has HF naming
    return te_target(part, name, open_clip)


# ---- base-model detection ----------------------------------------------------------------------
_RE_XL_UNET = re.compile(r"(label_emb|add_embedding|transformer_blocks_[1-9]|input_blocks_[45]_1_transformer_blocks_1"
                         r"|down_blocks_[12]_attentions_\d+_transformer_blocks_[1-9])")
_RE_SD3_UNET = re.compile(r"(joint_blocks|transformer_blocks)_\d+_|(final_layer|x_embedder|y_embedder|t_embedder|pos_embed"
                          r"|time_text_embed|norm_out)_|context_embedder$|proj_out$")
_DOWN = ("lora_down.weight", "hada_w1_b", "hada_w2_b")
_RE_TE_LAYER = re.compile(r"(?:layers|resblocks)_(\d+)_")


def detect_family(keys: dict[str, tuple[str, str, str]], shapes: dict[str, tuple[int, ...]],
                  metadata: dict[str, str]) -> str | None:
    """sd1/sd2/sdxl/sd3 from the file's structure first, its shapes next, its metadata last."""
    parts = {v[0] for v in keys.values()}
    names = [v[1] for v in keys.values() if v[0] == "unet"]
    if "te3" in parts or any(_RE_SD3_UNET.match(n) for n in names):
        return "sd3"
    if not names and "te2" in parts and family_from_metadata(metadata) == "sd3":  # CLIP-L/G alone: as SDXL's
        return "sd3"
    if "te2" in parts or any(_RE_XL_UNET.search(n) for n in names):
        return "sdxl"
    votes = []
    for key, (part, name, param) in keys.items():
        shape = shapes.get(key, ())
        if part == "te":
            m = _RE_TE_LAYER.search(name)
            if m and int(m[1]) >= 12:
                return "sd2"
            if name.startswith(("transformer_resblocks", "model_transformer_resblocks")):
                return "sd2"
            if param in _DOWN and len(shape) == 2 and shape[1] in (768, 1024):
                votes.append("sd1" if shape[1] == 768 else "sd2")
        elif param in _DOWN:
            if name.endswith("proj_in") and param == "lora_down.weight":
                votes.append("sd2" if len(shape) == 2 else "sd1")
            elif re.search(r"attn2_to_[kv]$", name) and len(shape) == 2 and shape[1] in (768, 1024):
                votes.append("sd1" if shape[1] == 768 else "sd2")
    if votes:
        return max(set(votes), key=votes.count)
    return family_from_metadata(metadata)


FAMILY_METADATA = ("ss_base_model_version", "modelspec.architecture", "ss_v2")  # what family_from_metadata reads


def family_from_metadata(metadata: dict[str, str]) -> str | None:
    base = str(metadata.get("ss_base_model_version", "")).lower()
    arch = str(metadata.get("modelspec.architecture", "")).lower()
    if base.startswith("sd3") or arch.startswith("stable-diffusion-3"):
        return "sd3"
    if base.startswith("sdxl") or "stable-diffusion-xl" in arch:
        return "sdxl"
    if str(metadata.get("ss_v2", "")) == "True" or base.startswith("sd_v2") or "stable-diffusion-v2" in arch:
        return "sd2"
    if base.startswith("sd_v1") or "stable-diffusion-v1" in arch:
        return "sd1"
    return None


FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd3": "SD3", None: "unknown"}


def family_mismatch(network_family: str | None, model_family: str | None) -> str | None:
    """Why a network made for another base model than the loaded one is refused (None when it fits or
    either side is unknown)."""
    if not network_family or not model_family or network_family == model_family:
        return None
    return (f"made for {FAMILY_NAMES[network_family]}, but the loaded model is "
            f"{FAMILY_NAMES[model_family]}; not applied")


# ---- kohya names of model targets (what kohya's trainers write) -------------------------------------
_OPEN_CLIP_TO_HF = (("transformer_resblocks_", "text_model_encoder_layers_"), ("_attn_", "_self_attn_"),
                    ("_mlp_c_fc", "_mlp_fc1"), ("_mlp_c_proj", "_mlp_fc2"))
_KOHYA_TE_PREFIXES = {"sdxl": {"te": "lora_te1_", "te2": "lora_te2_"},
                      "sd3": {"te": "lora_te1_", "te2": "lora_te2_", "te3": "lora_te3_"}}
_RESNET_TO_DIFFUSERS = {v: k for k, v in _RESNET.items()}


def diffusers_unet_name(path: str) -> str | None:
    """SD1/SD2 compvis UNet name → the diffusers name kohya writes (None for layers kohya never trains)."""
    m = re.fullmatch(r"input_blocks_(\d+)_(\d+)_(.+)", path)
    if m and int(m[1]) > 0:
        level, idx = divmod(int(m[1]) - 1, 3)
        if idx == 2:
            return f"down_blocks_{level}_downsamplers_0_conv" if m[3] == "op" else None
        if m[2] == "0":
            return f"down_blocks_{level}_resnets_{idx}_{_resnet_suffix(m[3])}"
        return f"down_blocks_{level}_attentions_{idx}_{m[3]}"
    m = re.fullmatch(r"middle_block_(\d)_(.+)", path)
    if m:
        if m[1] == "1":
            return f"mid_block_attentions_0_{m[2]}"
        return f"mid_block_resnets_{int(m[1]) // 2}_{_resnet_suffix(m[2])}"
    m = re.fullmatch(r"output_blocks_(\d+)_(\d+)_(.+)", path)
    if m:
        level, idx = divmod(int(m[1]), 3)
        if m[3] == "conv" and m[2] != "0":
            return f"up_blocks_{level}_upsamplers_0_conv"
        if m[2] == "0":
            return f"up_blocks_{level}_resnets_{idx}_{_resnet_suffix(m[3])}"
        return f"up_blocks_{level}_attentions_{idx}_{m[3]}"
    return None


def _resnet_suffix(rest: str) -> str:
    for name, new in _RESNET_TO_DIFFUSERS.items():
        if rest == name or rest.startswith(name + "_"):
            return new + rest[len(name):]
    return rest


def kohya_name(part: str, path: str, open_clip: bool, family: str) -> str:
    """The kohya module name of a target: diffusers names for the SD1/SD2 UNet (SDXL and SD3 keep the checkpoint's),
    HF CLIP names for every text encoder, ``lora_te1_``/``lora_te2_`` for SDXL's two, ``lora_te1_``-``lora_te3_``
    for SD3's CLIP-L, CLIP-G and T5."""
    if part == "unet":
        d = diffusers_unet_name(path) if family not in ("sdxl", "sd3") else None
        return "lora_unet_" + (d if d and unet_path(d, family) == path else path)
    if open_clip:
        for a, b in _OPEN_CLIP_TO_HF:
            path = path.replace(a, b)
    return _KOHYA_TE_PREFIXES.get(family, {}).get(part, "lora_te_") + path
