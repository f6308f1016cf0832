"""The CLI's model from a checkpoint file (lib_lora.train.loader) and the attention it runs (attention.py),
at engine level: family detection, refusals, tokens in chunks, and --sdpa / --mem_eff_attn against ldm's own
attention on the tiny real-class model. Building from a real checkpoint with the WebUI's code is tested with the
WebUI's Python in tests/webui/test_train_cli.py."""
from __future__ import annotations

import copy
import importlib.util
import pickle

import pytest
import torch

import models
from helpers import unet_out
from lib_lora.errors import LoraError
from lib_lora.train import TrainConfig
from lib_lora.train.attention import attention_modules, chunked, sdpa, using_attention
from lib_lora.train.loader import config_for, detect_family, find_webui, read_checkpoint, token_chunks

SD1_KEYS = {"model.diffusion_model.input_blocks.0.0.weight",
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"}


def test_family_from_the_checkpoint_keys(tmp_path):
    assert detect_family("x", SD1_KEYS) == "sd1"
    assert detect_family("x", {"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"}) == "sd2"
    assert detect_family("x", {"conditioner.embedders.1.model.ln_final.weight"}) == "sdxl"
    with pytest.raises(LoraError, match="diffusers-layout file"):
        detect_family("x", {"unet.conv_in.weight"})
    with pytest.raises(LoraError, match="is not an SD1.x, SD2.x or SDXL checkpoint"):
        detect_family("x", {"lora_unet_a.lora_down.weight"})


def test_ckpt_goes_through_the_weights_only_unpickler(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {k: torch.zeros(1) for k in SD1_KEYS}}, str(good))
    keys, tensors = read_checkpoint(str(good))
    assert keys == SD1_KEYS and dict(tensors()).keys() == SD1_KEYS

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": Boom()}))
    with pytest.raises(LoraError, match="evil.ckpt"):
        read_checkpoint(str(evil))


def test_webui_folder_and_config_beside_the_checkpoint(tmp_path):
    with pytest.raises(LoraError, match="is not a stable-diffusion-webui folder"):
        find_webui(str(tmp_path))
    webui = tmp_path / "webui"
    (webui / "repositories" / "stable-diffusion-stability-ai" / "ldm").mkdir(parents=True)
    assert find_webui(str(webui)) == webui
    ckpt = tmp_path / "m.safetensors"
    assert config_for(str(ckpt), "sd1", webui) == (str(webui / "configs" / "v1-inference.yaml"), False)
    assert config_for(str(ckpt), "sdxl", webui)[0].endswith("generative-models/configs/inference/sd_xl_base.yaml")
    (tmp_path / "m.yaml").write_text("model: {}\n")
    assert config_for(str(ckpt), "sd2", webui) == (str(tmp_path / "m.yaml"), True)


def test_tokens_in_chunks_as_the_webui_splits_long_prompts():
    ids = [list(range(10, 90)), [5, 6]]  # 80 tokens and 2
    t = token_chunks(ids, 3, bos=1, eos=2, pad=0)
    assert t.shape == (2, 2, 77)
    assert t[0, 0, :3].tolist() == [1, 10, 11] and t[0, 0, 76] == 2 and t[0, 1, :7].tolist() == [1, 85, 86, 87, 88, 89, 2]
    assert t[1, 0, :4].tolist() == [1, 5, 6, 2] and t[1, 1].tolist() == [1, 2] + [0] * 75
    assert token_chunks(ids, 1, 1, 2, 0).shape == (2, 1, 77)  # 75 tokens: the rest is cut


def test_sdpa_and_chunked_attention_match_ldms_and_keep_the_hooks():
    model = models.sd_model("sd1", seed=0)
    unet = model.model.diffusion_model
    base = unet_out(model)
    modules = attention_modules(unet)
    assert len(modules) == 32  # attn1 + attn2 of SD1's 16 transformer blocks
    calls = []
    handle = modules[0].to_q.register_forward_hook(lambda *a: calls.append(1))
    for name in ("sdpa", "mem_eff_attn"):
        with using_attention(unet, name) as n:
            assert n == 32 and "forward" in modules[0].__dict__
            torch.testing.assert_close(unet_out(model), base, atol=1e-5, rtol=1e-5)
    handle.remove()
    assert len(calls) == 2 and all("forward" not in m.__dict__ for m in modules)
    with using_attention(unet, None) as n:
        assert n == 0
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 2500, 8, generator=g, requires_grad=True) for _ in range(3))
    torch.testing.assert_close(chunked(q, k, v), sdpa(q, k, v), atol=1e-5, rtol=1e-4)
    chunked(q, k, v).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_without_xformers_says_so():
    model = models.sd_model("sd1", seed=0)
    with pytest.raises(LoraError, match="xformers is not installed"):
        with using_attention(model.model.diffusion_model, "xformers"):
            pass


def test_trainer_runs_the_attention_it_is_told(tmp_path):
    from lib_lora.train import Trainer
    from test_train import config, make_bundle, make_images

    make_images(str(tmp_path / "img" / "2_cat"))
    cfg = config(tmp_path, max_train_steps=1, sdpa=True, save_state=False)
    lines = []
    model = copy.deepcopy(models.sd_model("sd1", seed=0))
    Trainer(cfg, make_bundle(model), log_fn=lines.append).run()
    assert "attention: sdpa in 32 UNet attention modules" in lines
    assert all("forward" not in m.__dict__ for m in attention_modules(model))
    assert TrainConfig(xformers=True, sdpa=True, mem_eff_attn=True).attention == "mem_eff_attn"
