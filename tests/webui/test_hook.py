"""`<lora:…>` in prompts, through the real WebUI's HTTP API (built-in Lora disabled)."""
from __future__ import annotations

import base64
import json
import re
import shutil

import pytest

from conftest import pixels


def same(a: bytes, b: bytes) -> bool:
    """Same pixels (PNG bytes also carry the prompt text, which differs between requests)."""
    return bool((pixels(a) == pixels(b)).all())


@pytest.fixture(scope="module")
def plain(webui):
    png, info = webui.txt2img("a cat")
    return png


def test_lora_changes_image_and_restore_is_exact(webui, plain):
    png, info = webui.txt2img("a cat <lora:kohya_a:1>")
    assert png != plain
    assert (abs(pixels(png) - pixels(plain))).max() > 0
    again, _ = webui.txt2img("a cat")
    assert again == plain, "the plain prompt after a LoRA job must give the plain image byte for byte"


def test_weight_zero_equals_none(webui, plain):
    png, _ = webui.txt2img("a cat <lora:kohya_a:0>")
    assert same(png, plain)


def test_same_seed_same_set_is_deterministic(webui):
    a, _ = webui.txt2img("a cat <lora:kohya_a:0.8> <lora:kohya_b:0.5>")
    b, _ = webui.txt2img("a cat <lora:kohya_a:0.8> <lora:kohya_b:0.5>")
    assert a == b


def test_infotext_has_lora_hashes(webui):
    _, info = webui.txt2img("a cat <lora:kohya_a:0.7>")
    text = info["infotexts"][0]
    assert re.search(r'Lora hashes: "kohya_a: [0-9a-f]{12}"', text), text


def test_split_te_unet_weights(webui, plain):
    te_only, _ = webui.txt2img("a cat <lora:kohya_a:1:0>")
    unet_only, _ = webui.txt2img("a cat <lora:kohya_a:0:1>")
    named, _ = webui.txt2img("a cat <lora:kohya_a:te=0:unet=1>")
    assert not same(te_only, plain) and not same(unet_only, plain) and not same(te_only, unet_only)
    assert same(named, unet_only)


@pytest.mark.parametrize("token,reason", [
    ("<lora:does_not_exist:1>", "not found"),
    ("<lora:broken:1>", "broken"),
    ("<lora:xl_only:1>", "SDXL"),
    ("<lora:../escape:1>", "not a name inside"),
    ("<lora:kohya_a:abc>", "must be a number"),
    ("<lora:kohya_a:nan>", "finite"),
])
def test_bad_requests_still_give_an_image_with_a_message(webui, plain, token, reason):
    png, info = webui.txt2img(f"a cat {token}")
    assert same(png, plain)
    text = info["infotexts"][0]
    assert "Lora errors" in text and reason in text, text


def test_negative_prompt_token_is_honoured(webui, plain):
    png, info = webui.txt2img("a cat", negative_prompt="ugly <lora:kohya_a:1>")
    ref, _ = webui.txt2img("a cat", negative_prompt="ugly")
    assert not same(png, ref)
    assert "Lora hashes" in info["infotexts"][0]


def test_subfolder_and_alias_names(webui, plain):
    nested, _ = webui.txt2img("a cat <lora:sub/nested:1>")
    short, _ = webui.txt2img("a cat <lora:nested:1>")
    assert same(nested, short) and not same(nested, plain)
    alias, _ = webui.txt2img("a cat <lora:kohya_a_alias:1>")
    by_name, _ = webui.txt2img("a cat <lora:kohya_a:1>")
    assert same(alias, by_name)


def test_hires_fix_applies_in_both_passes(webui):
    kw = dict(enable_hr=True, hr_scale=1.5, hr_second_pass_steps=1, denoising_strength=0.5, hr_upscaler="Latent")
    plain_hr, _ = webui.txt2img("a cat", **kw)
    lora_hr, info = webui.txt2img("a cat <lora:kohya_a:1>", **kw)
    assert not same(plain_hr, lora_hr) and "Lora hashes" in info["infotexts"][0]
    again, _ = webui.txt2img("a cat", **kw)
    assert again == plain_hr


def test_api_lists_and_refreshes(webui, lora_dir):
    status, items = webui.call("GET", "/sdapi/v1/loras")
    assert status == 200
    names = {i["name"]: i for i in items}
    assert {"kohya_a", "kohya_b", "nested", "xl_only", "broken"} <= set(names)
    assert names["kohya_a"]["alias"] == "kohya_a_alias" and set(names["kohya_a"]) == {"name", "alias", "path", "metadata"}
    shutil.copy(lora_dir / "kohya_b.safetensors", lora_dir / "added_later.safetensors")
    assert webui.call("POST", "/sdapi/v1/refresh-loras")[0] == 200
    status, items = webui.call("GET", "/sdapi/v1/loras")
    assert "added_later" in {i["name"] for i in items}


def test_info_route(webui):
    status, info = webui.call("GET", "/lora/v1/info/kohya_a")
    assert status == 200, info
    assert info["base_model"] == "sd1" and info["kinds"] == {"lora": info["modules"]}
    assert len(info["hashes"]["sha256"]) == 64 and len(info["shorthash"]) == 12
    assert webui.call("GET", "/lora/v1/info/nope")[0] == 404


def test_start_stop_schedule_runs_in_bypass(webui):
    kw = dict(steps=3)
    plain3, _ = webui.txt2img("a cat", **kw)
    merged, _ = webui.txt2img("a cat <lora:kohya_a:0.5>", **kw)
    bypass_all, _ = webui.txt2img("a cat <lora:kohya_a:0.5:start=0>", **kw)
    late, _ = webui.txt2img("a cat <lora:kohya_a:0.5:start=1>", **kw)
    early, _ = webui.txt2img("a cat <lora:kohya_a:0.5:stop=1>", **kw)
    assert abs(pixels(bypass_all) - pixels(merged)).max() <= 2, "bypass and merge give the same image"
    imgs = [late, early, plain3, merged]
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert not same(imgs[i], imgs[j]), (i, j)
    again, _ = webui.txt2img("a cat", **kw)
    assert again == plain3


@pytest.mark.parametrize("name", ["peft_style", "lyco_loha"])
def test_peft_and_lycoris_files(webui, plain, name):
    png, info = webui.txt2img(f"a cat <lora:{name}:1>")
    assert not same(png, plain) and "Lora errors" not in info["infotexts"][0], info["infotexts"][0]


def test_img2img_applies_and_restores(webui, plain):
    init = base64.b64encode(plain).decode()
    body = {"init_images": [init], "denoising_strength": 0.6, "steps": 2, "width": 64, "height": 64, "seed": 1,
            "sampler_name": "Euler", "save_images": False}
    status, ref = webui.call("POST", "/sdapi/v1/img2img", dict(body, prompt="a cat"))
    assert status == 200, ref
    status, lora = webui.call("POST", "/sdapi/v1/img2img", dict(body, prompt="a cat <lora:kohya_a:0.8>"))
    assert status == 200, lora
    status, again = webui.call("POST", "/sdapi/v1/img2img", dict(body, prompt="a cat"))
    a, b, c = (base64.b64decode(r["images"][0]) for r in (ref, lora, again))
    assert not same(a, b) and a == c
    assert "Lora hashes" in json.loads(lora["info"])["infotexts"][0]
