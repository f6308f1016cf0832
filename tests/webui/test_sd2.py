"""SD2 (768-v, v-prediction) in the real WebUI: tests/webui/tiny_checkpoints.py's random SD2 checkpoint (ldm's
classes, open_clip text encoder with nn.MultiheadAttention) loaded by the WebUI itself. A kohya LoRA on every
layer (the text encoder's q/k/v inside MultiheadAttention included) applies, restores, and gives the same
image in bypass; the Train LoRA tab trains a v-prediction network whose file says so."""
from __future__ import annotations

import pathlib

import pytest
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import lib_lora
import lorafiles
from conftest import browser_page, fill, open_train_tab, pixels, tiny_checkpoint, wait_status
from lib_lora.tools import as_modules, read_checkpoint


@pytest.fixture(scope="module")
def sd2(server, lora_dir):
    client = server.ensure("sd2v")
    tree = as_modules(read_checkpoint(str(tiny_checkpoint(server.bed, "sd2v")))[0])
    path = lora_dir / "sd2_everywhere.safetensors"
    lorafiles.save(path, lorafiles.random_kohya_lora(tree, rank=4, seed=3, scale=0.05), {})
    assert client.call("POST", "/sdapi/v1/refresh-loras")[0] == 200
    yield client
    path.unlink()
    client.call("POST", "/sdapi/v1/refresh-loras")


def test_sd2_checkpoint_is_loaded_as_sd2_v(sd2):
    _, info = sd2.txt2img("a fox")
    assert info["sd_model_name"] == "tiny-sd2v"


def test_lora_on_every_sd2_layer_applies_restores_and_bypasses(sd2):
    net = lib_lora.load(str(pathlib.Path(sd2.call("GET", "/lora/v1/info/sd2_everywhere")[1]["file"])))
    assert net.base_model == "sd2" and any(t.sub == "q" for t in net.modules)  # MultiheadAttention's q/k/v
    plain, _ = sd2.txt2img("a fox", seed=4)
    merged, info = sd2.txt2img("a fox <lora:sd2_everywhere:1>", seed=4)
    assert "Lora errors" not in info["extra_generation_params"], info["extra_generation_params"]
    assert "sd2_everywhere: " in info["extra_generation_params"]["Lora hashes"]
    bypass, _ = sd2.txt2img("a fox <lora:sd2_everywhere:1:start=0>", seed=4)
    assert abs(pixels(merged) - pixels(plain)).max() > 2
    assert abs(pixels(bypass) - pixels(merged)).max() <= 2, "bypass and merge give the same image"
    assert sd2.txt2img("a fox", seed=4)[0] == plain, "the plain prompt after LoRA jobs must give the plain image"


def test_train_tab_on_sd2_v(sd2, lora_dir, tmp_path):
    folder = tmp_path / "img" / "3_fox"
    folder.mkdir(parents=True)
    for n in range(2):
        im = Image.new("RGB", (64, 64), (230, 230, 230))
        ImageDraw.Draw(im).polygon([(8, 56), (32, 8), (56, 56)], fill=(220, 90 + 100 * n, 30))
        im.save(folder / f"fox{n}.png")
        (folder / f"fox{n}.txt").write_text(f"fox, shade{n}")
    out = tmp_path / "out"
    with browser_page(sd2) as tab:
        open_train_tab(tab, sd2, "network", "optimisation", "output")
        for name, value in {"train_data_dir": folder.parent, "resolution": 64, "min_bucket_reso": 64,
                            "network_dim": 4, "network_alpha": 4, "learning_rate": 0.01, "max_train_steps": 2,
                            "seed": 3, "output_dir": out, "output_name": "fox", "min_snr_gamma": 5}.items():
            fill(tab, name, value)
        tab.locator("#sdlora_train_start").click()
        text = wait_status(tab, "^Finished")
    assert text.startswith(f"Finished at step 2: saved {out / 'fox.safetensors'}"), text
    net = lib_lora.load(str(out / "fox.safetensors"))
    md = net.metadata
    assert (net.base_model, md["ss_v2"], md["ss_base_model_version"], md["modelspec.prediction_type"]) == (
        "sd2", "True", "sd_v2_v", "v")
    ups = {k: t for k, t in load_file(out / "fox.safetensors").items() if k.endswith("lora_up.weight")}
    q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"
    assert q in ups and ups[q].abs().sum() > 0, "the open_clip attention's q projection trained"
