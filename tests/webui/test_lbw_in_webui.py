"""sd-webui-lora-block-weight (LBW) next to ours: its prompts change the image exactly once, as LBW alone on the
built-in Lora does; its presets (files, UI/API arguments) are ours; our X/Y/Z plot axes give the images of the
single generations they stand for."""
from __future__ import annotations

import base64
import json
import os
import pathlib
import shutil
import subprocess

import pytest

from conftest import pixels

LBW_ENV = "SDLORA_LBW"
LBW_DEFAULT = "/work/.mirror/hako-mikan+sd-webui-lora-block-weight/repo"
NOTE = "applied by sd-webui-lora; sd-webui-lora-block-weight is installed"
OUTS = "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1"
MINE = "1,0,0,0,1,0.5,0,0,0,0,0,0,0,0,0,0.5,1"
HIRES = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 1,
         "denoising_strength": 0.6, "hr_prompt": "a cat <lora:kohya_a:1>"}


@pytest.fixture(scope="module")
def lbw_dir(tmp_path_factory):
    """A copy of LBW (it writes its presets files into its own folder): a checkout, or a bare fetched snapshot."""
    src = pathlib.Path(os.environ.get(LBW_ENV, LBW_DEFAULT))
    out = tmp_path_factory.mktemp("lbw") / "sd-webui-lora-block-weight"
    if (src / "scripts" / "lora_block_weight.py").is_file():
        shutil.copytree(src, out, ignore=shutil.ignore_patterns(".git"))
    elif (src / "HEAD").is_file():
        out.mkdir()
        archive = subprocess.run(["git", "--git-dir", str(src), "archive", "HEAD"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    else:
        pytest.skip(f"no sd-webui-lora-block-weight at {src} (set {LBW_ENV} to a checkout of it)")
    (out / "scripts" / "lbwpresets.txt").write_text(f"OUTS:{OUTS}\nLBWFILE:{MINE}\n", encoding="utf8")
    return out


STEPS = {"steps": 1}  # the comparisons need no more; the bed's CPU is shared


def image(client, prompt: str, **kw):
    return pixels(client.txt2img(prompt, **STEPS, **kw)[0])


def single(client, prompt: str) -> bytes:
    return client.txt2img(prompt, **STEPS)[0]


def lbw_args(presets: str) -> dict:
    """LBW's documented API form for presets of one's own (its first argument; the rest as its UI defaults)."""
    return {"alwayson_scripts": {"LoRA Block Weight": {"args": [presets, True, 0]}}}


def lbw_xyz_grid(client):
    """LBW's own XYZ plot script, as its README's API example runs it: X values × Y blocks on lbw=XYZ."""
    args = [f"XYZ:{','.join(['1'] * 17)}", True, 1, "values", "0,1", "Block ID", "OUT03-OUT11,BASE", "none", "",
            "", "", 1, "black", "20", False, "", False, False]  # a selected script gets exactly these arguments
    body = {"prompt": "a cat <lora:kohya_b:1:lbw=XYZ>", "steps": 1, "width": 64, "height": 64, "seed": 1,
            "sampler_name": "Euler", "cfg_scale": 7, "save_images": False, "script_name": "LoRA Block Weight",
            "script_args": args}
    status, res = client.call("POST", "/sdapi/v1/txt2img", body)
    assert status == 200, res
    return pixels(base64.b64decode(res["images"][0]))


@pytest.fixture(scope="module")
def images(server, lbw_dir, lora_dir):
    server.extensions["lbw"] = f"sd-webui-lora-block-weight={lbw_dir}"
    (lora_dir / "lbwpresets.txt").write_text(f"MINE:{MINE}\n", encoding="utf8")
    out = {}
    try:
        for config in ("ours+lbw", "both+lbw", "builtin+lbw", "ours"):  # "ours" last: the plots below reuse it
            client = server.ensure(config)
            got = out[config] = {
                "outs": image(client, "a cat <lora:kohya_b:1:lbw=OUTS>"),
                "mine": image(client, f"a cat <lora:kohya_b:1:lbw={MINE}>"),
            }
            if config in ("ours", "builtin+lbw"):
                got["plain"] = image(client, "a cat")
                got["full"] = image(client, "a cat <lora:kohya_b:1>")
            if config != "builtin+lbw":
                got["positional"] = image(client, "a cat <lora:kohya_b:1:OUTS>")
                got["own file"] = image(client, "a cat <lora:kohya_b:1:lbw=MINE>")
            if config in ("ours", "ours+lbw"):  # LBW switches extra networks off there: the hires pass needs ours
                got["hires"] = image(client, "a cat <lora:kohya_b:1>", **HIRES)
            if "lbw" in config:
                got["lbw file"] = image(client, "a cat <lora:kohya_b:1:lbw=LBWFILE>")
                got["lbw api"] = image(client, "a cat <lora:kohya_b:1:lbw=API>", **lbw_args(f"API:{MINE}"))
            if config in ("both+lbw", "builtin+lbw"):
                got["lbw xyz"] = lbw_xyz_grid(client)
            got["log"] = client.log()
    finally:
        (lora_dir / "lbwpresets.txt").unlink()
    return out


def same(a, b) -> bool:
    return a.shape == b.shape and (a == b).all()


def test_block_weights_change_the_image(images):
    ours = images["ours"]
    assert not same(ours["outs"], ours["plain"]) and not same(ours["outs"], ours["full"])
    assert same(ours["positional"], ours["outs"])
    assert same(ours["own file"], ours["mine"])


@pytest.mark.parametrize("config", ["ours+lbw", "both+lbw"])
def test_with_lbw_installed_applied_exactly_once(images, config):
    """LBW's hook acts on the built-in's loaded networks, which stay empty: the image is ours alone, and the user is
    told which of the two applies block weights."""
    ours, both = images["ours"], images[config]
    for key in ("outs", "mine", "positional", "own file", "hires"):
        assert key not in both or same(both[key], ours[key]), key
    assert same(both["lbw file"], ours["mine"]) and same(both["lbw api"], ours["mine"])
    assert NOTE in both["log"] and NOTE not in ours["log"]


def test_lbws_own_xyz_plot_runs_through_ours(images):
    """With the built-in Lora enabled LBW's XYZ plot script runs; its vectors reach our networks in every cell."""
    ours, lbw = images["both+lbw"]["lbw xyz"], images["builtin+lbw"]["lbw xyz"]
    assert ours.shape == lbw.shape and ours.shape[0] > 2 * 64 and ours.shape[1] > 2 * 64
    assert abs(ours - lbw).max() <= 2


def test_lbw_alone_on_the_builtin_gives_our_image(images):
    lbw, ours = images["builtin+lbw"], images["ours"]
    assert "LoRA Block weight (lora): kohya_b" in lbw["log"], "LBW did not apply the block weights itself"
    for key in ("plain", "full", "outs", "mine", "lbw file", "lbw api"):
        want = ours["mine"] if key in ("lbw file", "lbw api") else ours[key]
        assert abs(lbw[key] - want).max() <= 2, key
    assert abs(lbw["outs"] - lbw["full"]).max() > 2


# ---- X/Y/Z plot axes (ours alone) -----------------------------------------------------------------------------
def xyz_plot(client, prompt: str, x: tuple, y: tuple = ("Nothing", "", [])) -> list[bytes]:
    """The cells of an X/Y/Z plot (a label and its values, or for an axis with choices its dropdown list)."""
    status, info = client.call("GET", "/sdapi/v1/script-info")
    assert status == 200, info
    plot = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    labels = plot["args"][0]["choices"]
    args = [labels.index(x[0]), x[1], x[2], labels.index(y[0]), y[1], y[2], 0, "", [],
            True, True, False, False, False, False, False, 0, False]
    body = {"prompt": prompt, "steps": 1, "width": 64, "height": 64, "seed": 1, "sampler_name": "Euler",
            "cfg_scale": 7, "save_images": False, "script_name": "x/y/z plot", "script_args": args}
    status, res = client.call("POST", "/sdapi/v1/txt2img", body)
    assert status == 200, res
    cells = [base64.b64decode(i) for i in res["images"][1:]]
    assert len(json.loads(res["info"])["infotexts"]) == len(cells) + 1
    return cells


def test_weight_axis_gives_the_single_generations(webui):
    cells = xyz_plot(webui, "a cat <lora:kohya_b:1:lbw=OUTS>", ("LoRA weight", "0.5, 1", []))
    assert cells == [single(webui, f"a cat <lora:kohya_b:{w}:lbw=OUTS>") for w in ("0.5", "1")]
    assert not same(pixels(cells[0]), pixels(cells[1]))


def test_block_weight_preset_axis_gives_the_single_generations(webui):
    cells = xyz_plot(webui, "a cat <lora:kohya_b:0.8>", ("LoRA block weights", "", ["OUTS", "NONE"]))
    assert cells == [single(webui, f"a cat <lora:kohya_b:0.8:lbw={p}>") for p in ("OUTS", "NONE")]
    assert same(pixels(cells[1]), pixels(single(webui, "a cat")))  # the PNGs differ in their infotexts


def test_lbw_xyz_axes_give_lbws_vectors(webui):
    """LBW's XYZ plot: the blocks of the Y axis set to the X axis's value, on the 17 ones of an unset XYZ."""
    cells = xyz_plot(webui, "a cat <lora:kohya_b:1:lbw=XYZ>", ("LBW XYZ: values", "0,1", []),
                     ("LBW XYZ: Block ID", "OUT03-OUT11", []))
    zero = ",".join(["1"] * 8 + ["0"] * 9)
    assert cells[0] == single(webui, f"a cat <lora:kohya_b:1:lbw={zero}>")
    assert cells[1] == single(webui, f"a cat <lora:kohya_b:1:lbw={','.join(['1'] * 17)}>")
