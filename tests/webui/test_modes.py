"""The WebUI settings users run every day: FP8 weights (with and without the fp16 cache), --medvram and
--lowvram (merge and bypass), and --api-auth / --gradio-auth on every route this extension adds."""
from __future__ import annotations

import json
import urllib.parse
import urllib.request

import pytest

from conftest import AUTH, pixels


def same(a: bytes, b: bytes) -> bool:
    return bool((pixels(a) == pixels(b)).all())


def set_options(client, **options) -> None:
    status, res = client.call("POST", "/sdapi/v1/options", options)
    assert status == 200, res


def check_networks_apply_stack_and_restore(client) -> None:
    """A network changes the image, a second one stacks on it, a weight change is recomputed (not compounded),
    and the plain prompt afterwards gives the plain image of the same settings byte for byte."""
    plain, _ = client.txt2img("a cat")
    a, info = client.txt2img("a cat <lora:kohya_a:1>")
    assert not same(a, plain) and "Lora hashes" in info["infotexts"][0]
    ab, _ = client.txt2img("a cat <lora:kohya_a:1> <lora:kohya_b:1>")
    assert not same(ab, a) and not same(ab, plain)
    half, _ = client.txt2img("a cat <lora:kohya_a:0.5> <lora:kohya_b:1>")
    assert not same(half, ab)
    again, _ = client.txt2img("a cat <lora:kohya_a:1>")
    assert same(again, a), "going back to a set must give its image again"
    after, _ = client.txt2img("a cat")
    assert after == plain, "the plain prompt after networks must give the plain image byte for byte"


@pytest.fixture(scope="module")
def fp8(server):
    client = server.ensure("fp8")
    yield client
    if server.client is client:  # the auth tests below restart the WebUI in another configuration
        set_options(client, fp8_storage="Disable", cache_fp16_weight=False, sdlora_apply_mode="auto")


@pytest.mark.parametrize("cache", [False, True], ids=["fp8", "fp8+fp16cache"])
@pytest.mark.parametrize("mode", ["auto", "bypass"])
def test_fp8_weights(fp8, cache, mode):
    set_options(fp8, fp8_storage="Enable", cache_fp16_weight=cache, sdlora_apply_mode=mode)
    _, info = fp8.txt2img("a cat")
    assert "FP8 weight: Enable" in info["infotexts"][0], info["infotexts"][0]
    check_networks_apply_stack_and_restore(fp8)


def test_fp8_without_cache_says_once_what_is_lost(fp8):
    set_options(fp8, fp8_storage="Enable", cache_fp16_weight=False, sdlora_apply_mode="auto")
    fp8.txt2img("a cat <lora:kohya_a:1>")
    fp8.txt2img("a cat <lora:kohya_b:1>")
    assert fp8.log().count("FP8 weights without *Cache FP16 weight for LoRA*") == 1


def test_fp16_cache_gives_the_merge_of_full_precision_weights(fp8):
    """With the cache, a merge starts from the fp16 copy: a different (more precise) image than from 8-bit weights."""
    set_options(fp8, fp8_storage="Enable", cache_fp16_weight=False, sdlora_apply_mode="auto")
    rough, _ = fp8.txt2img("a cat <lora:kohya_a:0.3>")
    set_options(fp8, cache_fp16_weight=True)
    fine, _ = fp8.txt2img("a cat <lora:kohya_a:0.3>")
    assert not same(rough, fine)


@pytest.mark.parametrize("config", ["medvram", "lowvram"])
def test_low_vram_modes(server, config):
    """The WebUI moves model parts between devices around every block (its hooks run on a CPU-only bed too)."""
    client = server.ensure(config)
    assert f"--{config}" in client.log()
    for mode in ("auto", "bypass"):
        set_options(client, sdlora_apply_mode=mode)
        check_networks_apply_stack_and_restore(client)


# ---- authentication ----------------------------------------------------------------------------
ROUTES = [
    ("GET", "/sdapi/v1/loras", None),
    ("POST", "/sdapi/v1/refresh-loras", None),
    ("GET", "/lora/v1/info/kohya_a", None),
    ("POST", "/lora/v1/tools/resize", {"name": "kohya_a", "output": "auth_resized", "rank": 2}),
    ("POST", "/lora/v1/tools/merge", {"networks": "kohya_a:0.5, kohya_b:0.5", "output": "auth_merged", "rank": 2}),
    ("POST", "/lora/v1/tools/extract", {"base": "no-such-base", "tuned": "no-such-tune", "output": "auth_x"}),
    ("POST", "/lora/v1/try-weights", {"name": "kohya_a", "prompt": "a cat", "steps": 1, "width": 64, "height": 64}),
]


@pytest.fixture(scope="module")
def secured(server, lora_dir):
    client = server.ensure("auth")
    yield client
    for name in ("auth_resized", "auth_merged", "auth_x"):
        (lora_dir / f"{name}.safetensors").unlink(missing_ok=True)


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[r[1] for r in ROUTES])
def test_every_route_needs_the_api_credentials(secured, method, path, body):
    status, _ = secured.call(method, path, body, auth=None)
    assert status == 401
    status, _ = secured.call(method, path, body, auth=(AUTH[0], "wrong"))
    assert status == 401
    status, res = secured.call(method, path, body)
    assert status != 401, res
    assert status == 200 or (path.endswith("/extract") and status == 400), res  # unknown checkpoints, but let in


def test_the_page_calls_its_route_with_the_gradio_login(secured):
    body = json.dumps({"name": "kohya_a", "prompt": "a cat", "steps": 1, "width": 64, "height": 64}).encode()

    def post(cookie: str | None) -> int:
        req = urllib.request.Request(secured.url + "/internal/lora/try-weights", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **({"Cookie": cookie} if cookie else {})})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert post(None) == 401
    login = urllib.request.Request(secured.url + "/login", method="POST",
                                   data=urllib.parse.urlencode({"username": AUTH[0], "password": AUTH[1]}).encode())
    with urllib.request.urlopen(login, timeout=60) as r:
        cookie = "; ".join(c.split(";")[0] for c in r.headers.get_all("Set-Cookie"))
    assert post(cookie) == 200


def test_generation_with_credentials_applies_networks(secured):
    plain, _ = secured.txt2img("a cat")
    png, info = secured.txt2img("a cat <lora:kohya_a:1>")
    assert not same(png, plain) and "Lora hashes" in info["infotexts"][0]
