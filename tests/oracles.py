"""Oracle helpers: reference LoRA files and reference outputs made by libraries nobody here wrote.

* ``diffusers`` builds a ``UNet2DConditionModel`` with the config *it* derives from the ldm config
  (``create_unet_diffusers_config_from_ldm``) and loads the ldm UNet's weights through *its own*
  checkpoint converter (``convert_ldm_unet_checkpoint``), so the ldm <-> diffusers naming used by the
  oracle tests is independent of ``lib_lora``'s key mapping.
* ``lycoris-lora`` (``lycoris.kohya.create_network``) produces LoRA / LoCon / LoHa / LoKr / IA3 / Full /
  GLoRA / Diag-OFT / BOFT / DyLoRA / T-LoRA / DoRA / norm files on that diffusers UNet (and the
  transformers text encoder); its own forward (the network applied to the model) is the reference.
  lycoris 4.1.3 traps met on SD models (worked around here): its built-in "full" preset trips its own
  duplicate-name assertion (``TimestepEmbedding`` + ``time_embedding.linear_1``), its built-in "ia3"
  preset matches nothing (names matched from the start of the path), ``create_network`` does not pass
  ``train_on_input`` to IA3, its GLoRA "transformer only" switch never fires (compares the algo string
  with a class), ``merge_to`` double-applies alpha/rank for LoHa/LoKr, DyLoRA's forward picks a random
  rank, and T-LoRA's own forward fails on padded 3x3 convs (so it gets the attention-only preset).
* ``peft`` + ``diffusers`` produce diffusers/PEFT-format files (``save_lora_weights``), also converted
  with diffusers' own ``convert_state_dict_to_diffusers`` / ``convert_state_dict_to_kohya``; peft's
  forward with the adapter active is the reference.

Every model is built from a config with random weights (nothing is downloaded), fp32, CPU.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# lycoris picks a compute backend per call; on CPU that is its torch reference body anyway, but pin it
# so that no torch.compile / triton path can ever be taken by the oracle.
os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")

import torch
from torch import nn

import models as M

# ---------------------------------------------------------------------------------------------
# ldm <-> diffusers UNet


def ldm_original_config(family: str) -> dict[str, Any]:
    """The ``original_config`` (v1/v2-inference.yaml layout) that diffusers' converters read, for the
    tiny ldm UNet of ``family`` (:data:`models.UNET_CONFIGS`)."""
    return {
        "model": {
            "params": {
                "unet_config": {"params": copy.deepcopy(M.UNET_CONFIGS[family])},
                # only ch_mult is read (for sample_size); SD's VAE has 4 levels
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }


def diffusers_unet_config(family: str) -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs as diffusers itself derives them from the ldm config."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    image_size = 8 * M.UNET_CONFIGS[family]["image_size"]
    with warnings.catch_warnings():  # passing image_size is deprecated but avoids checkpoint sniffing
        warnings.simplefilter("ignore")
        return create_unet_diffusers_config_from_ldm(ldm_original_config(family), {}, image_size=image_size)


def diffusers_unet_like(ldm_unet: nn.Module, family: str) -> nn.Module:
    """A diffusers ``UNet2DConditionModel`` holding exactly ``ldm_unet``'s weights.

    Config and weight conversion are diffusers' own (``single_file_utils``); the load is strict, so
    every diffusers parameter comes from the ldm UNet.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    config = diffusers_unet_config(family)
    unet = UNet2DConditionModel(**config)
    checkpoint = {LDM_UNET_KEY + k: v.detach().clone() for k, v in ldm_unet.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    unet.load_state_dict(converted, strict=True)
    return unet.float().eval()


# ---------------------------------------------------------------------------------------------
# fixed inputs and forward runners


@dataclass
class Inputs:
    x: torch.Tensor  # latents [B, 4, H, W]
    t: torch.Tensor  # timesteps [B]
    context: torch.Tensor  # cross-attention context [B, 77, context_dim]
    tokens: torch.Tensor  # text-encoder token ids [B, 77]


def fixed_inputs(family: str, seed: int = 1234, batch: int = 2, size: int = 16) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    ctx_dim = M.UNET_CONFIGS[family]["context_dim"]
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.tensor([37, 901][:batch] + [500] * max(0, batch - 2), dtype=torch.long)
    context = torch.randn(batch, M.CONTEXT_LENGTH, ctx_dim, generator=g)
    tokens = M.random_tokens(batch, seed=seed + 1)
    return Inputs(x, t, context, tokens)


@torch.no_grad()
def run_ldm_unet(unet: nn.Module, inp: Inputs) -> torch.Tensor:
    return unet(inp.x, inp.t, context=inp.context).float()


@torch.no_grad()
def run_diffusers_unet(unet: nn.Module, inp: Inputs) -> torch.Tensor:
    return unet(inp.x, inp.t, encoder_hidden_states=inp.context).sample.float()


@torch.no_grad()
def run_clip_text(text_model: nn.Module, inp: Inputs) -> torch.Tensor:
    return text_model(input_ids=inp.tokens).last_hidden_state.float()


def sd1_text_path(model: nn.Module) -> str:
    """Dotted path of the ``CLIPTextModel`` inside an sd1 container (wrapped or not)."""
    for path in ("cond_stage_model.wrapped.transformer", "cond_stage_model.transformer"):
        try:
            model.get_submodule(path)
            return path
        except AttributeError:
            continue
    raise AttributeError("no CLIPTextModel found under cond_stage_model")


# ---------------------------------------------------------------------------------------------
# comparisons


def tolerance(ref: torch.Tensor, rel: float = 1e-5) -> float:
    """atol ``rel`` scaled by the output's magnitude (never below ``rel``)."""
    return rel * max(1.0, float(ref.abs().max()))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Deep copy of every parameter and buffer (by name), for bit-exact restore checks."""
    out = {f"param:{k}": v.detach().clone() for k, v in model.named_parameters(remove_duplicate=False)}
    out.update({f"buffer:{k}": v.detach().clone() for k, v in model.named_buffers(remove_duplicate=False)})
    return out


def snapshot_diff(model: nn.Module, snap: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensor differs (bitwise, dtype, shape or presence) from ``snap``."""
    now = snapshot(model)
    bad = sorted(set(snap) ^ set(now))
    for k in snap.keys() & now.keys():
        a, b = snap[k], now[k]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            bad.append(k)
    return sorted(bad)


# ---------------------------------------------------------------------------------------------
# lycoris


#: The "full" preset of SD-era LyCORIS (attn + resnets + up/downsamplers + conv_in/out + time embedding).
#: lycoris 4.1.3's built-in "full" preset also lists ``TimestepEmbedding`` (for Anima) next to the names
#: ``time_embedding.linear_1/2``, which on an SD UNet creates the same module twice and trips lycoris'
#: own ``duplicated lora name: lora_unet_time_embedding_linear_1`` assertion; hence a preset file.
SD_FULL_PRESET = """\
enable_conv = true
use_fnmatch = false
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""

#: Attention blocks (incl. SD1's 1x1-conv proj_in/out) and the text encoder only.
SD_ATTN_PRESET = """\
enable_conv = true
use_fnmatch = false
unet_target_module = ["Transformer2DModel"]
unet_target_name = []
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""

#: lycoris' recommended IA3 module selection (k, v, and the second feed-forward layer scaled on its
#: input).  Its built-in "ia3" preset matches nothing on diffusers / transformers models: its names
#: ("to_k", "mlp.fc2") are matched with re.match, i.e. from the start of the full module path.  Same
#: selection with fnmatch patterns:
SD_IA3_PRESET = """\
enable_conv = false
use_fnmatch = true
unet_target_module = []
unet_target_name = ["*to_k", "*to_v", "*ff.net.2"]
text_encoder_target_module = []
text_encoder_target_name = ["*k_proj", "*v_proj", "*mlp.fc2"]

[name_algo_map."*mlp.fc2"]
train_on_input = true

[name_algo_map."*ff.net.2"]
train_on_input = true
"""

_PRESETS = {"full": SD_FULL_PRESET, "attn": SD_ATTN_PRESET, "ia3": SD_IA3_PRESET}
_PRESET_DIR: str | None = None


def lycoris_preset(kind: str = "full") -> str:
    """Path of a lycoris preset toml (``"full"``, ``"attn"`` or ``"ia3"``), written once per process."""
    global _PRESET_DIR
    if _PRESET_DIR is None:
        _PRESET_DIR = tempfile.mkdtemp(prefix="lib_lora_oracle_presets_")
    text = _PRESETS[kind]
    path = Path(_PRESET_DIR) / f"sd_{kind}.toml"
    if not path.exists():
        path.write_text(text, encoding="utf-8")
    return str(path)


def _quiet_lycoris() -> None:
    import logging

    from lycoris.logging import logger

    logger.setLevel(logging.ERROR)
    logging.getLogger("lycoris").setLevel(logging.ERROR)


#: parameters that lycoris initialises at their natural magnitude and that are multiplicative
#: (weight norms, OFT rescale, T-LoRA singular values, use_scalar): perturbed around it, not replaced.
_MULTIPLICATIVE = ("dora_scale", "rescale", "lambda_layer")


@torch.no_grad()
def randomize_lycoris_(network: nn.Module, seed: int, std: float) -> None:
    """Overwrite every parameter of every lycoris module (in creation order) from a seeded generator.

    LyCORIS zero-inits one factor of most algos (lora_up, hada_w2_a, lokr_w2(_b), IA3 weight, oft
    blocks, Full diff, GLoRA a2/b2, norm w/b): without this the patch would be exactly zero.
    """
    gen = torch.Generator().manual_seed(int(seed))
    for lora in network.loras:
        for name, p in lora.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            leaf = name.rsplit(".", 1)[-1]
            if leaf in _MULTIPLICATIVE:
                p.mul_(1 + std * noise)
            elif leaf == "scalar":  # use_scalar: folded into the saved up weight
                p.copy_(1 + 0.5 * noise)
            else:
                p.copy_(std * noise)


def _pin_dylora_full_rank(network: nn.Module) -> None:
    """DyLoRA's forward draws a random rank per call (training behaviour).  Pin it to the full rank,
    which is what the saved file (all blocks + alpha) represents.  With ``block_size=1``, lycoris'
    ``get_weight(lora_dim - 1)`` uses every block and the scale ``alpha / lora_dim``."""
    from lycoris.modules.dylora import DyLoraModule

    for lora in network.loras:
        if isinstance(lora, DyLoraModule):
            if lora.block_size != 1:
                raise ValueError("pinning DyLoRA to full rank needs block_size=1")
            lora.get_random_rank_weight = (lambda m=lora: m.get_weight(m.lora_dim - 1))


def lycoris_file_modules(path: str | os.PathLike) -> set[str]:
    """Names of the modules (key prefixes before the first '.') in a kohya/lycoris file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k.split(".", 1)[0] for k in f.keys()}


def make_lycoris_file(path: str | os.PathLike, algo: str, unet_diffusers: nn.Module | None,
                      text_encoder: nn.Module | None, seed: int, *, dim: int = 4, alpha: float = 2.0,
                      std: float = 0.1, preset: str = "full", te_multiplier: float = 1.0,
                      unet_multiplier: float = 1.0, family: str | None = "sd1", **kw: Any) -> nn.Module:
    """Create a lycoris network with ``lycoris.kohya.create_network`` on ``unet_diffusers`` (a diffusers
    ``UNet2DConditionModel``) and ``text_encoder`` (a transformers ``CLIPTextModel``; either may be
    None), randomise all its parameters (seeded, scale ``std``), apply it to the models (lycoris'
    forward now runs through them; ``te_multiplier`` / ``unet_multiplier`` set each module's strength)
    and save it with ``network.save_weights`` (fp32).  Returns the applied network.

    The metadata is what kohya's sd-scripts (the usual LyCORIS trainer) writes next to it:
    ``ss_network_module`` / ``_dim`` / ``_alpha`` / ``_args`` and, for ``family`` "sd1" / "sd2",
    ``ss_v2`` and ``ss_base_model_version`` (``family=None``: no base-model fields).

    ``kw`` goes to ``create_network``: ``conv_dim``, ``conv_alpha``, ``use_tucker``, ``use_scalar``,
    ``dora_wd``, ``wd_on_output``, ``factor``, ``decompose_both``, ``full_matrix``,
    ``unbalanced_factorization``, ``rs_lora``, ``train_norm``, ``constraint``, ``rescaled``,
    ``block_size`` ...  (IA3's ``train_on_input`` is not passed on by ``create_network``; the "ia3"
    preset sets it per module.)  ``preset``: ``"full"``, ``"attn"`` or ``"ia3"`` (see below).

    Reference = this forward, never lycoris' ``merge_to``: in 4.1.3 LoHa/LoKr ``get_diff_weight``
    applies ``scale`` on top of a weight that already carries it (alpha/rank twice), and DyLoRA's
    forward draws a random rank (pinned here to the full rank the file stores).
    """
    _quiet_lycoris()
    from lycoris.kohya import LycorisNetworkKohya, create_network

    # apply_preset() only sets the keys a preset has, on the class: reset what an earlier preset left
    LycorisNetworkKohya.MODULE_ALGO_MAP = {}
    LycorisNetworkKohya.NAME_ALGO_MAP = {}
    LycorisNetworkKohya.USE_FNMATCH = False
    LycorisNetworkKohya.TARGET_EXCLUDE_NAME = []

    gc_module = None
    if algo == "tlora":
        # T-LoRA's module init calls gc.collect() once per module (~0.3 s each here): skip it meanwhile.
        import lycoris.modules.tlora as tlora_mod

        class _NoGC:
            @staticmethod
            def collect(*a: Any) -> int:
                return 0

        gc_module, tlora_mod.gc = tlora_mod.gc, _NoGC
    try:
        network = create_network(unet_multiplier, dim, alpha, None, text_encoder, unet_diffusers, algo=algo,
                                 preset=lycoris_preset(preset), warn_on_unmatched=False, **kw)
    finally:
        if gc_module is not None:
            tlora_mod.gc = gc_module
    for lora in network.text_encoder_loras:
        lora.multiplier = te_multiplier
    for lora in network.unet_loras:
        lora.multiplier = unet_multiplier
    randomize_lycoris_(network, seed, std)
    network.apply_to(text_encoder, unet_diffusers, apply_text_encoder=text_encoder is not None,
                     apply_unet=unet_diffusers is not None)
    if algo == "dylora":
        _pin_dylora_full_rank(network)
    metadata = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps({"algo": algo, "preset": preset, **{k: str(v) for k, v in kw.items()}}),
    }
    if family is not None:
        metadata["ss_v2"] = str(family == "sd2")
        metadata["ss_base_model_version"] = {"sd1": "sd_v1", "sd2": "sd_v2"}[family]
    network.save_weights(str(path), torch.float32, metadata)
    return network


# ---------------------------------------------------------------------------------------------
# peft / diffusers


#: diffusers UNet module names (suffixes) that peft LoRA is injected into: attention, feed-forward,
#: Transformer2D proj_in/out (1x1 conv on SD1, Linear on SD2), resnets (3x3 convs, 1x1 shortcut, time
#: projection), down/upsampler convs, conv_in/out, time embedding.
PEFT_UNET_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out",
    "linear_1", "linear_2",
]
PEFT_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@torch.no_grad()
def _randomize_peft_(model: nn.Module, gen: torch.Generator, std: float) -> int:
    n = 0
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            p.copy_(std * torch.randn(p.shape, generator=gen))
            n += 1
        elif ".lora_magnitude_vector." in name:
            p.mul_(1 + std * torch.randn(p.shape, generator=gen))
            n += 1
    return n


def make_peft_file(path: str | os.PathLike, unet_diffusers: nn.Module | None, text_encoder: nn.Module | None,
                   rank: int, seed: int, *, dora: bool = False, alpha: float | None = None, std: float = 0.1,
                   layout: str = "peft", alpha_metadata: bool = False) -> dict[str, Any]:
    """Inject peft LoRA (``LoraConfig(r=rank, lora_alpha=alpha or rank, use_dora=dora)``) into the
    diffusers UNet (:data:`PEFT_UNET_TARGETS`) and the ``CLIPTextModel`` (:data:`PEFT_TEXT_TARGETS`)
    with their own ``add_adapter``, randomise lora_A, lora_B (and DoRA magnitudes), then save:

    * ``layout="peft"``: ``StableDiffusionPipeline.save_lora_weights`` of ``get_peft_model_state_dict``
      (keys ``unet.<module>.lora_A.weight`` / ``text_encoder.<module>.lora_B.weight`` ...);
      with ``alpha_metadata`` the LoraConfigs go in as ``*_lora_adapter_metadata`` (diffusers stores
      them in the safetensors header under ``lora_adapter_metadata``);
    * ``layout="diffusers"``: the same after diffusers' ``convert_state_dict_to_diffusers`` (what the
      diffusers LoRA training scripts save: ``to_q.lora.down.weight``, ``q_proj.lora_linear_layer.up``..);
    * ``layout="kohya"``: diffusers' ``convert_state_dict_to_kohya`` (``lora_unet_*`` / ``lora_te1_*``
      with ``.alpha`` = rank, so only valid for ``alpha == rank``), written with safetensors.

    peft's forward (adapters active) is the reference afterwards.  Returns the configs.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    alpha = rank if alpha is None else alpha
    gen = torch.Generator().manual_seed(int(seed))
    configs: dict[str, Any] = {}
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, model, targets in (("unet", unet_diffusers, PEFT_UNET_TARGETS),
                                ("text_encoder", text_encoder, PEFT_TEXT_TARGETS)):
        if model is None:
            continue
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_dora=dora,
                         init_lora_weights=True)
        model.add_adapter(cfg)
        if _randomize_peft_(model, gen, std) == 0:
            raise RuntimeError(f"peft injected nothing into {key}")
        model.eval()
        configs[key] = cfg
        layers[key] = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}

    path = Path(path)
    if layout == "kohya":
        if alpha != rank:
            raise ValueError("convert_state_dict_to_kohya writes alpha = rank")
        from safetensors.torch import save_file

        packed = {f"{k}.{name}": v for k, sd in layers.items() for name, v in sd.items()}
        state = convert_state_dict_to_kohya(packed)
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
        return configs
    if layout == "diffusers":
        layers = {k: convert_state_dict_to_diffusers(sd) for k, sd in layers.items()}
    elif layout != "peft":
        raise ValueError(f"unknown layout {layout!r}")
    kwargs: dict[str, Any] = {}
    if alpha_metadata:
        if "unet" in configs:
            kwargs["unet_lora_adapter_metadata"] = configs["unet"].to_dict()
        if "text_encoder" in configs:
            kwargs["text_encoder_lora_adapter_metadata"] = configs["text_encoder"].to_dict()
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(path.parent),
        unet_lora_layers=layers.get("unet"),
        text_encoder_lora_layers=layers.get("text_encoder"),
        weight_name=path.name,
        safe_serialization=True,
        **kwargs,
    )
    return configs


def file_keys(path: str | os.PathLike) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def file_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def peft_file_modules(path: str | os.PathLike) -> set[str]:
    """Module names (prefix + module path) in a diffusers/peft-format file."""
    mods = set()
    for k in file_keys(path):
        for marker in (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", ".lora_linear_layer.",
                       ".lora_magnitude_vector"):
            if marker in k:
                mods.add(k.split(marker, 1)[0])
                break
        else:
            mods.add(k.rsplit(".", 1)[0])
    return mods


def describe(x: Any) -> str:
    """Short repr for failure messages (dicts/lists truncated)."""
    if isinstance(x, dict):
        items = list(x.items())
        s = ", ".join(f"{k!r}: {v!r}" for k, v in items[:12])
        return "{" + s + (f", ... ({len(items)} total)" if len(items) > 12 else "") + "}"
    if isinstance(x, (list, tuple, set)):
        items = sorted(x, key=str) if isinstance(x, set) else list(x)
        s = ", ".join(repr(v) for v in items[:12])
        return "[" + s + (f", ... ({len(items)} total)" if len(items) > 12 else "") + "]"
    return repr(x)

