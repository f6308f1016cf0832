"""A network file with a bundled textual-inversion embedding (kohya's ``bundle_emb.NAME.string_to_param.*``) in the
real WebUI on its SD1.5 checkpoint: while the network is in the prompt its embedding is in the WebUI's embedding
database, changes the image where its name is written, and is named in the infotext's "TI hashes" as the built-in
Lora names it; the built-in gives the same image."""
from __future__ import annotations

import pytest
import torch

import lorafiles
import models
from conftest import pixels

PROMPT = "a cat inkblot"
images: dict[str, tuple[bytes, dict]] = {}


@pytest.fixture(scope="module")
def files(lora_dir):
    sd = lorafiles.attention_lora(models.full_model("sd1", device="meta"), seed=11)
    sd["bundle_emb.inkblot.string_to_param.*"] = torch.randn(2, 768, generator=torch.Generator().manual_seed(12))
    lorafiles.save(lora_dir / "with_emb.safetensors", sd, {"ss_network_module": "networks.lora"})


def loaded(client) -> set[str]:
    status, body = client.call("GET", "/sdapi/v1/embeddings")
    assert status == 200, body
    return set(body["loaded"])


def test_embedding_is_there_while_its_network_is_listed(webui, files):
    assert webui.call("POST", "/sdapi/v1/refresh-loras")[0] == 200
    plain, _ = webui.txt2img(PROMPT)
    assert "inkblot" not in loaded(webui)
    png, info = webui.txt2img(f"{PROMPT} <lora:with_emb:0>")  # weight 0: the network's layers do nothing
    assert "inkblot" in loaded(webui)
    assert info["extra_generation_params"].get("TI hashes") == "inkblot: with_emb", info["extra_generation_params"]
    assert abs(pixels(png) - pixels(plain)).max() > 2, "the embedding's vectors must replace the word's tokens"
    unnamed, info = webui.txt2img("a cat <lora:with_emb:0>")
    assert "TI hashes" not in info["extra_generation_params"]
    assert (pixels(unnamed) == pixels(webui.txt2img("a cat")[0])).all()
    assert "inkblot" not in loaded(webui), "a job without the network takes its embedding away"
    assert webui.txt2img(PROMPT)[0] == plain
    images["ours"] = webui.txt2img(f"{PROMPT} <lora:with_emb:1>")


def test_builtin_lora_gives_the_same_image_and_infotext(server, files):
    builtin = server.ensure("builtin")
    assert builtin.call("POST", "/sdapi/v1/refresh-loras")[0] == 200
    png, info = builtin.txt2img(f"{PROMPT} <lora:with_emb:1>")
    ours, ours_info = images["ours"]
    assert info["extra_generation_params"]["TI hashes"] == ours_info["extra_generation_params"]["TI hashes"]
    assert abs(pixels(png) - pixels(ours)).max() <= 2
