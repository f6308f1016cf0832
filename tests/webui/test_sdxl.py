"""SDXL in the real WebUI: tests/webui/tiny_checkpoints.py's random-weight SDXL checkpoint (sgm's classes, SDXL's key
names, small widths) loaded by the WebUI itself. The Train LoRA tab trains both text encoders (the second
one's nn.MultiheadAttention included) and the UNet; the file it writes then works in a prompt, and an SD1
network is refused with a message while the image is still made."""
from __future__ import annotations

import pathlib

import pytest
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import lib_lora
from conftest import ARTIFACTS, browser_page, fill, open_train_tab, pixels, wait_status


@pytest.fixture(scope="module")
def xl(server):
    return server.ensure("sdxl")


@pytest.fixture(scope="module")
def xl_dataset(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("sdxl_train")
    folder = root / "img" / "2_dog"
    folder.mkdir(parents=True)
    for n, size in enumerate([(64, 64), (64, 128)]):
        im = Image.new("RGB", size, (240, 240, 240))
        ImageDraw.Draw(im).rectangle([8, 8, size[0] - 8, size[1] - 8], fill=(200, 60 + 120 * n, 40))
        im.save(folder / f"img{n}.png")
        (folder / f"img{n}.txt").write_text(f"dog, color{n}" + ", red fur, blue sky" * 30 * n)  # img1: > 150 tokens
    return root


def test_sdxl_checkpoint_is_loaded(xl):
    _, info = xl.txt2img("a dog")
    assert info["sd_model_name"] == "tiny-sdxl"


def test_train_tab_on_sdxl_then_use_the_file(xl, xl_dataset, lora_dir):
    plain, _ = xl.txt2img("a dog", seed=5)
    with browser_page(xl) as tab:
        open_train_tab(tab, xl, "network", "optimisation", "output")
        out = lora_dir / "xl"
        for name, value in {"train_data_dir": xl_dataset / "img", "resolution": 64, "min_bucket_reso": 64,
                            "max_bucket_reso": 128, "network_dim": 4, "network_alpha": 4, "learning_rate": 0.01,
                            "max_train_steps": 3, "train_batch_size": 1, "seed": 2, "output_dir": out,
                            "output_name": "xldog", "max_token_length": 150}.items():
            fill(tab, name, value)
        tab.locator("#sdlora_train_start").click()
        text = wait_status(tab, "^Finished")
        assert text.startswith(f"Finished at step 3: saved {out / 'xldog.safetensors'}"), text
        tab.screenshot(path=str(ARTIFACTS / "train_tab_sdxl.png"), full_page=True)
    path = out / "xldog.safetensors"
    net = lib_lora.load(str(path))
    md = net.metadata
    assert net.base_model == "sdxl" and md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert md["ss_max_token_length"] == "150"  # the long caption went through in two 75-token chunks
    assert md["ss_sd_model_name"] == "tiny-sdxl.safetensors" and md["modelspec.architecture"].startswith(
        "stable-diffusion-xl-v1-base")
    ups = {k: t for k, t in load_file(path).items() if k.endswith("lora_up.weight")}
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in ups
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight" in ups
    for part in ("lora_te1_", "lora_te2_", "lora_unet_"):  # zero at the start: gradients reached all three
        assert any(t.abs().sum() > 0 for k, t in ups.items() if k.startswith(part)), part

    assert xl.call("POST", "/sdapi/v1/refresh-loras")[0] == 200
    with_lora, info = xl.txt2img("a dog <lora:xldog:1>", seed=5)
    assert "Lora errors" not in info["extra_generation_params"], info["extra_generation_params"]
    assert "xldog: " in info["extra_generation_params"].get("Lora hashes", "")
    assert with_lora != plain
    assert xl.txt2img("a dog", seed=5)[0] == plain, "the plain prompt after a LoRA job must give the plain image"


def test_sd1_network_on_sdxl_is_refused_with_a_message(xl):
    plain, _ = xl.txt2img("a dog", seed=6)
    png, info = xl.txt2img("a dog <lora:kohya_a:0.5>", seed=6)
    errors = info["extra_generation_params"].get("Lora errors", "")
    assert "kohya_a" in errors and "SD1" in errors and "SDXL" in errors, errors
    assert (pixels(png) == pixels(plain)).all()  # the prompt differs, so compare pixels, not PNG bytes


def test_checkpoint_switch_between_sd15_and_sdxl_with_networks(xl):
    """A network merged into one checkpoint, then a job on the other (the WebUI swaps models), then back:
    each checkpoint's plain image is what it was, and networks of the right family apply on each."""
    sd15 = {"override_settings": {"sd_model_checkpoint": "random-sd15"}, "override_settings_restore_afterwards": False}
    xl_plain, _ = xl.txt2img("a dog", seed=7)
    xl.txt2img("a dog <lora:xldog:1>", seed=7)
    sd_plain, info = xl.txt2img("a cat", seed=7, **sd15)
    assert info["sd_model_name"] == "random-sd15"
    png, info = xl.txt2img("a cat <lora:kohya_a:0.5>", seed=7, **sd15)
    assert "Lora errors" not in info["extra_generation_params"] and not (pixels(png) == pixels(sd_plain)).all()
    back = {"override_settings": {"sd_model_checkpoint": "tiny-sdxl"}, "override_settings_restore_afterwards": False}
    again, info = xl.txt2img("a dog", seed=7, **back)
    assert info["sd_model_name"] == "tiny-sdxl" and again == xl_plain
    assert xl.txt2img("a cat", seed=7, **sd15)[0] == sd_plain
    xl.txt2img("a dog", seed=7, **back)


def test_sdxl_bypass_equals_merge(xl):
    """start=0 runs the network in bypass (hooks; the second text encoder's nn.MultiheadAttention through
    lib_lora/mha.py) and gives the merged image."""
    merged, _ = xl.txt2img("a dog <lora:xldog:1>", seed=8)
    bypass, info = xl.txt2img("a dog <lora:xldog:1:start=0>", seed=8)
    assert "Lora errors" not in info["extra_generation_params"]
    plain, _ = xl.txt2img("a dog", seed=8)
    assert abs(pixels(bypass) - pixels(merged)).max() <= 2 and abs(pixels(merged) - pixels(plain)).max() > 2
