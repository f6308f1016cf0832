"""Checks of the test model builders in tests/models.py against the WebUI naming contract
(shared/fixtures/module_inventory.json)."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

import models as M

INVENTORY_MODULE_TYPES = ("Linear", "Conv2d", "LayerNorm", "GroupNorm", "MultiheadAttention", "Embedding")


def _inv_types(family: str, wrapped: bool = False) -> dict[str, str]:
    """{name: normalized type} of the inventory's modules (loose Parameters excluded)."""
    return {(M.wrap_name(r["name"]) if wrapped else r["name"]): M.normalized_type(r["type"])
            for r in M.inventory(family) if r["type"] != "Parameter"}


def _inv_param_names(family: str) -> set[str]:
    out = set()
    for r in M.inventory(family):
        if r["type"] == "Parameter":
            out.add(r["name"])
            continue
        for key in ("weight", "bias", "in_proj_weight", "in_proj_bias"):
            if r.get(key) is not None:
                out.add(f"{r['name']}.{key}")
    return out


@pytest.fixture(scope="module")
def tiny() -> dict[tuple[str, bool], nn.Module]:
    """Tiny models, built once: {(family, wrapped): model}."""
    return {(f, w): M.sd_model(f, wrapped=w, seed=0) for f in ("sd1", "sd2") for w in (False, True)}


def test_inventory_loads() -> None:
    assert M.INVENTORY_PATH.is_file()
    for f in M.FAMILIES:
        rows = M.inventory(f)
        assert rows and all("name" in r and "type" in r for r in rows)
    assert any(r["name"] == "cond_stage_model.model.transformer.resblocks.0.attn" for r in M.inventory("sd2"))


# ------------------------------------------------------------------------------------------ (a)

@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_tiny_linear_conv_mha_names_equal_inventory(tiny, family: str) -> None:
    # Tiny widths change no names: block counts are the real ones (12 CLIP-L layers, 24 OpenCLIP-H
    # resblocks, channel_mult [1,2,4,4] x 2 res blocks, attention at [4,2,1]), so the sets are equal.
    types = ("Linear", "Conv2d", "MultiheadAttention")
    got = M.module_types(tiny[(family, False)], types)
    want = {n: t for n, t in _inv_types(family).items() if t in types}
    assert set(got) == set(want)
    assert got == want


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_tiny_all_module_and_param_names_equal_inventory(tiny, family: str) -> None:
    model = tiny[(family, False)]
    assert M.module_types(model, INVENTORY_MODULE_TYPES) == _inv_types(family)
    # raw class names too (GroupNorm32 for ResBlock norms, GroupNorm for SpatialTransformer.norm,
    # NonDynamicallyQuantizableLinear for MultiheadAttention.out_proj)
    want_raw = {r["name"]: r["type"] for r in M.inventory(family) if r["type"] != "Parameter"}
    got_raw = {n: type(m).__name__ for n, m in model.named_modules() if n in want_raw}
    assert got_raw == want_raw
    assert {n for n, _ in model.named_parameters()} == _inv_param_names(family)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_tiny_wrapped_naming(tiny, family: str) -> None:
    model = tiny[(family, True)]
    assert model.family == family
    assert getattr(model, f"is_{family}") and not model.is_sdxl
    assert M.module_types(model, INVENTORY_MODULE_TYPES) == _inv_types(family, wrapped=True)
    assert all(".wrapped." in n for n, _ in model.named_parameters() if n.startswith("cond_stage_model."))
    assert not hasattr(tiny[(family, False)].cond_stage_model, "wrapped")
    assert M.unwrap_name(M.wrap_name("cond_stage_model.model.ln_final")) == "cond_stage_model.model.ln_final"
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    assert isinstance(model.model.diffusion_model, UNetModel)
    if family == "sd1":
        from transformers import CLIPTextModel
        assert isinstance(model.cond_stage_model.wrapped.transformer, CLIPTextModel)
    else:
        from open_clip.model import CLIP
        clip = model.cond_stage_model.wrapped.model
        assert isinstance(clip, CLIP) and not hasattr(clip, "visual")
        assert len(clip.transformer.resblocks) == 24
        assert all(type(b.attn) is nn.MultiheadAttention for b in clip.transformer.resblocks)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_names_and_shapes_equal_inventory(family: str) -> None:
    # Built on the meta device: checks the full-size configs (also used by full_sd15) exactly.
    model = M.full_model(family, wrapped=False, device="meta")
    assert M.module_types(model, INVENTORY_MODULE_TYPES) == _inv_types(family)
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    assert set(shapes) == _inv_param_names(family)
    for r in M.inventory(family):
        if r["type"] == "Parameter":
            assert shapes[r["name"]] == r["shape"], r["name"]
            continue
        for key in ("weight", "bias", "in_proj_weight", "in_proj_bias"):
            if r.get(key) is not None:
                assert shapes[f"{r['name']}.{key}"] == r[key], (r["name"], key)
        if r["type"] == "MultiheadAttention":
            assert model.get_submodule(r["name"]).num_heads == r["num_heads"]


# ------------------------------------------------------------------------------------------ (b)

@pytest.mark.parametrize("family", ["sdxl", "sd1", "sd2"])
@pytest.mark.parametrize("wrapped", [True, False])
def test_skeleton_has_every_inventory_name(family: str, wrapped: bool) -> None:
    shrink = 32
    model = M.skeleton_from_inventory(family, shrink=shrink, wrapped=wrapped, seed=0)
    assert model.family == family
    assert M.module_types(model, INVENTORY_MODULE_TYPES) == _inv_types(family, wrapped=wrapped)
    params = dict(model.named_parameters())
    names = {n for n, _ in model.named_modules()}
    for r in M.inventory(family):
        name = M.wrap_name(r["name"]) if wrapped else r["name"]
        if r["type"] == "Parameter":
            assert list(params[name].shape) == M._expected_shapes(r, shrink)[""], name
            continue
        assert name in names, name
        mod = model.get_submodule(name)
        assert type(mod).__name__ == r["type"], name
        for key, shape in M._expected_shapes(r, shrink).items():
            assert list(getattr(mod, key).shape) == shape, (name, key)
        if isinstance(mod, nn.MultiheadAttention):
            assert mod.embed_dim % mod.num_heads == 0
        if isinstance(mod, nn.GroupNorm):
            assert mod.num_channels % mod.num_groups == 0
    assert len(params) == len(_inv_param_names(family))


def test_sdxl_skeleton_structure() -> None:
    model = M.sd_model("sdxl", wrapped=True, seed=0)
    assert model.family == "sdxl" and model.is_sdxl
    emb = model.conditioner.embedders
    assert isinstance(emb, nn.ModuleList) and len(emb) == 2
    assert hasattr(emb[0].wrapped, "transformer") and hasattr(emb[1].wrapped, "model")
    assert list(emb[0].wrapped.children()) == [emb[0].wrapped.transformer]
    assert list(emb[1].wrapped.children()) == [emb[1].wrapped.model]
    unet = model.model.diffusion_model
    # shrink 32: 2816 -> 88, 1280 -> 40, 2048 -> 64, 640 -> 20, 320 -> 10, 768 -> 24, 4 and 77 kept
    lab = unet.label_emb[0][0]
    assert (lab.in_features, lab.out_features) == (88, 40)
    assert tuple(unet.input_blocks[0][0].weight.shape) == (10, 4, 3, 3)
    assert tuple(unet.out[2].weight.shape) == (4, 10, 3, 3)
    attn2 = unet.input_blocks[4][1].transformer_blocks[0].attn2
    assert (attn2.to_k.in_features, attn2.to_k.out_features) == (64, 20)
    assert attn2.to_k.bias is None and attn2.to_out[0].bias is not None
    assert isinstance(unet.input_blocks[4][1].proj_in, nn.Linear)
    clip_l = emb[0].wrapped.transformer.text_model
    assert tuple(clip_l.embeddings.position_embedding.weight.shape) == (77, 24)
    assert tuple(clip_l.encoder.layers[0].self_attn.q_proj.weight.shape) == (24, 24)
    big_g = emb[1].wrapped.model
    attn = big_g.transformer.resblocks[31].attn
    assert type(attn) is nn.MultiheadAttention and attn.embed_dim == 40 and attn.num_heads == 20
    assert type(attn.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    assert tuple(big_g.positional_embedding.shape) == (77, 40)
    assert big_g.logit_scale.shape == ()
    unwrapped = M.sdxl_skeleton(wrapped=False, seed=0)
    assert hasattr(unwrapped.conditioner.embedders[0], "transformer")
    assert not hasattr(unwrapped.conditioner.embedders[0], "wrapped")


# ------------------------------------------------------------------------------------------ (c)

def _unet_out(family: str, seed: int, context: torch.Tensor) -> torch.Tensor:
    unet = M.tiny_unet(family, seed=seed)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        return unet(x, torch.tensor([10]), context)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_tiny_unet_forward(family: str) -> None:
    ctx_dim = M.UNET_CONFIGS[family]["context_dim"]
    context = torch.randn(1, 4, ctx_dim, generator=torch.Generator().manual_seed(7))
    a = _unet_out(family, 0, context)
    b = _unet_out(family, 1, context)
    a2 = _unet_out(family, 0, context)
    assert a.shape == (1, 4, 8, 8) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert a.abs().mean() > 1e-3
    assert not torch.allclose(a, b)
    assert torch.equal(a, a2)  # deterministic for a seed


def test_clip_text_forward_into_sd1_unet(tiny) -> None:
    model = tiny[("sd1", True)]
    tokens = M.random_tokens(vocab=M.TINY_VOCAB, seed=3)
    with torch.no_grad():
        hidden = model.cond_stage_model.wrapped.transformer(input_ids=tokens).last_hidden_state
        assert hidden.shape == (1, 77, M.UNET_CONFIGS["sd1"]["context_dim"])
        assert torch.isfinite(hidden).all()
        out = model.model.diffusion_model(torch.randn(1, 4, 8, 8), torch.tensor([999]), hidden)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_open_clip_text_forward_into_sd2_unet(tiny) -> None:
    model = tiny[("sd2", True)]
    clip = model.cond_stage_model.wrapped.model
    tokens = M.random_tokens(vocab=M.TINY_VOCAB, seed=4)
    with torch.no_grad():
        pen = M.encode_text(clip, tokens)
        last = M.encode_text(clip, tokens, layer="last")
        assert pen.shape == last.shape == (1, 77, M.UNET_CONFIGS["sd2"]["context_dim"])
        assert torch.isfinite(pen).all() and not torch.allclose(pen, last)
        pooled = clip.encode_text(tokens)  # open_clip's own path through .transformer
        assert pooled.shape == (1, M.UNET_CONFIGS["sd2"]["context_dim"]) and torch.isfinite(pooled).all()
        out = model.model.diffusion_model(torch.randn(1, 4, 8, 8), torch.tensor([1]), pen)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------ (d)

def test_no_parameter_all_zero(tiny) -> None:
    models = [tiny[("sd1", True)], tiny[("sd2", True)], M.sd_model("sdxl", seed=0)]
    for model in models:
        for name, p in model.named_parameters():
            assert p.dtype == torch.float32, name
            assert torch.isfinite(p).all(), name
            assert p.abs().sum() > 0, name
    # ldm's zero_module outputs in particular
    unet = tiny[("sd1", True)].model.diffusion_model
    for p in (unet.out[2].weight, unet.input_blocks[1][1].proj_out.weight, unet.input_blocks[1][0].out_layers[3].weight):
        assert p.abs().min() > 0


def test_randomize_deterministic_and_thread_independent() -> None:
    a = M.tiny_open_clip_text(seed=5)
    b = M.randomize_(M.tiny_open_clip_text(seed=9), 5, threads=2)
    c = M.tiny_open_clip_text(seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["transformer.resblocks.0.attn.in_proj_weight"],
                           sc["transformer.resblocks.0.attn.in_proj_weight"])
    # norms around 1, matrices ~ 1/sqrt(fan_in)
    ln = a.transformer.resblocks[0].ln_1.weight
    assert 0.5 < ln.mean() < 1.5
    counts = collections.Counter(type(m).__name__ for m in a.modules())
    assert counts["MultiheadAttention"] == 24
