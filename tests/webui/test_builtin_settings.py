"""The built-in Lora's settings keep their meaning with this extension handling networks: shown once (by the
built-in when it is enabled, else in this extension's section) and honoured."""
from __future__ import annotations

import pytest

from conftest import pixels

BUILTIN_KEYS = ("sd_lora", "lora_preferred_name", "lora_add_hashes_to_infotext", "lora_show_all",
                "lora_hide_unknown_for_versions", "lora_not_found_warning_console", "lora_not_found_gradio_warning")


def same(a: bytes, b: bytes) -> bool:
    return bool((pixels(a) == pixels(b)).all())


def set_options(client, **options) -> None:
    status, res = client.call("POST", "/sdapi/v1/options", options)
    assert status == 200, res


@pytest.mark.parametrize("config", ["ours", "both"])
def test_each_setting_is_registered_once_and_sd_lora_adds_its_network(server, config):
    client = server.ensure(config)
    status, options = client.call("GET", "/sdapi/v1/options")
    assert status == 200 and all(key in options for key in BUILTIN_KEYS)
    plain, _ = client.txt2img("a cat")
    with_token, _ = client.txt2img("a cat <lora:kohya_a:1>")
    set_options(client, sd_lora="kohya_a")
    try:
        added, info = client.txt2img("a cat")
        assert same(added, with_token) and not same(added, plain)
        assert "<lora:kohya_a:1>" in info["infotexts"][0] and "Lora hashes" in info["infotexts"][0]
        named, _ = client.txt2img("a cat <lora:kohya_a:0.5>")
        half, _ = client.txt2img("a cat <lora:kohya_b:0> <lora:kohya_a:0.5>")
        assert same(named, half), "a prompt naming the network keeps its own weight"
    finally:
        set_options(client, sd_lora="None")
    again, _ = client.txt2img("a cat")
    assert again == plain


def test_hashes_in_infotext_follow_the_setting(webui):
    set_options(webui, lora_add_hashes_to_infotext=False)
    try:
        _, info = webui.txt2img("a cat <lora:kohya_a:1>")
        assert "Lora hashes" not in info["infotexts"][0]
    finally:
        set_options(webui, lora_add_hashes_to_infotext=True)


def test_functional_method_is_the_bypass_mode(server):
    client = server.ensure("both")  # lora_functional is registered by the built-in (Compatibility section)
    set_options(client, sdlora_apply_mode="bypass")
    bypass, _ = client.txt2img("a cat <lora:kohya_a:1> <lora:kohya_b:1>")
    set_options(client, sdlora_apply_mode="auto", lora_functional=True)
    try:
        functional, _ = client.txt2img("a cat <lora:kohya_a:1> <lora:kohya_b:1>")
        assert same(functional, bypass)
    finally:
        set_options(client, lora_functional=False)


def test_not_found_warning_in_console(server):
    """The log always has the message; the setting adds the built-in's console line."""
    webui = server.ensure("ours")  # not the module's `webui` fixture: the test above restarted the WebUI as "both"
    webui.txt2img("a cat <lora:not_here_quiet:1>")
    set_options(webui, lora_not_found_warning_console=True)
    try:
        webui.txt2img("a cat <lora:not_here_loud:1>")
    finally:
        set_options(webui, lora_not_found_warning_console=False)
    log = webui.log()
    assert log.count("Lora not found: not_here_loud") == log.count("Lora not found: not_here_quiet") + 1
