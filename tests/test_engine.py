"""Engine behaviour on the real module classes (tiny ldm UNet, transformers CLIP, open_clip, SDXL skeleton)."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

import lib_lora
import lorafiles
import models
from helpers import same_state, state, te_out, unet_out
from lib_lora.keymap import split_key, target_for, unet_path


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def family_model(request):
    return request.param, models.sd_model(request.param, seed=1)


def _net(model, seed=0, sdxl=False, **kw):
    return lib_lora.from_state_dict(lorafiles.random_kohya_lora(model, seed=seed, sdxl=sdxl, **kw))


def test_merge_equals_bypass_and_changes_output(family_model):
    fam, m = family_model
    net = _net(m)
    assert net.base_model == fam
    p = lib_lora.Patcher(m)
    ref = state(m)
    u0, t0 = unet_out(m), te_out(m)
    res = p.apply([lib_lora.Use(net, te=0.7, unet=0.8)], mode="merge")
    assert not res.skipped and len(res.matched) > 0
    um, tm = unet_out(m), te_out(m)
    p.restore()
    assert same_state(m, ref)
    p.apply([lib_lora.Use(net, te=0.7, unet=0.8)], mode="bypass")
    assert same_state(m, ref), "bypass must not touch parameters"
    ub, tb = unet_out(m), te_out(m)
    p.restore()
    assert same_state(m, ref)
    assert (um - u0).abs().max() > 1e-2 and (tm - t0).abs().max() > 1e-2
    torch.testing.assert_close(ub, um, atol=1e-5 * max(1, um.abs().max().item()), rtol=0)
    torch.testing.assert_close(tb, tm, atol=1e-5 * max(1, tm.abs().max().item()), rtol=0)


def test_merge_matches_hand_computed_delta():
    m = models.sd_model("sd1", seed=2)
    sd = lorafiles.random_kohya_lora(m, rank=3, alpha=1.5)
    net = lib_lora.from_state_dict(sd)
    name = "model.diffusion_model.input_blocks.1.1.proj_in"
    conv = m.model.diffusion_model.input_blocks[1][1].proj_in
    w0 = conv.weight.detach().clone()
    p = lib_lora.Patcher(m)
    p.apply([lib_lora.Use(net, unet=0.6)])
    key = "lora_unet_input_blocks_1_1_proj_in"
    up, down = sd[key + ".lora_up.weight"], sd[key + ".lora_down.weight"]
    want = w0 + 0.6 * (1.5 / 3) * (up.reshape(up.shape[0], -1) @ down.reshape(3, -1)).reshape(w0.shape)
    torch.testing.assert_close(conv.weight.detach(), want, atol=1e-6, rtol=1e-6)
    assert name in p.apply([lib_lora.Use(net, unet=0.6)]).matched
    p.restore()
    assert torch.equal(conv.weight.detach(), w0)


def test_weight_zero_is_no_network():
    m = models.sd_model("sd1", seed=3)
    ref = state(m)
    p = lib_lora.Patcher(m)
    res = p.apply([lib_lora.Use(_net(m), te=0, unet=0)])
    assert res.matched == [] and same_state(m, ref)


def test_thousand_random_cycles_end_bit_identical():
    m = models.sd_model("sd1", seed=4)
    ref = state(m)
    rng = random.Random(0)
    nets = []
    for i in range(4):
        sd = lorafiles.random_kohya_lora(m, seed=i, rank=2)
        keep = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in sd}
        chosen = set(rng.sample(sorted(keep), 12))
        nets.append(lib_lora.from_state_dict({k: v for k, v in sd.items() if k.split(".")[0] in chosen}))
    p = lib_lora.Patcher(m)
    for _ in range(1000):
        action = rng.random()
        if action < 0.1:
            p.restore()
            continue
        stack = [lib_lora.Use(n, te=rng.choice([0, 0.5, 1, -0.7]), unet=rng.choice([0.3, 1, 2.5]),
                              dyn=rng.choice([None, None, 1]))
                 for n in rng.sample(nets, rng.randint(0, 3))]
        p.apply(stack, mode="merge" if action < 0.8 else "bypass")
    p.restore()
    assert same_state(m, ref)


def test_unchanged_set_touches_nothing_and_one_change_touches_only_that_network():
    m = models.sd_model("sd1", seed=5)
    a, b, c = (_net(m, seed=i) for i in range(3))
    sub = {k: v for k, v in lorafiles.random_kohya_lora(m, seed=9).items() if "input_blocks_1_" in k}
    d = lib_lora.from_state_dict(sub)
    p = lib_lora.Patcher(m)
    p.apply([lib_lora.Use(a), lib_lora.Use(b), lib_lora.Use(d)])
    assert p.apply([lib_lora.Use(a), lib_lora.Use(b), lib_lora.Use(d)]).written == []
    res = p.apply([lib_lora.Use(a), lib_lora.Use(b), lib_lora.Use(d, unet=0.5)])
    assert res.written and all("input_blocks.1." in n for n in res.written)
    res = p.apply([lib_lora.Use(a), lib_lora.Use(c)])
    assert len(res.written) > 0
    p.restore()


def test_stacking_sums_deltas():
    m = models.sd_model("sd1", seed=6)
    a, b = _net(m, seed=1), _net(m, seed=2)
    base = unet_out(m)
    p = lib_lora.Patcher(m)
    p.apply([lib_lora.Use(a, unet=0.5)])
    da = unet_out(m) - base
    p.apply([lib_lora.Use(a, unet=0.5), lib_lora.Use(b, unet=0.5)])
    both = unet_out(m)
    p.apply([lib_lora.Use(b, unet=0.5), lib_lora.Use(a, unet=0.5)])
    both2 = unet_out(m)
    p.restore()
    torch.testing.assert_close(both, both2, atol=1e-5, rtol=0)
    assert (both - base - da).abs().max() > 1e-3


def test_sdxl_skeleton_maps_every_module_and_restores():
    m = models.sdxl_skeleton(seed=0)
    ref = state(m)
    net = _net(m, sdxl=True)
    assert net.base_model == "sdxl"
    p = lib_lora.Patcher(m)
    assert p.family == "sdxl"
    res = p.apply([lib_lora.Use(net, te=0.5, unet=0.5)])
    assert not res.skipped
    names = set(res.matched)
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn" in names
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj" in names
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q" in names
    p.apply([lib_lora.Use(net)], mode="bypass")
    p.restore()
    assert same_state(m, ref)


def test_wrong_family_is_rejected_naming_both():
    sd1 = models.sd_model("sd1", seed=7)
    xl_net = _net(models.sdxl_skeleton(seed=0), sdxl=True)
    ref = state(sd1)
    res = lib_lora.Patcher(sd1).apply([lib_lora.Use(xl_net)])
    assert res.errors and "SDXL" in res.errors[0] and "SD1" in res.errors[0]
    assert res.matched == [] and len(res.skipped) == len(xl_net.modules)
    assert same_state(sd1, ref)


def test_every_key_not_applied_has_a_reason():
    m = models.sd_model("sd1", seed=8)
    sd = lorafiles.random_kohya_lora(m, rank=2)
    sd["lora_unet_no_such_block_0_to_q.lora_down.weight"] = torch.zeros(2, 4)
    sd["lora_unet_no_such_block_0_to_q.lora_up.weight"] = torch.zeros(4, 2)
    sd["lora_unet_input_blocks_1_1_proj_out.lora_down.weight"] = torch.randn(2, 7, 1, 1)
    sd["something_else.weird"] = torch.zeros(1)
    sd["lora_unet_out_2.hada_w1_a"] = torch.zeros(1)
    net = lib_lora.from_state_dict(sd)
    res = lib_lora.Patcher(m).apply([lib_lora.Use(net)])
    assert "no module" in res.skipped["lora_unet_no_such_block_0_to_q"]
    assert "fit" in res.skipped["lora_unet_input_blocks_1_1_proj_out"]
    assert res.skipped["something_else.weird"] == "unknown key style"
    assert "not used" in res.skipped["lora_unet_out_2.hada_w1_a"]


def test_block_weights_follow_lbw_layout():
    m = models.sd_model("sd1", seed=9)
    net = _net(m)
    p = lib_lora.Patcher(m)
    res = p.apply([lib_lora.Use(net, blocks="OUTS")])
    assert res.matched
    for name in res.matched:
        assert name.startswith(("cond_stage_model", "model.diffusion_model.output_blocks.8", "model.diffusion_model.output_blocks.9",
                                "model.diffusion_model.output_blocks.10", "model.diffusion_model.output_blocks.11",
                                "model.diffusion_model.output_blocks.7", "model.diffusion_model.time_embed",
                                "model.diffusion_model.out.")), name
    bw = lib_lora.BlockWeights([1] * 26)
    assert bw.multiplier("unet", "middle_block_1_proj_in") == 1
    assert lib_lora.BlockWeights("XLOUT").multiplier("unet", "input_blocks_4_1_proj_in") == 0
    with pytest.raises(ValueError):
        lib_lora.BlockWeights("1,2,3")
    p.restore()


def test_dyn_keeps_first_ranks():
    m = models.sd_model("sd1", seed=10)
    sd = lorafiles.random_kohya_lora(m, rank=4, alpha=None)
    one = {k: (v[:1] if k.endswith("lora_down.weight") else v[:, :1] if k.endswith("lora_up.weight") else v) for k, v in sd.items()}
    p = lib_lora.Patcher(m)
    p.apply([lib_lora.Use(lib_lora.from_state_dict(sd), dyn=1)])
    a = unet_out(m)
    p.apply([lib_lora.Use(lib_lora.from_state_dict(one))])
    b = unet_out(m)
    p.restore()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_fp16_model_and_fp16_file_restore_exactly():
    m = models.sd_model("sd1", seed=11).half()
    ref = state(m)
    net = lib_lora.from_state_dict(lorafiles.random_kohya_lora(m, dtype=torch.float16))
    p = lib_lora.Patcher(m)
    res = p.apply([lib_lora.Use(net)])
    assert not res.skipped and not same_state(m, ref)
    assert all(v.dtype == torch.float16 for v in m.state_dict().values() if v.is_floating_point())
    p.restore()
    assert same_state(m, ref)


@pytest.mark.parametrize("mode", ["merge", "bypass"])
@pytest.mark.parametrize("k", [1, 7, 50, 300])
def test_exception_at_kth_module_rolls_back(monkeypatch, mode, k):
    m = models.sd_model("sd1", seed=12)
    ref = state(m)
    net = _net(m)
    p = lib_lora.Patcher(m)
    p.apply([lib_lora.Use(_net(m, seed=5), unet=0.3)])
    calls = {"n": 0}
    real_write, real_hook = lib_lora.Patcher._write, lib_lora.Patcher._hook

    def counting(orig):
        def wrapper(self, *a, **kw):
            calls["n"] += 1
            if calls["n"] == k:
                raise RuntimeError("injected")
            return orig(self, *a, **kw)
        return wrapper

    monkeypatch.setattr(lib_lora.Patcher, "_write", counting(real_write))
    monkeypatch.setattr(lib_lora.Patcher, "_hook", counting(real_hook))
    with pytest.raises(RuntimeError, match="injected"):
        p.apply([lib_lora.Use(net)], mode=mode)
    assert same_state(m, ref)
    assert not any(mod._forward_hooks for mod in m.modules())


def test_mismatched_sd2_mha_qkv_split():
    m = models.sd_model("sd2", seed=13)
    net = _net(m)
    names = lib_lora.Patcher(m).apply([lib_lora.Use(net)]).matched
    assert "cond_stage_model.model.transformer.resblocks.3.attn" in names
    assert "cond_stage_model.model.transformer.resblocks.3.attn.out_proj" in names


@pytest.mark.parametrize("key,want", [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
     ("unet", "input_blocks_1_1_transformer_blocks_0_attn1_to_q")),
    ("lora_unet_down_blocks_1_resnets_1_conv1.lora_up.weight", ("unet", "input_blocks_5_0_in_layers_2")),
    ("lora_unet_down_blocks_2_downsamplers_0_conv.lora_up.weight", ("unet", "input_blocks_9_0_op")),
    ("lora_unet_mid_block_resnets_1_time_emb_proj.alpha", ("unet", "middle_block_2_emb_layers_1")),
    ("lora_unet_up_blocks_0_upsamplers_0_conv.lora_up.weight", ("unet", "output_blocks_2_1_conv")),
    ("lora_unet_up_blocks_1_upsamplers_0_conv.lora_up.weight", ("unet", "output_blocks_5_2_conv")),
    ("lora_unet_up_blocks_3_attentions_2_proj_out.lora_up.weight", ("unet", "output_blocks_11_1_proj_out")),
    ("lora_unet_conv_in.lora_up.weight", ("unet", "input_blocks_0_0")),
    ("lora_unet_time_embedding_linear_2.lora_up.weight", ("unet", "time_embed_2")),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
     ("unet", "input_blocks_1_1_transformer_blocks_0_attn1_to_q")),
    ("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight",
     ("unet", "output_blocks_3_1_transformer_blocks_0_attn2_to_out_0")),
    ("text_encoder.text_model.encoder.layers.3.mlp.fc1.lora.down.weight", ("te", "text_model_encoder_layers_3_mlp_fc1")),
    ("lora_te_text_model_encoder_layers_0_self_attn_k_proj.alpha", ("te", "text_model_encoder_layers_0_self_attn_k_proj")),
])
def test_key_mapping_sd1(key, want):
    part, name, _param = split_key(key)
    t = target_for(part, name, "sd1")
    assert (t.part, t.path) == want


def test_key_mapping_open_clip():
    part, name, _ = split_key("lora_te2_text_model_encoder_layers_5_self_attn_v_proj.lora_up.weight")
    assert target_for(part, name, "sdxl") == lib_lora.Target("te2", "transformer_resblocks_5_attn", "v")
    part, name, _ = split_key("lora_te_text_model_encoder_layers_5_mlp_fc2.lora_up.weight")
    assert target_for(part, name, "sd2") == lib_lora.Target("te", "transformer_resblocks_5_mlp_c_proj")
    assert unet_path("up_blocks_0_upsamplers_0_conv", "sdxl") == "output_blocks_2_2_conv"


def test_inspect_cli_prints_one_json_object(tmp_path):
    m = models.sd_model("sd1", seed=14)
    path = lorafiles.save(tmp_path / "x.safetensors", lorafiles.random_kohya_lora(m, rank=4, alpha=2),
                          {"ss_network_module": "networks.lora", "ss_output_name": "x"})
    out = subprocess.run([sys.executable, "-m", "lib_lora", "inspect", path, "--json"], capture_output=True, text=True,
                         check=True, cwd=str(lorafiles.__file__).rsplit("/tests/", 1)[0])
    info = json.loads(out.stdout)
    assert info["format"] == "kohya" and info["base_model"] == "sd1" and info["kinds"] == {"lora": 354}
    assert info["rank"] == 4 and info["alpha"] == 2.0 and info["metadata"]["ss_output_name"] == "x"
    import hashlib
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    assert info["hashes"]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert info["hashes"]["autov2"] == info["hashes"]["sha256"][:10]
    assert info["hashes"]["autov3"] == hashlib.sha256(raw[8 + n:]).hexdigest()
