"""``python -m lib_lora.train --pretrained_model_name_or_path FILE`` with no model factory: the WebUI's Python
builds the model from the checkpoint with the WebUI's ldm/sgm code (``--webui``), offline, and trains.

Checkpoints: tiny_checkpoints.py's SD1, SD2 768-v and SDXL files (real classes, random weights; a .yaml beside
each, as the WebUI reads it) and the bed's full-size SD1.5 (no .yaml: the WebUI's v1-inference config).
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import lib_lora
from conftest import ROOT, tiny_checkpoint

FAMILIES = {"sd1": ("sd1", "sd_v1", "epsilon"), "sd2v": ("sd2", "sd_v2_v", "v"), "sdxl": ("sdxl", "sdxl_base_v1-0", "epsilon")}


def images(folder: pathlib.Path) -> pathlib.Path:
    sub = folder / "4_cat"
    sub.mkdir(parents=True, exist_ok=True)
    for n, size in enumerate([(64, 64), (64, 96), (96, 64)]):
        im = Image.new("RGB", size, (240, 240, 240))
        ImageDraw.Draw(im).ellipse([8, 8, size[0] - 8, size[1] - 8], fill=(70 * n % 255, 180, 40 * n))
        im.save(sub / f"img{n}.png")
        (sub / f"img{n}.txt").write_text(f"cat, round, color{n}")
    return folder


def train(bed: str, ckpt: pathlib.Path, data: pathlib.Path, out: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HOME=str(pathlib.Path(bed, "hf-home")), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="2")
    cmd = [str(pathlib.Path(bed, "venv", "bin", "python")), "-m", "lib_lora.train", "--pretrained_model_name_or_path",
           str(ckpt), "--webui", str(pathlib.Path(bed, "webui")), "--train_data_dir", str(data), "--resolution", "64",
           "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--output_dir", str(out), "--output_name", "net",
           "--seed", "3", "--learning_rate", "1e-2", "--no-save_state", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_cli_trains_from_a_tiny_checkpoint_path_alone(webui_bed, tmp_path, kind):
    ckpt = tiny_checkpoint(webui_bed, kind)
    family, version, prediction = FAMILIES[kind]
    flags = ["--max_train_steps", "2", "--sdpa"] + (["--clip_skip", "2"] if kind == "sd1" else [])
    run = train(webui_bed, ckpt, images(tmp_path / "img"), tmp_path / "out", *flags)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "attention: sdpa in" in run.stderr and "finished at step 2" in run.stdout
    net = lib_lora.load(str(tmp_path / "out" / "net.safetensors"))
    assert net.base_model == family and not net.unmatched and net.modules
    md = net.metadata
    assert (md["ss_base_model_version"], md["modelspec.prediction_type"]) == (version, prediction)
    assert md["ss_sd_model_name"] == ckpt.name and md["ss_v2"] == str(family == "sd2")
    assert md["ss_clip_skip"] == ("2" if kind == "sd1" else "None")
    tensors = load_file(net.path)
    if family == "sdxl":
        assert any(k.startswith("lora_te2_") for k in tensors) and any(k.startswith("lora_te1_") for k in tensors)
    moved = max(float(t.abs().max()) for k, t in tensors.items() if "lora_up" in k)
    assert moved > 0, "training changed nothing"


def test_cli_reads_a_ckpt_through_the_weights_only_unpickler(webui_bed, tmp_path):
    source = tiny_checkpoint(webui_bed, "sd1")
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(source))}, str(ckpt))
    shutil.copy(source.with_suffix(".yaml"), tmp_path / "tiny.yaml")
    run = train(webui_bed, ckpt, images(tmp_path / "img"), tmp_path / "out", "--max_train_steps", "1",
                "--network_train_unet_only")
    assert run.returncode == 0, run.stderr[-4000:]
    assert lib_lora.load(str(tmp_path / "out" / "net.safetensors")).base_model == "sd1"
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a pickle")
    run = train(webui_bed, bad, tmp_path / "img", tmp_path / "out2", "--max_train_steps", "1")
    assert run.returncode == 2 and "bad.ckpt: " in run.stderr  # torch's reason differs between versions
    assert "not a readable torch file" in run.stderr or "refused to unpickle" in run.stderr


def test_cli_trains_the_full_size_sd15_with_the_webuis_own_config(webui_bed, tmp_path):
    """No .yaml beside random-sd15.safetensors: the model comes from the WebUI's configs/v1-inference.yaml and
    CLIP-L's tokenizer from the (offline) Hugging Face cache."""
    ckpt = pathlib.Path(webui_bed, "webui", "models", "Stable-diffusion", "random-sd15.safetensors")
    run = train(webui_bed, ckpt, images(tmp_path / "img"), tmp_path / "out", "--max_train_steps", "1",
                "--network_dim", "2", "--network_train_unet_only", "--sdpa")
    assert run.returncode == 0, run.stderr[-4000:]
    assert "v1-inference.yaml" in run.stderr
    net = lib_lora.load(str(tmp_path / "out" / "net.safetensors"))
    assert net.base_model == "sd1" and len(net.modules) == 192 and net.rank == 2
