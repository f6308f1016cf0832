"""Test model builders: tiny (and one full-size) SD1 / SD2 / SDXL models with random weights.

Everything here is built from configs (nothing is downloaded), is fp32, and is deterministic
for a given seed: every parameter (including ldm's zero-initialised output layers) is
overwritten by :func:`randomize_` from a seeded ``torch.Generator``.

Module naming follows the real WebUI / checkpoint naming, which is the engine's contract:

* SD1:  ``model.diffusion_model.*`` (ldm ``UNetModel``) and
  ``cond_stage_model[.wrapped].transformer.text_model.*`` (transformers ``CLIPTextModel``)
* SD2:  ``model.diffusion_model.*`` and ``cond_stage_model[.wrapped].model.*``
  (open_clip ``CLIP`` with ``.visual`` deleted, as ldm's ``FrozenOpenCLIPEmbedder`` does)
* SDXL: the ``sgm`` classes are not on PyPI, so :func:`sdxl_skeleton` builds a structural
  skeleton (real torch leaves at exactly the inventory's names, dims shrunk) from
  ``shared/fixtures/module_inventory.json``.

``wrapped=True`` mirrors the running WebUI, where the text encoder is wrapped by
``FrozenCLIPEmbedderWithCustomWords`` & co: ``cond_stage_model.wrapped.transformer...``,
``conditioner.embedders.N.wrapped.transformer...``.  ``wrapped=False`` is the checkpoint naming.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

FAMILIES = ("sd1", "sd2", "sdxl")

INVENTORY_PATH: Path = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "module_inventory.json"

# ---------------------------------------------------------------------------------------------
# configs

_UNET_COMMON: dict[str, Any] = dict(
    image_size=32,  # unused by UNetModel.forward; kept as in the real configs
    in_channels=4,
    out_channels=4,
    num_res_blocks=2,
    attention_resolutions=[4, 2, 1],
    channel_mult=[1, 2, 4, 4],
    use_spatial_transformer=True,
    transformer_depth=1,
    use_checkpoint=False,
    legacy=False,
)

#: Tiny ldm ``UNetModel`` kwargs.  Block counts are the real ones, only widths shrink
#: (GroupNorm32 needs every channel count, incl. skip concatenations, divisible by 32).
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": dict(_UNET_COMMON, model_channels=32, num_heads=4, context_dim=32, use_linear_in_transformer=False),
    "sd2": dict(_UNET_COMMON, model_channels=32, num_head_channels=8, context_dim=48, use_linear_in_transformer=True),
}

#: Full-size ldm ``UNetModel`` kwargs (v1-inference.yaml / v2-inference.yaml, without checkpointing).
FULL_UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": dict(_UNET_COMMON, image_size=64, model_channels=320, num_heads=8, context_dim=768,
                use_linear_in_transformer=False),
    "sd2": dict(_UNET_COMMON, image_size=96, model_channels=320, num_head_channels=64, context_dim=1024,
                use_linear_in_transformer=True),
}

TINY_VOCAB = 1000
CONTEXT_LENGTH = 77


# ---------------------------------------------------------------------------------------------
# randomisation


def randomize_(module: nn.Module, seed: int, threads: int = 1) -> nn.Module:
    """Overwrite every parameter of ``module`` in place with seeded random values; returns it.

    * weights of LayerNorm / GroupNorm: ``1 + 0.1 * N(0, 1)``
    * tensors with >= 2 dims (Linear / Conv / Embedding / MHA in_proj / loose matrices):
      ``N(0, 1/fan_in)`` with ``fan_in = prod(shape[1:])`` -- keeps activations O(1) at any width
    * everything else (biases, other vectors, scalars such as open_clip's logit_scale): ``0.1 * N(0, 1)``

    Parameters are numbered in ``modules()`` order (shared parameters once); parameter ``i`` is
    drawn from its own CPU ``torch.Generator`` seeded with ``seed * 1_000_003 + i``, so the result
    depends only on ``seed`` and the structure, not on ``threads`` (used to fill large models faster).
    """
    jobs: list[tuple[int, torch.Tensor, float, float]] = []
    seen: set[int] = set()
    for mod in module.modules():
        is_norm = isinstance(mod, (nn.LayerNorm, nn.GroupNorm))
        for pname, p in mod._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if is_norm and pname == "weight":
                mean, std = 1.0, 0.1
            elif p.dim() >= 2:
                mean, std = 0.0, 1.0 / math.sqrt(max(1, math.prod(p.shape[1:])))
            else:
                mean, std = 0.0, 0.1
            jobs.append((len(jobs), p, mean, std))

    def fill(job: tuple[int, torch.Tensor, float, float]) -> None:
        i, p, mean, std = job
        gen = torch.Generator(device="cpu").manual_seed(int(seed) * 1_000_003 + i)
        with torch.no_grad():
            if p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous():
                p.normal_(mean, std, generator=gen)
            else:  # draw on CPU in fp32, then copy (values independent of device / dtype / layout)
                p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(mean, std, generator=gen))

    if threads > 1 and len(jobs) > 1:
        from concurrent.futures import ThreadPoolExecutor

        order = sorted(jobs, key=lambda j: -j[1].numel())  # big first: balances the threads
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(fill, order))
    else:
        for job in jobs:
            fill(job)
    return module


# ---------------------------------------------------------------------------------------------
# real modules (tiny)


def _unet_class() -> type:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel


def tiny_unet(family: str, seed: int = 0) -> nn.Module:
    """Tiny ldm ``UNetModel`` for ``"sd1"`` or ``"sd2"`` (see :data:`UNET_CONFIGS`), randomised."""
    if family not in UNET_CONFIGS:
        raise ValueError(f"tiny_unet: family must be one of {sorted(UNET_CONFIGS)}, got {family!r}")
    unet = _unet_class()(**copy.deepcopy(UNET_CONFIGS[family]))
    return randomize_(unet.float().eval(), seed)


def _clip_text_config(hidden: int, layers: int, heads: int, intermediate: int, vocab: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        projection_dim=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=CONTEXT_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attn_implementation="eager",
    )


def tiny_clip_text(seed: int = 0, hidden: int = 32, layers: int = 12, heads: int = 4,
                   vocab: int = TINY_VOCAB) -> nn.Module:
    """Tiny transformers ``CLIPTextModel`` shaped like CLIP-L (12 layers, quick_gelu, 77 positions).

    ``hidden`` defaults to the sd1 tiny UNet's ``context_dim`` (32).
    """
    from transformers import CLIPTextModel

    cfg = _clip_text_config(hidden, layers, heads, 4 * hidden, vocab)
    model = CLIPTextModel(cfg)
    return randomize_(model.float().eval(), seed)


def _open_clip_text(width: int, layers: int, heads: int, vocab: int) -> nn.Module:
    """open_clip ``CLIP`` with a tiny vision tower that is then deleted (not randomised)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    text_cfg = CLIPTextCfg(context_length=CONTEXT_LENGTH, vocab_size=vocab, width=width, heads=heads,
                           layers=layers)
    vision_cfg = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
    # ViT-H-14 (SD2) / ViT-bigG-14 (SDXL) use nn.GELU, i.e. quick_gelu=False; embed_dim == width.
    model = CLIP(embed_dim=width, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=False)
    del model.visual  # as ldm's FrozenOpenCLIPEmbedder does
    return model


def tiny_open_clip_text(seed: int = 0, width: int = 48, layers: int = 24, heads: int = 4,
                        vocab: int = TINY_VOCAB) -> nn.Module:
    """Tiny open_clip ``CLIP`` (text tower only, ``.visual`` deleted) shaped like ViT-H-14's text tower.

    24 ``resblocks`` whose ``.attn`` is a torch ``nn.MultiheadAttention`` (batch_first);
    ``width`` defaults to the sd2 tiny UNet's ``context_dim`` (48).
    """
    model = _open_clip_text(width, layers, heads, vocab)
    return randomize_(model.float().eval(), seed)


def encode_text(model: nn.Module, tokens: torch.Tensor, layer: str = "penultimate") -> torch.Tensor:
    """Run an open_clip text model like ldm's ``FrozenOpenCLIPEmbedder.encode_with_transformer``.

    ``tokens``: int64 ``[B, 77]``.  ``layer``: ``"last"`` or ``"penultimate"`` (SD2's choice: skip the
    last resblock).  Returns ``[B, 77, width]`` after ``ln_final``.
    """
    layer_idx = {"last": 0, "penultimate": 1}[layer]
    x = model.token_embedding(tokens)
    x = x + model.positional_embedding
    blocks = model.transformer.resblocks
    x = run_resblocks(model, x, blocks[:len(blocks) - layer_idx])
    return model.ln_final(x)


def run_resblocks(model: nn.Module, x: torch.Tensor, blocks) -> torch.Tensor:
    """open_clip resblocks on ``[B, L, D]`` input; open_clip before 2.24 (the WebUI's 2.20) runs them on L, N, D."""
    batch_first = getattr(model.transformer, "batch_first", False)
    if not batch_first:
        x = x.permute(1, 0, 2)
    for block in blocks:
        x = block(x, attn_mask=model.attn_mask)
    return x if batch_first else x.permute(1, 0, 2)


def random_tokens(batch: int = 1, length: int = CONTEXT_LENGTH, vocab: int = TINY_VOCAB,
                  seed: int = 0) -> torch.Tensor:
    """Seeded random token ids ``[batch, length]`` (int64) in ``[0, vocab)``."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, vocab, (batch, length), generator=gen)


# ---------------------------------------------------------------------------------------------
# containers with the WebUI's naming


class _Node(nn.Module):
    """Plain container (children added by name); ``node[i]`` is ``getattr(node, str(i))``."""

    def __getitem__(self, idx: int | str) -> nn.Module:
        return self._modules[str(idx)]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())


class StableDiffusionModel(nn.Module):
    """Stand-in for the WebUI's ``shared.sd_model`` (only the module tree and family flags)."""

    def __init__(self, family: str) -> None:
        super().__init__()
        self.family = family
        self.is_sd1 = family == "sd1"
        self.is_sd2 = family == "sd2"
        self.is_sdxl = family == "sdxl"

    def extra_repr(self) -> str:
        return f"family={self.family!r}"


class DiffusionWrapper(nn.Module):
    """ldm's ``DiffusionWrapper``: holds ``.diffusion_model``."""

    def __init__(self, diffusion_model: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model


class FrozenCLIPEmbedder(nn.Module):
    """Stand-in for ldm's ``FrozenCLIPEmbedder``: holds ``.transformer`` (a ``CLIPTextModel``)."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer


class FrozenOpenCLIPEmbedder(nn.Module):
    """Stand-in for ldm's ``FrozenOpenCLIPEmbedder``: holds ``.model`` (open_clip CLIP, no visual)."""

    def __init__(self, model: nn.Module, layer: str = "penultimate") -> None:
        super().__init__()
        self.model = model
        self.layer = layer
        self.layer_idx = {"last": 0, "penultimate": 1}[layer]


class EmbedderWithCustomWords(nn.Module):
    """Stand-in for the WebUI's ``FrozenCLIPEmbedderWithCustomWords`` & co: holds ``.wrapped``."""

    def __init__(self, wrapped: nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped


def _assemble(family: str, unet: nn.Module, text: nn.Module, wrapped: bool) -> StableDiffusionModel:
    root = StableDiffusionModel(family)
    root.model = DiffusionWrapper(unet)
    embedder: nn.Module = FrozenCLIPEmbedder(text) if family == "sd1" else FrozenOpenCLIPEmbedder(text)
    root.cond_stage_model = EmbedderWithCustomWords(embedder) if wrapped else embedder
    return root


def sd_model(family: str, wrapped: bool = True, seed: int = 0) -> nn.Module:
    """Tiny randomised model with the WebUI's naming; attribute ``family`` is set.

    * ``"sd1"``: ``.model.diffusion_model`` (tiny ldm UNet) + ``.cond_stage_model[.wrapped].transformer``
      (tiny ``CLIPTextModel``, hidden 32 = UNet context_dim)
    * ``"sd2"``: ``.model.diffusion_model`` + ``.cond_stage_model[.wrapped].model`` (tiny open_clip CLIP
      without visual, width 48 = UNet context_dim)
    * ``"sdxl"``: :func:`sdxl_skeleton` (structural skeleton, shrink 32)
    """
    if family == "sdxl":
        return sdxl_skeleton(wrapped=wrapped, seed=seed)
    if family == "sd1":
        text = tiny_clip_text(seed=seed + 1, hidden=UNET_CONFIGS["sd1"]["context_dim"])
    elif family == "sd2":
        text = tiny_open_clip_text(seed=seed + 1, width=UNET_CONFIGS["sd2"]["context_dim"])
    else:
        raise ValueError(f"sd_model: family must be one of {FAMILIES}, got {family!r}")
    return _assemble(family, tiny_unet(family, seed=seed), text, wrapped).eval()


#: Tiny SDXL: ldm's ``UNetModel`` with SDXL's block layout (three levels, attention on the last two, one
#: transformer block each: ldm cannot run deeper ones, linear proj_in/out) and ``label_emb`` rebuilt as sgm's
#: nested Sequential; the text encoders are CLIP-L-shaped (hidden 32) and bigG-shaped open_clip (width 48).
SDXL_TE1_HIDDEN, SDXL_TE2_WIDTH = 32, 48
SDXL_ADM = SDXL_TE2_WIDTH + 6 * 256
SDXL_UNET_CONFIG: dict[str, Any] = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=2, attention_resolutions=[4, 2],
    channel_mult=[1, 2, 4], use_spatial_transformer=True, transformer_depth=1, num_head_channels=8,
    context_dim=SDXL_TE1_HIDDEN + SDXL_TE2_WIDTH, use_linear_in_transformer=True, use_checkpoint=False,
    legacy=False, num_classes="continuous")


class GeneralConditioner(nn.Module):
    """Stand-in for sgm's ``GeneralConditioner``: holds ``.embedders`` (a ModuleList)."""

    def __init__(self, embedders: list[nn.Module]) -> None:
        super().__init__()
        self.embedders = nn.ModuleList(embedders)


def tiny_sdxl(seed: int = 0, wrapped: bool = True) -> nn.Module:
    """Runnable tiny SDXL with the WebUI's naming: ``model.diffusion_model`` (call with ``y`` [B, SDXL_ADM]),
    ``conditioner.embedders.0[.wrapped].transformer`` (CLIPTextModel) and ``conditioner.embedders.1[.wrapped].model``
    (open_clip, nn.MultiheadAttention, ``text_projection`` for the pooled output)."""
    unet = _unet_class()(**copy.deepcopy(SDXL_UNET_CONFIG))
    ted = 4 * SDXL_UNET_CONFIG["model_channels"]
    unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(SDXL_ADM, ted), nn.SiLU(), nn.Linear(ted, ted)))
    randomize_(unet.float().eval(), seed)
    te1 = FrozenCLIPEmbedder(tiny_clip_text(seed=seed + 1, hidden=SDXL_TE1_HIDDEN))
    te2 = FrozenOpenCLIPEmbedder(tiny_open_clip_text(seed=seed + 2, width=SDXL_TE2_WIDTH, layers=32))
    root = StableDiffusionModel("sdxl")
    root.model = DiffusionWrapper(unet)
    embedders = [EmbedderWithCustomWords(te1), EmbedderWithCustomWords(te2)] if wrapped else [te1, te2]
    root.conditioner = GeneralConditioner(embedders)
    return root.eval()


def sdxl_encode(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning as sgm computes it: CLIP-L hidden_states[11] beside bigG's penultimate block
    output (no final norm), and bigG's pooled output (ln_final at the end token, times text_projection)."""
    e0, e1 = (getattr(e, "wrapped", e) for e in model.conditioner.embedders)
    c1 = e0.transformer(tokens, output_hidden_states=True).hidden_states[11]
    oc = e1.model
    x = oc.token_embedding(tokens) + oc.positional_embedding
    blocks = oc.transformer.resblocks
    penultimate = run_resblocks(oc, x, blocks[:-1])
    last = oc.ln_final(run_resblocks(oc, penultimate, blocks[-1:]))
    pooled = last[torch.arange(last.shape[0]), tokens.argmax(dim=-1)] @ oc.text_projection
    return torch.cat([c1, penultimate], dim=-1), pooled


def full_model(family: str = "sd1", seed: int = 0, wrapped: bool = True,
               device: str | torch.device = "cpu") -> nn.Module:
    """FULL-SIZE SD1.x (ldm UNet 320ch + CLIP-L) or SD2.x (UNet + OpenCLIP ViT-H text) with random weights.

    Built on the meta device (skipping torch's slow default init), then materialised on ``device``
    and randomised with :func:`randomize_`.  ``device="meta"`` returns the unmaterialised model
    (shapes / names only; cheap).  fp32.
    """
    if family not in FULL_UNET_CONFIGS:
        raise ValueError(f"full_model: family must be one of {sorted(FULL_UNET_CONFIGS)}, got {family!r}")
    with torch.device("meta"):
        unet = _unet_class()(**copy.deepcopy(FULL_UNET_CONFIGS[family]))
        if family == "sd1":
            from transformers import CLIPTextModel

            text = CLIPTextModel(_clip_text_config(768, 12, 12, 3072, 49408))
        else:
            text = _open_clip_text(1024, 24, 16, 49408)
    model = _assemble(family, unet, text, wrapped)
    if torch.device(device).type == "meta":
        return model.eval()
    model = model.to_empty(device=device)
    _reset_buffers(model)
    return randomize_(model.float().eval(), seed, threads=max(1, torch.get_num_threads()))


def full_sd15(seed: int = 0) -> nn.Module:
    """FULL-SIZE SD1.5 (ldm UNet + CLIP-L ``CLIPTextModel``), wrapped naming, random fp32 weights.

    About 1.07 G parameters (~4.3 GB); for benchmarks.
    """
    return full_model("sd1", seed=seed, wrapped=True)


def _reset_buffers(model: nn.Module) -> None:
    """Recompute the (deterministic) buffers that ``to_empty`` left uninitialised."""
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "position_ids") and isinstance(mod.position_ids, torch.Tensor):  # HF CLIP embeddings
                n = mod.position_ids.shape[-1]
                mod.position_ids.copy_(torch.arange(n, device=mod.position_ids.device).expand_as(mod.position_ids))
            if isinstance(getattr(mod, "attn_mask", None), torch.Tensor) and hasattr(mod, "token_embedding"):
                n = mod.attn_mask.shape[-1]  # open_clip causal mask: -inf above the diagonal, 0 elsewhere
                mask = torch.full((n, n), float("-inf")).triu_(1)
                mod.attn_mask.copy_(mask.to(mod.attn_mask.device))
        leftovers = [n for n, b in model.named_buffers()
                     if not (n.endswith("position_ids") or n.endswith("attn_mask"))]
        if leftovers:
            raise RuntimeError(f"full_model: don't know how to re-initialise buffers {leftovers[:5]}")


# ---------------------------------------------------------------------------------------------
# inventory-driven skeletons (SDXL; also usable for sd1 / sd2)


@functools.lru_cache(maxsize=1)
def _load_inventory() -> dict[str, list[dict]]:
    with open(INVENTORY_PATH, encoding="utf-8") as f:
        return json.load(f)


def inventory(family: str) -> list[dict]:
    """Rows ``{name, type, weight?, bias?, in_proj_weight?, num_heads?, shape?}`` of the full-size
    ``family`` model (checkpoint naming, no ``.wrapped``), from ``shared/fixtures/module_inventory.json``.

    Returns a fresh deep copy (callers may mutate it).
    """
    inv = _load_inventory()
    if family not in inv:
        raise ValueError(f"inventory: family must be one of {sorted(inv)}, got {family!r}")
    return copy.deepcopy(inv[family])


_WRAP_RE = re.compile(r"^(cond_stage_model|conditioner\.embedders\.\d+)\.")


def wrap_name(name: str) -> str:
    """Checkpoint name -> running-WebUI name (insert ``.wrapped`` after the text-encoder root)."""
    return _WRAP_RE.sub(lambda m: m.group(1) + ".wrapped.", name, count=1)


def unwrap_name(name: str) -> str:
    """Running-WebUI name -> checkpoint name (drop the ``.wrapped`` level)."""
    return re.sub(r"^(cond_stage_model|conditioner\.embedders\.\d+)\.wrapped\.", r"\1.", name, count=1)


def shrink_dim(d: int, shrink: int) -> int:
    """``d // shrink`` when ``d`` is a multiple of ``shrink``; otherwise ``d`` unchanged.

    Every full-size width of SD1/SD2/SDXL is a multiple of 32 (320, 768, 1280, 2048, 2816, 49408...),
    so with the default 32: 1280->40, 2048->64, 2816->88, 640->20, 320->10, 768->24, 1920->60.  What
    is kept: the 4 latent channels, the 77 positions, conv kernel sizes (never passed here).  Being a
    pure function of the full dim, the mapping stays consistent across the whole model
    (and sums such as 1280+640=1920 stay sums).
    """
    if shrink < 1:
        raise ValueError("shrink must be >= 1")
    return d // shrink if d % shrink == 0 else d


def _group_count(channels: int, full_groups: int = 32) -> int:
    """Largest divisor of ``channels`` that is <= ``full_groups`` (the real models use 32)."""
    return max(g for g in range(1, min(full_groups, channels) + 1) if channels % g == 0)


def _heads(embed_dim: int, full_heads: int) -> int:
    """``full_heads`` if it divides ``embed_dim``, else the largest divisor of ``embed_dim`` below it."""
    return max(h for h in range(1, min(full_heads, embed_dim) + 1) if embed_dim % h == 0)


def _leaf_from_row(row: dict, shrink: int) -> nn.Module | nn.Parameter:
    """A real torch module (or a loose Parameter) for one inventory row, dims shrunk."""
    from ldm.modules.diffusionmodules.util import GroupNorm32

    s = functools.partial(shrink_dim, shrink=shrink)
    t, w, name = row["type"], row.get("weight"), row["name"]
    has_bias = row.get("bias") is not None
    if t in ("Linear", "NonDynamicallyQuantizableLinear"):
        return nn.Linear(s(w[1]), s(w[0]), bias=has_bias)
    if t == "Conv2d":
        k = tuple(w[2:])
        stride = 2 if name.endswith(".op") else 1  # ldm Downsample conv
        return nn.Conv2d(s(w[1]), s(w[0]), kernel_size=k, stride=stride, padding=k[0] // 2, bias=has_bias)
    if t == "LayerNorm":
        if w is None:
            raise ValueError(f"{name}: LayerNorm without weight not supported")
        return nn.LayerNorm(s(w[0]), elementwise_affine=True, bias=has_bias)
    if t in ("GroupNorm", "GroupNorm32"):
        c = s(w[0])
        cls = GroupNorm32 if t == "GroupNorm32" else nn.GroupNorm
        return cls(_group_count(c), c, eps=1e-5 if t == "GroupNorm32" else 1e-6, affine=True)
    if t == "Embedding":
        return nn.Embedding(s(w[0]), s(w[1]))
    if t == "MultiheadAttention":
        e = s(row["in_proj_weight"][1])
        assert row["in_proj_weight"][0] == 3 * row["in_proj_weight"][1], name
        return nn.MultiheadAttention(e, _heads(e, int(row["num_heads"])), bias="in_proj_bias" in row,
                                     batch_first=True)
    if t == "Parameter":
        return nn.Parameter(torch.zeros([s(d) for d in row["shape"]]))
    raise ValueError(f"{name}: unsupported inventory type {t!r}")


def _expected_shapes(row: dict, shrink: int) -> dict[str, list[int]]:
    """``{param_name: shrunk shape}`` of one inventory row (for checks)."""
    s = functools.partial(shrink_dim, shrink=shrink)
    if row["type"] == "Parameter":
        return {"": [s(d) for d in row["shape"]]}
    out = {}
    for key in ("weight", "bias", "in_proj_weight", "in_proj_bias"):
        shape = row.get(key)
        if shape is None:
            continue
        if row["type"] == "Conv2d" and key == "weight":
            out[key] = [s(shape[0]), s(shape[1]), *shape[2:]]
        else:
            out[key] = [s(d) for d in shape]
    return out


def skeleton_from_inventory(family: str, shrink: int = 32, wrapped: bool = True, seed: int = 0) -> nn.Module:
    """Structural skeleton of ``family`` built from :func:`inventory`: real torch leaves (Linear, Conv2d,
    LayerNorm, GroupNorm / ldm GroupNorm32, MultiheadAttention, Embedding, loose Parameters) at exactly
    the inventory's names (``.wrapped`` inserted when ``wrapped``), every dim shrunk by :func:`shrink_dim`.

    Containers are ``nn.ModuleList`` when their children are exactly ``0..n-1`` (e.g.
    ``conditioner.embedders``, ``input_blocks``), else a plain module with ``[i]`` access.  Leaves
    created implicitly (``attn.out_proj`` of a MultiheadAttention) are checked against their row.
    Not meant to be run forward: only module names / shapes are real.  Randomised with ``seed``.
    """
    rows = inventory(family)
    # nested dict tree: key -> {"row": row | None, "children": {...}}
    tree: dict[str, Any] = {"row": None, "children": {}}
    for row in rows:
        name = wrap_name(row["name"]) if wrapped else row["name"]
        node = tree
        for part in name.split("."):
            node = node["children"].setdefault(part, {"row": None, "children": {}})
        if node["row"] is not None:
            raise ValueError(f"duplicate inventory name {name}")
        node["row"] = row

    def build(node: dict, path: str) -> nn.Module | nn.Parameter:
        row, children = node["row"], node["children"]
        if row is not None:
            leaf = _leaf_from_row(row, shrink)
            for key, child in children.items():  # implicit sub-modules (MHA.out_proj)
                sub = getattr(leaf, key, None)
                if not isinstance(sub, nn.Module) or child["children"]:
                    raise ValueError(f"{path}.{key}: child of a {row['type']} leaf not created by it")
                _check_leaf(sub, child["row"], shrink, f"{path}.{key}")
            return leaf
        keys = list(children)
        built = {k: build(v, f"{path}.{k}" if path else k) for k, v in children.items()}
        is_list = bool(keys) and keys == [str(i) for i in range(len(keys))] and all(
            isinstance(m, nn.Module) for m in built.values())
        container: nn.Module = nn.ModuleList() if is_list else _Node()
        for k, m in built.items():
            if isinstance(m, nn.Parameter):
                container.register_parameter(k, m)
            elif is_list:
                container.append(m)
            else:
                container.add_module(k, m)
        return container

    root = StableDiffusionModel(family)
    for key, child in tree["children"].items():
        m = build(child, key)
        if isinstance(m, nn.Parameter):
            root.register_parameter(key, m)
        else:
            root.add_module(key, m)
    root.skeleton_shrink = shrink
    return randomize_(root.float().eval(), seed)


def _check_leaf(mod: nn.Module, row: dict | None, shrink: int, name: str) -> None:
    if row is None:
        return
    for key, shape in _expected_shapes(row, shrink).items():
        p = getattr(mod, key, None)
        if p is None or list(p.shape) != shape:
            got = None if p is None else list(p.shape)
            raise ValueError(f"{name}.{key}: implicit leaf has shape {got}, inventory wants {shape}")


def sdxl_skeleton(wrapped: bool = True, seed: int = 0, shrink: int = 32) -> nn.Module:
    """SDXL structural skeleton (``model.diffusion_model``, ``conditioner.embedders[0]`` = CLIP-L text,
    ``conditioner.embedders[1]`` = OpenCLIP bigG text with nn.MultiheadAttention), dims / ``shrink``.

    With ``wrapped=True`` each ``conditioner.embedders[i]`` holds ``.wrapped`` whose children are the
    inventory's ``transformer`` / ``model`` subtrees.  See :func:`skeleton_from_inventory`.
    """
    return skeleton_from_inventory("sdxl", shrink=shrink, wrapped=wrapped, seed=seed)


# ---------------------------------------------------------------------------------------------
# helpers for tests

_TYPE_ALIASES = {"NonDynamicallyQuantizableLinear": "Linear", "GroupNorm32": "GroupNorm"}


def normalized_type(type_name: str) -> str:
    """Inventory / class type name with aliases folded (NonDynamicallyQuantizableLinear -> Linear,
    GroupNorm32 -> GroupNorm)."""
    return _TYPE_ALIASES.get(type_name, type_name)


def module_types(model: nn.Module, types: tuple[str, ...] | None = None) -> dict[str, str]:
    """``{module name: normalized type name}`` of ``model``'s modules whose normalized type is in
    ``types`` (default: the inventory's module types)."""
    types = types or ("Linear", "Conv2d", "LayerNorm", "GroupNorm", "MultiheadAttention", "Embedding")
    out = {}
    for name, mod in model.named_modules():
        t = normalized_type(type(mod).__name__)
        if t in types:
            out[name] = t
    return out
