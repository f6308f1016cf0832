"""The hook's logic in a real sampling loop on a tiny real ldm model, through a stand-in for `modules`
(tests/standin mirrors the WebUI files it names). The real WebUI runs the same hook in tests/webui."""
from __future__ import annotations

import hashlib
import pathlib
import sys
from types import SimpleNamespace

import pytest
import torch

import lorafiles
import models
from helpers import same_state, state

STANDIN = pathlib.Path(__file__).parent / "standin"


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    saved = {k: v for k, v in sys.modules.items() if k == "modules" or k.startswith(("modules.", "lib_lora.webui"))}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(STANDIN))
    try:
        from modules import extra_networks, paths, script_callbacks, shared
        folder = tmp_path_factory.mktemp("loras")
        paths.data_path = str(folder / "data")
        shared.cmd_opts.lora_dir = str(folder)
        shared.sd_model = models.sd_model("sd1", seed=31)
        lorafiles.save(folder / "style.safetensors", lorafiles.random_kohya_lora(shared.sd_model, rank=4, seed=1, scale=0.05), {})
        from lib_lora.webui import glue
        glue.install_callbacks()
        for cb in script_callbacks.callbacks["before_ui"]:
            cb()
        yield SimpleNamespace(extra_networks=extra_networks, shared=shared, callbacks=script_callbacks, glue=glue)
    finally:
        sys.path.remove(str(STANDIN))
        for k in [k for k in sys.modules if k == "modules" or k.startswith(("modules.", "lib_lora.webui"))]:
            del sys.modules[k]
        sys.modules.update(saved)


class Denoiser:
    step = 0


def generate(w, prompt: str, seed: int = 1, steps: int = 3):
    """What processing.py does per batch: parse, activate, encode, then sample with cfg callbacks."""
    p = SimpleNamespace(prompts=[prompt], negative_prompts=[""], steps=steps, comments={}, extra_generation_params={},
                        is_hr_pass=False)
    p.comment = lambda text: p.comments.__setitem__(text, 1)
    w.glue.strip_negative_tokens(p)
    p.prompts, data = w.extra_networks.parse_prompts(p.prompts)
    w.extra_networks.activate(p, data)
    m = w.shared.sd_model
    digest = hashlib.sha256(" ".join(p.prompts[0].split()).encode()).digest()
    tokens = torch.tensor([[b % 1000 for b in digest] * 2 + [0] * 13])
    with torch.no_grad():
        ctx = m.cond_stage_model.wrapped.transformer(tokens).last_hidden_state
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
        den = Denoiser()
        for i in range(steps):
            for cb in w.callbacks.callbacks["cfg_denoiser"]:
                cb(w.callbacks.CFGDenoiserParams(i, steps, den))
            x = x - 0.2 * m.model.diffusion_model(x, torch.tensor([999 - 300 * i]), ctx)
            den.step += 1
    return x, p


def test_lora_changes_the_image_and_weight_zero_equals_none(webui):
    plain, _ = generate(webui, "a cat")
    with_lora, p = generate(webui, "a cat <lora:style:0.8>")
    zero, _ = generate(webui, "a cat <lora:style:0>")
    assert (with_lora - plain).abs().max() > 1e-3
    assert torch.equal(zero, plain)
    assert "Lora hashes" in p.extra_generation_params


def test_same_seed_and_set_is_deterministic(webui):
    a, _ = generate(webui, "a dog <lora:style:0.5>")
    b, _ = generate(webui, "a dog <lora:style:0.5>")
    assert torch.equal(a, b)


def test_weights_bit_identical_after_the_job(webui):
    m = webui.shared.sd_model
    generate(webui, "a cat")
    ref = state(m)
    generate(webui, "a cat <lora:style:1>")
    assert not same_state(m, ref), "merged while the set is active"
    generate(webui, "a cat")
    assert same_state(m, ref)


def test_unknown_name_and_bad_tokens_still_give_an_image(webui):
    plain, _ = generate(webui, "a cat")
    for token, words in [("<lora:nope:1>", "not found"), ("<lora:style:abc>", "number"), ("<lora:../x:1>", "not a name"),
                         ("<lora:style:1e999>", "finite")]:
        img, p = generate(webui, f"a cat {token}")
        assert torch.equal(img, plain), token
        assert any(words in c for c in p.comments), (token, p.comments)


def test_negative_prompt_token_and_schedule(webui):
    plain, _ = generate(webui, "a cat")
    p_neg = SimpleNamespace(negative_prompts=["ugly <lora:style:1>"])
    webui.glue.strip_negative_tokens(p_neg)
    assert p_neg.negative_prompts == ["ugly "] and p_neg.sdlora_negative == [["style", "1"]]
    late, _ = generate(webui, "a cat <lora:style:1:start=2>")
    full, _ = generate(webui, "a cat <lora:style:1>")
    assert not torch.equal(late, plain) and not torch.equal(late, full)
    webui.extra_networks.activate(SimpleNamespace(prompts=[""], negative_prompts=[""], steps=3, comments={},
                                                  extra_generation_params={}, is_hr_pass=False,
                                                  comment=lambda t: None), {})


def test_model_switch_mid_job_carries_the_networks(webui):
    """A refiner or checkpoint switch inside a job: the new model gets the job's networks, the old one is
    left exactly as loaded."""
    old = webui.shared.sd_model
    generate(webui, "a cat")
    old_ref = state(old)
    p = SimpleNamespace(prompts=["a cat"], negative_prompts=[""], steps=3, comments={}, extra_generation_params={},
                        is_hr_pass=False, comment=lambda t: None)
    webui.extra_networks.activate(p, {"lora": [webui.extra_networks.ExtraNetworkParams(["style", "1"])]})
    new = models.sd_model("sd1", seed=32)
    new_ref = state(new)
    webui.shared.sd_model = new
    try:
        for cb in webui.callbacks.callbacks["model_loaded"]:
            cb(new)
        assert same_state(old, old_ref), "the model switched away from is restored"
        assert not same_state(new, new_ref), "the job's network is applied to the new model"
        generate(webui, "a cat")
        assert same_state(new, new_ref)
    finally:
        webui.shared.sd_model = old
        generate(webui, "a cat")
