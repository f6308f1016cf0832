"""SD3 in the engine, on tiny models of the WebUI's own SD3 classes (tests/sd3_models.py): diffusers/PEFT files
(``transformer.…``, checked against diffusers' SD3Transformer2DModel with peft's LoRA on the same weights) and
kohya's names (``lora_unet_joint_blocks_…``, ``lora_te1_``-``lora_te3_``) reach the MMDiT with its fused q/k/v,
CLIP-L, CLIP-G and T5, in merge and bypass, and restore bit for bit; the family is known from files and models."""
from __future__ import annotations

import pytest
import torch

import lib_lora
import lorafiles
import models
import sd3_models as S
from helpers import same_state, state
from lib_lora import cards
from lib_lora.keymap import family_mismatch, split_key, target_for
from lib_lora.model_index import ModelIndex
from lib_lora.network import HalvesSwapped
from lib_lora.safetensors_io import read_listing
from lib_lora.structure import structure_of


@pytest.fixture(scope="module")
def sd3():
    return S.tiny_sd3(seed=0)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=rel * max(1.0, b.abs().max().item()), rtol=0)


# ---- diffusers / PEFT --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusers_file(sd3, tmp_path_factory):
    """A LoRA on every Linear/Conv of diffusers' SD3 transformer (alpha 8, rank 4: the scale comes from the header),
    and the peft-patched transformer's output as the reference."""
    transformer = S.diffusers_transformer(sd3)
    inp = S.mmdit_inputs()
    assert S.run_diffusers(transformer, inp).sub(S.run_mmdit(sd3, inp)).abs().max() < 1e-4, \
        "the oracle: diffusers' transformer with the converted weights computes what the WebUI's MMDiT does"
    path = tmp_path_factory.mktemp("sd3") / "diffusers_sd3.safetensors"
    S.save_diffusers_sd3_lora(path, transformer, rank=4, alpha=8, seed=3)
    return path, S.run_diffusers(transformer, inp)


def test_diffusers_file_reaches_every_mmdit_layer(sd3, diffusers_file):
    path, _ = diffusers_file
    net = lib_lora.load(str(path))
    assert net.base_model == "sd3" and net.format == "peft" and not net.unmatched
    assert {a.alpha for a in net.modules.values()} == {8.0}
    index = ModelIndex(sd3)
    resolved = {t: index.resolve(t) for t in net.modules}
    assert all(resolved.values()), [t for t, hit in resolved.items() if hit is None]
    qkv = {(hit[0], hit[2]) for hit in resolved.values() if hit[2]}
    assert ("model.diffusion_model.joint_blocks.0.context_block.attn.qkv", "k") in qkv
    assert len(qkv) == 2 * 2 * 3  # both streams of both blocks (the last block's context stream stops after q/k/v)
    assert structure_of(*read_listing(str(path))).base_model == "sd3"
    swapped = {t.path for t, a in net.modules.items() if isinstance(a, HalvesSwapped)}
    assert swapped == {"final_layer_adaLN_modulation_1", "joint_blocks_0_context_block_adaLN_modulation_1",
                       "joint_blocks_1_context_block_adaLN_modulation_1"}


@pytest.mark.parametrize("mode", ["merge", "bypass"])
def test_diffusers_file_gives_peft_output(sd3, diffusers_file, mode):
    path, reference = diffusers_file
    inp = S.mmdit_inputs()
    ref_state, plain = state(sd3), S.run_mmdit(sd3, inp)
    patcher = lib_lora.Patcher(sd3)
    res = patcher.apply([lib_lora.Use(lib_lora.load(str(path)))], mode=mode)
    assert not res.skipped and not res.errors
    out = S.run_mmdit(sd3, inp)
    assert (reference - plain).abs().max() > 0.5
    close(out, reference)
    patcher.restore()
    assert same_state(sd3, ref_state)
    assert torch.equal(S.run_mmdit(sd3, inp), plain)


def test_scale_shift_halves_of_diffusers_norms(sd3, tmp_path):
    """diffusers' final norm and last context norm keep (scale, shift) where SD3 keeps (shift, scale): a LoRA on
    just those gives peft's output only with the halves swapped back."""
    transformer = S.diffusers_transformer(sd3)
    path = tmp_path / "norms.safetensors"
    S.save_diffusers_sd3_lora(path, transformer, rank=2, alpha=2, seed=4, targets=["norm_out.linear", "norm1_context.linear"])
    inp = S.mmdit_inputs()
    reference, plain = S.run_diffusers(transformer, inp), S.run_mmdit(sd3, inp)
    patcher = lib_lora.Patcher(sd3)
    patcher.apply([lib_lora.Use(lib_lora.load(str(path)))])
    out = S.run_mmdit(sd3, inp)
    patcher.restore()
    assert (reference - plain).abs().max() > 0.1
    close(out, reference)


def test_one_third_of_qkv(sd3):
    """A diffusers to_q LoRA changes only the q rows of the fused qkv weight, a full diff on its k third (kohya's
    ``…_qkv_k_proj``, with a bias diff) only the k rows and k biases; bypass gives the merged output."""
    qkv = sd3.model.diffusion_model.joint_blocks[0].x_block.attn.qkv
    g = torch.Generator().manual_seed(5)
    h = S.HIDDEN
    q = "transformer.transformer_blocks.0.attn.to_q"
    lora = {f"{q}.lora_A.weight": torch.randn(2, h, generator=g), f"{q}.lora_B.weight": torch.randn(h, 2, generator=g)}
    k = "lora_unet_joint_blocks_0_x_block_attn_qkv_k_proj"
    full = {f"{k}.diff": torch.randn(h, h, generator=g) * 0.1, f"{k}.diff_b": torch.randn(h, generator=g)}
    uses = [lib_lora.Use(lib_lora.from_state_dict(lora), unet=0.5), lib_lora.Use(lib_lora.from_state_dict(full), unet=0.5)]
    w0, b0 = qkv.weight.detach().clone(), qkv.bias.detach().clone()
    inp = S.mmdit_inputs()
    patcher = lib_lora.Patcher(sd3)
    patcher.apply(uses)
    merged = S.run_mmdit(sd3, inp)
    close(qkv.weight[:h] - w0[:h], 0.5 * lora[f"{q}.lora_B.weight"] @ lora[f"{q}.lora_A.weight"])
    close(qkv.weight[h:2 * h] - w0[h:2 * h], 0.5 * full[f"{k}.diff"])
    close(qkv.bias[h:2 * h] - b0[h:2 * h], 0.5 * full[f"{k}.diff_b"])
    assert torch.equal(qkv.weight[2 * h:], w0[2 * h:]) and torch.equal(qkv.bias[:h], b0[:h])
    patcher.apply(uses, mode="bypass")
    assert torch.equal(qkv.weight, w0) and torch.equal(qkv.bias, b0)
    close(S.run_mmdit(sd3, inp), merged)
    patcher.restore()


def test_diffusers_text_encoder_names(sd3):
    """diffusers' SD3 pipelines name CLIP-L ``text_encoder.``, CLIP-G ``text_encoder_2.`` and T5 ``text_encoder_3.``,
    each with transformers' module names, which the WebUI's encoders share."""
    layers = {"text_encoder.text_model.encoder.layers.11.self_attn.q_proj": (32, 32),
              "text_encoder_2.text_model.encoder.layers.31.mlp.fc2": (192, 48),
              "text_encoder_3.encoder.block.23.layer.1.DenseReluDense.wi_0": (96, 64),
              "transformer.transformer_blocks.1.attn.add_v_proj": (S.HIDDEN, S.HIDDEN)}
    sd = {}
    for key, (fan_in, fan_out) in layers.items():
        sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = torch.ones(2, fan_in), torch.ones(fan_out, 2)
    net = lib_lora.from_state_dict(sd)
    assert net.base_model == "sd3" and {t.part for t in net.modules} == {"unet", "te", "te2", "te3"}
    res = lib_lora.Patcher(sd3).plan([lib_lora.Use(net)]).result
    assert not res.skipped and sorted(res.matched) == [
        "model.diffusion_model.joint_blocks.1.context_block.attn.qkv",
        "text_encoders.clip_g.transformer.text_model.encoder.layers.31.mlp.fc2",
        "text_encoders.clip_l.transformer.text_model.encoder.layers.11.self_attn.q_proj",
        "text_encoders.t5xxl.transformer.encoder.block.23.layer.1.DenseReluDense.wi_0"]


# ---- kohya --------------------------------------------------------------------------------------------------
def test_kohya_file_on_mmdit_and_all_three_text_encoders(sd3):
    sd = S.kohya_sd3_lora(sd3, rank=3, alpha=1.5, seed=6)
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight" in sd
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight" in sd
    net = lib_lora.from_state_dict(sd)
    assert net.base_model == "sd3" and not net.unmatched and len(net.modules) == len(sd) // 3
    assert {t.part for t in net.modules} == {"unet", "te", "te2", "te3"}
    ref = state(sd3)
    inp = S.mmdit_inputs()
    plain = (S.run_mmdit(sd3, inp), *S.run_text_encoders(sd3))
    patcher = lib_lora.Patcher(sd3)
    res = patcher.apply([lib_lora.Use(net, te=0.7, unet=0.8)])
    assert not res.skipped and len(res.matched) == len(net.modules)
    key = "lora_te2_text_model_encoder_layers_31_self_attn_v_proj"
    v = sd3.text_encoders.clip_g.transformer.text_model.encoder.layers[31].self_attn.v_proj
    close(v.weight - ref["text_encoders.clip_g.transformer.text_model.encoder.layers.31.self_attn.v_proj.weight"],
          0.7 * 0.5 * sd[f"{key}.lora_up.weight"] @ sd[f"{key}.lora_down.weight"])
    merged = (S.run_mmdit(sd3, inp), *S.run_text_encoders(sd3))
    patcher.apply([lib_lora.Use(net, te=0.7, unet=0.8)], mode="bypass")
    assert same_state(sd3, ref), "bypass must not touch parameters"
    bypassed = (S.run_mmdit(sd3, inp), *S.run_text_encoders(sd3))
    patcher.restore()
    assert same_state(sd3, ref)
    for p, m, b in zip(plain, merged, bypassed):
        assert (m - p).abs().max() > 1e-3
        close(b, m, rel=1e-4)  # T5's 24 unscaled attentions amplify rounding (1e-7 in its weights: 1e-5 out)


def test_kohya_names_of_sd3_targets_resolve_back(sd3):
    """What the tools write for an SD3 target (kohya's names; a q/k/v third as ``…_qkv_q_proj``) resolves to the
    same layer and third when read back."""
    index = ModelIndex(sd3)
    targets = [lib_lora.Target("unet", "joint_blocks_1_x_block_mlp_fc2"),
               lib_lora.Target("te3", "encoder_block_23_layer_1_DenseReluDense_wo"),
               lib_lora.Target("te2", "text_model_encoder_layers_3_mlp_fc1")]
    targets += [lib_lora.Target("unet", "joint_blocks_0_context_block_attn_qkv", sub) for sub in "qkv"]
    names = [index.kohya_name(t) for t in targets]
    assert names[1] == "lora_te3_encoder_block_23_layer_1_DenseReluDense_wo"
    assert names[4] == "lora_unet_joint_blocks_0_context_block_attn_qkv_k_proj"
    for target, name in zip(targets, names):
        part, module, _ = split_key(name + ".alpha")
        assert index.resolve(target_for(part, module, "sd3")) == index.resolve(target) is not None, name


# ---- families ---------------------------------------------------------------------------------------------
def _family(keys, metadata=None):
    sd = {}
    for k in keys:
        sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = torch.zeros(2, 8), torch.zeros(8, 2)
    return lib_lora.from_state_dict(sd, metadata).base_model


def test_families_of_files():
    assert _family(["transformer.transformer_blocks.0.attn.to_q"]) == "sd3"
    assert _family(["transformer.transformer_blocks.3.ff_context.net.2", "text_encoder.text_model.encoder.layers.0.mlp.fc1"]) == "sd3"
    assert _family(["lora_unet_joint_blocks_5_context_block_mlp_fc1"]) == "sd3"
    assert _family(["lora_transformer_transformer_blocks_0_attn_add_q_proj"]) == "sd3"  # OneTrainer
    assert _family(["lora_te3_encoder_block_0_layer_0_SelfAttention_q"]) == "sd3"
    te_only = ["lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te2_text_model_encoder_layers_0_mlp_fc1"]
    assert _family(te_only, {"modelspec.architecture": "stable-diffusion-3-medium/lora"}) == "sd3"
    assert _family(te_only, {"ss_base_model_version": "sd3"}) == "sd3"
    assert _family(te_only) == "sdxl"  # CLIP-L/G names alone are SDXL's too
    # SD1/SDXL keys that contain "transformer_blocks" are not SD3's
    assert _family(["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"]) != "sd3"
    assert _family(["lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"]) == "sdxl"


def test_family_of_models(sd3):
    assert ModelIndex(sd3).family == "sd3"
    assert ModelIndex(S.tiny_sd3(seed=1, t5=False)).family == "sd3"
    assert ModelIndex(models.sd_model("sd1")).family == "sd1"


def test_networks_of_other_families_are_refused_on_sd3(sd3):
    sd1 = lib_lora.from_state_dict(lorafiles.random_kohya_lora(models.sd_model("sd1")), name="sd1net")
    res = lib_lora.Patcher(sd3).apply([lib_lora.Use(sd1)])
    assert res.errors == ["sd1net: made for SD1.x, but the loaded model is SD3; not applied"]
    assert family_mismatch("sd3", "sdxl") == "made for SD3, but the loaded model is SDXL; not applied"


# ---- cards -------------------------------------------------------------------------------------------------
def test_cards_know_sd3(sd3, tmp_path):
    kohya = lorafiles.save(tmp_path / "k.safetensors", S.kohya_sd3_lora(sd3, rank=2))
    struct = structure_of(*read_listing(kohya))
    assert struct.base_model == "sd3" and struct.kind == "LoCon" and struct.rank == 2  # LoCon: x_embedder's conv
    assert cards.VERSION_OF["sd3"] == "SD3" and cards.base_model({"sd version": "SD3"}, "sdxl", cards.Civitai()) == "sd3"
    assert [cards.civitai_family(x) for x in ("SD 3", "SD 3.5 Large", "SD 3.5 Medium")] == ["sd3"] * 3
    assert not cards.fits("sd3", "sdxl") and cards.fits("sd3", "sd3") and cards.fits("sd3", "sdxl", show_all=True)
