"""Tiny SD3 models of the WebUI's own classes (A1111 v1.10.1 ``modules/models/sd3``: ``mmdit.py``,
``other_impls.py``, ``sd3_impls.py``), random weights, and the diffusers model with the same weights as an oracle.

The three files are read from the test bed's source archive of the WebUI (``../shared/webui-testbed/src``) and run
unchanged under a private ``modules`` package, taken out of ``sys.modules`` again once they are loaded (so the
stand-in ``modules`` of tests/standin and a real WebUI never meet them). They import the WebUI for one thing
besides each other: ``sd_hijack.TextualInversionEmbeddings``, the token-embedding layer the WebUI hooks for
textual inversion; an ``nn.Embedding`` with the same constructor takes its place (no LoRA touches it).

Module naming is the WebUI's ``SD3Inferencer``'s (and the checkpoint's): ``model.diffusion_model.*`` (MMDiT),
``text_encoders.clip_l.transformer.*``, ``text_encoders.clip_g.transformer.*``, ``text_encoders.t5xxl.transformer.*``.
The MMDiT has depth 2 (the WebUI ties its width to the depth, 64 per block, so SD3 Medium's 24 blocks would be
1536 wide): one ordinary joint block and the last, context-pre-only one. The text encoders have their real
layer counts (CLIP-L 12, CLIP-G 32, T5-XXL 24) at small widths.
"""
from __future__ import annotations

import functools
import pathlib
import sys
import tarfile
import types
import warnings

import pytest
import torch
from torch import nn

from models import randomize_

WEBUI_SOURCE = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "webui-testbed" / "src"
                / "stable-diffusion-webui-82a973c0.tar.gz")
DEPTH, HIDDEN, POS_EMBED_MAX = 2, 128, 4
CLIP_L = {"hidden_act": "quick_gelu", "hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 2,
          "num_hidden_layers": 12}
CLIP_G = {"hidden_act": "gelu", "hidden_size": 48, "intermediate_size": 192, "num_attention_heads": 2,
          "num_hidden_layers": 32, "textual_inversion_key": "clip_g"}
T5 = {"d_ff": 64, "d_model": 96, "num_heads": 4, "num_layers": 24, "vocab_size": 1000}
ADM = CLIP_L["hidden_size"] + CLIP_G["hidden_size"]   # pooled CLIP-L + CLIP-G
CONTEXT = T5["d_model"]                                 # CLIP-L/G features padded to T5's width, as the WebUI does


class TextualInversionEmbeddings(nn.Embedding):
    """``modules.sd_hijack.TextualInversionEmbeddings``'s constructor on a plain embedding (see the module doc)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, textual_inversion_key: str = "clip_l", **kwargs):
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        self.textual_inversion_key = textual_inversion_key


@functools.lru_cache(maxsize=None)
def webui_sd3() -> types.SimpleNamespace:
    """``mmdit``, ``other_impls`` and ``sd3_impls`` of the WebUI, loaded from its source archive."""
    if not WEBUI_SOURCE.exists():
        pytest.skip(f"no WebUI source archive at {WEBUI_SOURCE}")
    with tarfile.open(WEBUI_SOURCE) as tar:
        top = tar.getnames()[0].split("/")[0]
        sources = {name: tar.extractfile(f"{top}/modules/models/sd3/{name}.py").read().decode()
                   for name in ("other_impls", "mmdit", "sd3_impls")}
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "modules" or k.startswith("modules.")}
    loaded = {}
    try:
        for name in ("modules", "modules.models", "modules.models.sd3"):
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__path__ = []
        sys.modules["modules"].sd_hijack = sys.modules["modules.sd_hijack"] = types.ModuleType("modules.sd_hijack")
        sys.modules["modules.sd_hijack"].TextualInversionEmbeddings = TextualInversionEmbeddings
        for name, source in sources.items():
            module = types.ModuleType(f"modules.models.sd3.{name}")
            module.__file__ = f"{WEBUI_SOURCE.name}/{top}/modules/models/sd3/{name}.py"
            sys.modules[module.__name__] = module
            setattr(sys.modules["modules.models.sd3"], name, module)
            with warnings.catch_warnings():  # sd3_impls' @torch.autocast("cuda") on a machine without CUDA
                warnings.simplefilter("ignore", UserWarning)
                exec(compile(source, module.__file__, "exec"), module.__dict__)
            loaded[name] = module
    finally:
        for k in [k for k in sys.modules if k == "modules" or k.startswith("modules.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return types.SimpleNamespace(**loaded)


class SD3Model(nn.Module):
    """The WebUI's ``SD3Inferencer`` as far as the engine sees it: ``model`` (sd3_impls.BaseModel around the MMDiT)
    and ``text_encoders`` (``clip_l``, ``clip_g`` and, when T5 is on, ``t5xxl``)."""

    is_sd3 = True


def tiny_sd3(seed: int = 0, t5: bool = True) -> SD3Model:
    """A tiny random SD3 model of the WebUI's classes (see the module doc)."""
    w = webui_sd3()
    shapes = {"x_embedder.proj.weight": (HIDDEN, 16, 2, 2), "pos_embed": (1, POS_EMBED_MAX ** 2, HIDDEN),
              "y_embedder.mlp.0.weight": (HIDDEN, ADM), "context_embedder.weight": (HIDDEN, CONTEXT)}
    assert HIDDEN == 64 * DEPTH
    root = SD3Model()
    with torch.no_grad():  # as the WebUI builds them (CLIPTextModel writes its text_projection in place)
        root.model = w.sd3_impls.BaseModel(shift=3, state_dict={k: torch.empty(s) for k, s in shapes.items()},
                                           prefix="", device="cpu", dtype=torch.float32)
        root.text_encoders = nn.Module()
        root.text_encoders.clip_g = w.other_impls.SDXLClipG(CLIP_G, device="cpu", dtype=torch.float32)
        root.text_encoders.clip_l = w.other_impls.SDClipModel(
            layer="hidden", layer_idx=-2, device="cpu", dtype=torch.float32, layer_norm_hidden_state=False,
            return_projected_pooled=False, textmodel_json_config=CLIP_L)
        if t5:
            root.text_encoders.t5xxl = w.other_impls.T5XXLModel(T5, device="cpu", dtype=torch.float32)
        randomize_(root, seed)
        gen = torch.Generator().manual_seed(seed)
        root.model.diffusion_model.pos_embed.copy_(torch.randn(root.model.diffusion_model.pos_embed.shape, generator=gen))
        for module in root.modules():
            if type(module).__name__ == "T5LayerNorm":  # a norm weight, around 1 as the other norms'
                module.weight.add_(1.0)
            if type(module).__name__ == "T5Attention":  # T5's own init, (d_model·d_head)^-½ for q: its attention
                module.q.weight.mul_((T5["num_heads"] / T5["d_model"]) ** 0.5)  # has no 1/√d_head of its own
    return root.eval()


def mmdit_inputs(batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """Latents [B, 16, 8, 8], timesteps, pooled vector y and context, as sd3_impls.BaseModel passes them."""
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 16, 8, 8, generator=gen), "t": torch.tensor([900.0, 250.0][:batch]),
            "y": torch.randn(batch, ADM, generator=gen), "context": torch.randn(batch, 7, CONTEXT, generator=gen)}


def run_mmdit(model: SD3Model, inp: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.model.diffusion_model(inp["x"], inp["t"], y=inp["y"], context=inp["context"])


def text_tokens(vocab: int, seed: int = 2, length: int = 77) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab - 1, (2, length), generator=gen)


def run_text_encoders(model: SD3Model) -> list[torch.Tensor]:
    """Each text encoder's hidden output and pooled output (T5: its last hidden state)."""
    te = model.text_encoders
    outs = []
    with torch.no_grad():
        for name in ("clip_l", "clip_g", "t5xxl"):
            encoder = getattr(te, name, None)
            if encoder is None:
                continue
            vocab = encoder.transformer.get_input_embeddings().num_embeddings
            z, pooled = encoder(text_tokens(vocab).tolist())
            outs += [z] + ([pooled] if pooled is not None else [])
    return outs


# ---- diffusers with the same weights (Python 3.11 venv only) ------------------------------------------
def diffusers_transformer(model: SD3Model) -> nn.Module:
    """diffusers' ``SD3Transformer2DModel`` holding the tiny MMDiT's weights."""
    return diffusers_transformer_from({k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()})


def diffusers_transformer_from(state: dict[str, torch.Tensor]) -> nn.Module:
    """diffusers' ``SD3Transformer2DModel`` holding an MMDiT state dict (checkpoint names without their prefix),
    converted by diffusers' own ``convert_sd3_transformer_checkpoint_to_diffusers`` (what its single-file loader runs
    on SD3 checkpoints); the sizes are read from the weights as the WebUI's sd3_impls.BaseModel reads them."""
    pytest.importorskip("diffusers")
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    depth = state["x_embedder.proj.weight"].shape[0] // 64
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=state["x_embedder.proj.weight"].shape[2], in_channels=16, out_channels=16,
        num_layers=depth, attention_head_dim=64, num_attention_heads=depth, caption_projection_dim=64 * depth,
        joint_attention_dim=state["context_embedder.weight"].shape[1],
        pooled_projection_dim=state["y_embedder.mlp.0.weight"].shape[1],
        pos_embed_max_size=round(state["pos_embed"].shape[1] ** 0.5))
    transformer.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(dict(state)), strict=True)
    return transformer.eval()


def run_diffusers(transformer: nn.Module, inp: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return transformer(hidden_states=inp["x"], encoder_hidden_states=inp["context"], pooled_projections=inp["y"],
                           timestep=inp["t"], return_dict=False)[0]


#: Every Linear/Conv2d of diffusers' SD3 transformer (peft matches names by suffix).
PEFT_SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                    "norm1_context.linear", "norm_out.linear", "proj_out", "context_embedder", "linear_1", "linear_2",
                    "pos_embed.proj"]


def save_diffusers_sd3_lora(path: pathlib.Path, transformer: nn.Module, rank: int, alpha: float, seed: int,
                            targets: list[str] = PEFT_SD3_TARGETS, std: float = 0.1) -> None:
    """peft LoRA injected into ``transformer`` with diffusers' own ``add_adapter`` (left active: the reference),
    randomised, and saved by ``StableDiffusion3Pipeline.save_lora_weights`` (keys ``transformer.….lora_A.weight``,
    the LoraConfig in the header's ``lora_adapter_metadata``)."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)
    transformer.add_adapter(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    layers = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    StableDiffusion3Pipeline.save_lora_weights(save_directory=str(path.parent), transformer_lora_layers=layers,
                                               transformer_lora_adapter_metadata=config.to_dict(),
                                               weight_name=path.name, safe_serialization=True)


# ---- kohya's naming (sd-scripts networks/lora_sd3.py) ----------------------------------------------------
KOHYA_SD3_PREFIX = {"unet": "lora_unet_", "te": "lora_te1_", "te2": "lora_te2_", "te3": "lora_te3_"}


def kohya_sd3_lora(model: SD3Model, rank: int = 4, alpha: float = 2.0, seed: int = 0,
                   scale: float = 0.1) -> dict[str, torch.Tensor]:
    """A LoRA named as sd-scripts' lora_sd3.py names it: ``lora_unet_`` + the MMDiT's checkpoint names (one module
    over each fused ``qkv``; the embedders and final layer as its ``emb_dims`` adds them), ``lora_te1_``/``te2_``/
    ``te3_`` + the CLIP-L/CLIP-G/T5 module names (the WebUI's are transformers' own)."""
    from lorafiles import module_targets

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for part, path, module, _open_clip in module_targets(model):
        key = KOHYA_SD3_PREFIX[part] + path
        if isinstance(module, nn.Conv2d):
            down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=gen) * scale
            up = torch.randn(module.out_channels, rank, 1, 1, generator=gen) * scale
        else:
            down = torch.randn(rank, module.in_features, generator=gen) * scale
            up = torch.randn(module.out_features, rank, generator=gen) * scale
        sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = down, up
        sd[key + ".alpha"] = torch.tensor(alpha)
    return sd
