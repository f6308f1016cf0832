"""Coexistence with the WebUI's built-in Lora, and agreement with it on a kohya file."""
from __future__ import annotations

import pytest

from conftest import pixels

PROMPT = "a cat <lora:kohya_b:1>"


@pytest.fixture(scope="module")
def images(server):
    """The same requests under the three configurations (one WebUI start each)."""
    out = {}
    for config in ("builtin", "both", "ours"):
        client = server.ensure(config)
        out[config] = {
            "plain": client.txt2img("a cat")[0],
            "lora": client.txt2img(PROMPT),
            "loras": client.call("GET", "/sdapi/v1/loras"),
        }
    return out


def test_same_image_as_builtin_lora(images):
    ours, builtin = pixels(images["ours"]["lora"][0]), pixels(images["builtin"]["lora"][0])
    assert abs(ours - builtin).max() <= 2
    assert abs(ours - pixels(images["ours"]["plain"])).max() > 2, "the LoRA must visibly change the image"


def test_never_applied_twice_with_builtin_enabled(images):
    both, ours = pixels(images["both"]["lora"][0]), pixels(images["ours"]["lora"][0])
    assert (both == ours).all()
    assert (pixels(images["both"]["plain"]) == pixels(images["ours"]["plain"])).all()


def test_infotext_hash_matches_builtin(images):
    import re
    pick = [re.search(r'Lora hashes: "([^"]+)"', images[c]["lora"][1]["infotexts"][0]) for c in ("ours", "builtin")]
    assert pick[0] and pick[1] and pick[0].group(1) == pick[1].group(1)


def test_api_answers_with_builtin_enabled(images):
    status, items = images["both"]["loras"]
    assert status == 200 and {"kohya_a", "kohya_b", "nested"} <= {i["name"] for i in items}
