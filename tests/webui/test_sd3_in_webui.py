"""SD3 in the real WebUI: tests/webui/tiny_checkpoints.py's random-weight SD3 checkpoint (the WebUI's own
modules/models/sd3 classes) loaded by the WebUI itself. A LoRA saved by diffusers (SD3Transformer2DModel with the
checkpoint's MMDiT weights, peft, ``save_lora_weights``) gives the built-in Lora's image; LoRAs on every layer
apply in merge and bypass; kohya's SD3 names reach the MMDiT and both CLIP text encoders; every plain image
afterwards is the plain image, byte for byte."""
from __future__ import annotations

import pathlib

import pytest
import torch
from safetensors import safe_open

import sd3_models
from conftest import pixels, tiny_checkpoint
from lorafiles import save

PROMPT = "a red fox"
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # what the built-in's diffusers_weight_mapping() maps
KOHYA_ROOTS = {"model.diffusion_model.": "lora_unet_", "text_encoders.clip_l.transformer.": "lora_te1_",
               "text_encoders.clip_g.transformer.": "lora_te2_"}
images: dict[str, bytes] = {}  # ours, for the built-in's run at the end


def diffusers_file(ckpt: pathlib.Path, path: pathlib.Path, targets: list[str], seed: int) -> None:
    with safe_open(str(ckpt), framework="pt") as f:
        prefix = "model.diffusion_model."
        state = {k[len(prefix):]: f.get_tensor(k).float() for k in f.keys() if k.startswith(prefix)}
    transformer = sd3_models.diffusers_transformer_from(state)
    sd3_models.save_diffusers_sd3_lora(path, transformer, rank=4, alpha=4, seed=seed, targets=targets, std=0.05)


def kohya_file(ckpt: pathlib.Path, path: pathlib.Path, seed: int) -> None:
    """sd-scripts' lora_sd3.py names (``lora_unet_`` + the MMDiT's, ``lora_te1_``/``lora_te2_`` + CLIP-L's/CLIP-G's)
    on every Linear of the checkpoint, one T5 module (T5 is off in the WebUI: skipped, not an error), and a bundled
    embedding for both CLIP encoders (SDXL's form, which SD3 takes too)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    with safe_open(str(ckpt), framework="pt") as f:
        for key in f.keys():
            root = next((r for r in KOHYA_ROOTS if key.startswith(r)), None)
            shape = f.get_slice(key).get_shape()
            if root is None or not key.endswith(".weight") or len(shape) != 2 or "embedding" in key:
                continue
            name = KOHYA_ROOTS[root] + key[len(root):-len(".weight")].replace(".", "_")
            sd[f"{name}.lora_down.weight"] = torch.randn(2, shape[1], generator=g) / shape[1] ** 0.5
            sd[f"{name}.lora_up.weight"] = torch.randn(shape[0], 2, generator=g) * 0.1
            sd[f"{name}.alpha"] = torch.tensor(2.0)
    t5 = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    sd[f"{t5}.lora_down.weight"], sd[f"{t5}.lora_up.weight"] = torch.zeros(2, 4096), torch.zeros(4096, 2)
    sd["bundle_emb.foxtoken.clip_l"] = torch.randn(2, 768, generator=g)
    sd["bundle_emb.foxtoken.clip_g"] = torch.randn(2, 1280, generator=g)
    save(path, sd, {"ss_network_module": "networks.lora_sd3"})


@pytest.fixture(scope="module")
def sd3(server, webui_bed, lora_dir):
    ckpt = tiny_checkpoint(webui_bed, "sd3")
    diffusers_file(ckpt, lora_dir / "sd3_attn.safetensors", ATTENTION, seed=1)
    diffusers_file(ckpt, lora_dir / "sd3_all.safetensors", sd3_models.PEFT_SD3_TARGETS, seed=2)
    kohya_file(ckpt, lora_dir / "sd3_kohya.safetensors", seed=3)
    client = server.ensure("sd3")
    assert client.call("POST", "/sdapi/v1/refresh-loras")[0] == 200
    return client


def no_errors(info: dict) -> None:
    assert "Lora errors" not in info["extra_generation_params"], info["extra_generation_params"]


def test_sd3_checkpoint_is_loaded(sd3):
    images["plain"], info = sd3.txt2img(PROMPT)
    assert info["sd_model_name"] == "tiny-sd3"


def test_diffusers_lora_changes_the_image_and_goes_away(sd3):
    png, info = sd3.txt2img(f"{PROMPT} <lora:sd3_attn:1>")
    no_errors(info)
    assert "sd3_attn: " in info["extra_generation_params"]["Lora hashes"]
    assert abs(pixels(png) - pixels(images["plain"])).max() > 2
    images["sd3_attn"] = png
    assert sd3.txt2img(PROMPT)[0] == images["plain"], "the plain prompt after a LoRA job must give the plain image"


def test_every_layer_in_merge_and_bypass(sd3):
    """diffusers' names for every Linear and the patch conv (q/k/v as thirds of the fused qkv, the final and last
    context norms with their scale/shift halves swapped back); start=0 runs it as a bypass."""
    merged, info = sd3.txt2img(f"{PROMPT} <lora:sd3_all:1>")
    no_errors(info)
    bypass, info = sd3.txt2img(f"{PROMPT} <lora:sd3_all:1:start=0>")
    no_errors(info)
    assert abs(pixels(merged) - pixels(images["plain"])).max() > 2
    assert abs(pixels(bypass) - pixels(merged)).max() <= 2


def test_kohya_names_with_both_clip_text_encoders(sd3):
    full, info = sd3.txt2img(f"{PROMPT} <lora:sd3_kohya:1>")
    no_errors(info)
    text_only, info = sd3.txt2img(f"{PROMPT} <lora:sd3_kohya:1:unet=0>")
    no_errors(info)
    bypass, _ = sd3.txt2img(f"{PROMPT} <lora:sd3_kohya:1:start=0>")
    plain = pixels(images["plain"])
    assert abs(pixels(full) - plain).max() > 2 and abs(pixels(text_only) - plain).max() > 2
    assert abs(pixels(text_only) - pixels(full)).max() > 2
    assert abs(pixels(bypass) - pixels(full)).max() <= 2
    assert sd3.txt2img(PROMPT)[0] == images["plain"]


def test_bundled_embedding_on_sd3(sd3):
    plain, _ = sd3.txt2img(f"{PROMPT} foxtoken")
    png, info = sd3.txt2img(f"{PROMPT} foxtoken <lora:sd3_kohya:0>")
    no_errors(info)
    assert info["extra_generation_params"].get("TI hashes") == "foxtoken: sd3_kohya", info["extra_generation_params"]
    assert abs(pixels(png) - pixels(plain)).max() > 2
    status, card = sd3.call("GET", "/sd_extra_networks/get-single-card?page=textual%20inversion&tabname=txt2img&name=foxtoken")
    assert status == 200 and "foxtoken" in card["html"], card  # the Textual Inversion page lists it meanwhile


def test_cards_and_info_know_sd3(sd3):
    status, info = sd3.call("GET", "/lora/v1/info/sd3_kohya")
    assert status == 200 and info["base_model"] == "sd3", info
    status, card = sd3.call("GET", "/sd_extra_networks/get-single-card?page=lora&tabname=txt2img&name=sd3_attn")
    assert status == 200 and "title='base model: SD3'>SD3</span>" in card["html"], card


def test_sd1_network_on_sd3_is_refused_with_a_message(sd3):
    png, info = sd3.txt2img(f"{PROMPT} <lora:kohya_a:0.5>")
    errors = info["extra_generation_params"].get("Lora errors", "")
    assert "kohya_a" in errors and "SD1" in errors and "SD3" in errors, errors
    assert (pixels(png) == pixels(images["plain"])).all()


def test_builtin_lora_gives_the_same_image(server):
    builtin = server.ensure("builtin", checkpoint="sd3")
    assert builtin.call("POST", "/sdapi/v1/refresh-loras")[0] == 200
    png, info = builtin.txt2img(f"{PROMPT} <lora:sd3_attn:1>")
    assert info["sd_model_name"] == "tiny-sd3"
    assert abs(pixels(png) - pixels(images["sd3_attn"])).max() <= 2
    assert builtin.txt2img(PROMPT)[0] == images["plain"]
