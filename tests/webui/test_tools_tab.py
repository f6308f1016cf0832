"""The LoRA Tools routes and tab in the real WebUI on the random SD1.5 checkpoint: resize, merge into one
network, merge into a new checkpoint, extract from two checkpoints; each new file is listed and usable at once,
and bad requests answer with a message without writing anything. A tool is a job of the WebUI: its progress
shows in /sdapi/v1/progress and the WebUI's progress bar, and Interrupt or the tab's Cancel stops it with no file
written."""
from __future__ import annotations

import pathlib
import re
import shutil
import threading

import pytest

import lib_lora
import lorafiles
import models
from conftest import ARTIFACTS, browser_page, open_webui_tab, poll


@pytest.fixture(scope="module", autouse=True)
def remove_new_files(webui, lora_dir):
    """Other modules expect the Lora folder as webui_files wrote it."""
    before = set(lora_dir.iterdir())
    yield
    for path in set(lora_dir.iterdir()) - before:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    webui.call("POST", "/sdapi/v1/refresh-loras")


@pytest.fixture(scope="module")
def big_network(webui, lora_dir) -> str:
    """Rank 64 on SD1.5's attention layers (208 modules): resizing it takes long enough to watch and to stop,
    in modest memory (the MLPs would double the deltas the resize holds)."""
    sd15 = models.full_model("sd1", device="meta")
    tensors = lorafiles.attention_lora(sd15, rank=64, seed=9)
    lorafiles.save(lora_dir / "big_r64.safetensors", {k: t for k, t in tensors.items() if "_ff_" not in k
                                                      and "_mlp_" not in k}, {"ss_network_module": "networks.lora"})
    webui.call("POST", "/sdapi/v1/refresh-loras")
    return "big_r64"


def post(webui, route: str, body: dict) -> tuple[int, object]:
    return webui.call("POST", f"/lora/v1/tools/{route}", body)


def listed(webui) -> set[str]:
    return {n["name"] for n in webui.call("GET", "/sdapi/v1/loras")[1]}


def test_resize_and_merge_to_networks(webui, lora_dir):
    status, res = post(webui, "resize", {"name": "kohya_a", "rank": 2, "output": "kohya_a_r2"})
    assert status == 200, res
    assert res["path"] == str(lora_dir / "kohya_a_r2.safetensors") and "rank 2..2" in res["summary"]
    assert "kohya_a_r2" in listed(webui)
    net = lib_lora.load(res["path"])
    assert net.rank == 2 and net.base_model == "sd1" and net.metadata["sshs_model_hash"]
    _, info = webui.txt2img("a cat <lora:kohya_a_r2:0.5>")
    assert "Lora errors" not in info["extra_generation_params"]

    status, res = post(webui, "merge", {"networks": "<lora:kohya_a:0.5> <lora:kohya_b:0.5>", "rank": 8,
                                        "output": "ab_merged"})
    assert status == 200, res
    assert lib_lora.load(res["path"]).metadata["ss_merged_from"].count('"name"') == 2

    status, res = post(webui, "resize", {"name": "kohya_a", "rank": 2, "output": "kohya_a_r2"})
    assert status == 400 and "already exists" in res, res
    status, res = post(webui, "resize", {"name": "kohya_a", "rank": 2, "output": "../escape"})
    assert status == 400 and "not a plain file name" in res, res
    status, res = post(webui, "merge", {"networks": "<lora:kohya_a:1:0.5>", "output": "two_weights"})
    assert status == 400 and "a merge takes one weight per network" in res, res
    status, res = post(webui, "merge", {"networks": "xl_only:1", "output": "wrong_family"})
    assert status == 400 and "made for SDXL" in res, res
    assert not (lora_dir / "wrong_family.safetensors").exists() and not pathlib.Path("escape.safetensors").exists()


def test_merge_into_checkpoint_then_extract(webui, lora_dir):
    status, res = post(webui, "merge", {"networks": "kohya_a:0.8", "into_checkpoint": True, "output": "sd15_kohya_a"})
    assert status == 200, res
    ckpt = pathlib.Path(res["path"])
    assert ckpt.parent.name == "Stable-diffusion" and ckpt.exists()
    try:
        titles = [m["title"] for m in webui.call("GET", "/sdapi/v1/sd-models")[1]]
        assert any(t.startswith("sd15_kohya_a") for t in titles), titles
        status, res = post(webui, "extract", {"base": "random-sd15", "tuned": "sd15_kohya_a", "rank": 8,
                                              "min_diff": 1e-4, "output": "extracted_a"})
        assert status == 200, res
        net = lib_lora.load(res["path"])
        assert {t.part for t in net.modules} == {"unet", "te"} and net.metadata["ss_network_dim"] == "8"
        _, info = webui.txt2img("a cat <lora:extracted_a:0.5>")
        assert "Lora errors" not in info["extra_generation_params"]
    finally:
        ckpt.unlink(missing_ok=True)
        webui.call("POST", "/sdapi/v1/refresh-checkpoints")


def test_tools_tab_resizes(webui, lora_dir):
    with browser_page(webui) as page:
        open_webui_tab(page, webui, "LoRA Tools", "#sdlora_tools_resize_go")
        name = page.locator("#sdlora_tools_resize_name input")
        name.fill("kohya_b")
        name.press("Enter")
        rank = page.locator("#sdlora_tools_resize_rank input")
        rank.fill("3")
        rank.press("Tab")
        out = page.locator("#sdlora_tools_resize_output textarea")
        out.fill("kohya_b_tab")
        out.press("Tab")
        page.locator("#sdlora_tools_resize_go").click()
        page.wait_for_function("document.querySelector('#sdlora_tools_resize_result textarea').value.startsWith('Saved')",
                               timeout=900_000)
        text = page.locator("#sdlora_tools_resize_result textarea").input_value()
        page.screenshot(path=str(ARTIFACTS / "tools_tab.png"), full_page=True)
    assert text.startswith(f"Saved {lora_dir / 'kohya_b_tab.safetensors'}: "), text
    assert lib_lora.load(str(lora_dir / "kohya_b_tab.safetensors")).rank == 3


def test_resize_is_a_webui_job_and_interrupt_writes_nothing(webui, lora_dir, big_network):
    before = sorted(p.name for p in lora_dir.iterdir())
    modules = len(lib_lora.load(str(lora_dir / f"{big_network}.safetensors")).modules)
    answer = {}
    call = threading.Thread(target=lambda: answer.update(
        r=post(webui, "resize", {"name": big_network, "rank": 8, "output": "big_r8"})))
    call.start()
    counts = []

    def watched() -> dict:
        p = webui.call("GET", "/sdapi/v1/progress?skip_current_image=true")[1]
        if p["state"]["job"] == "sdlora_tools_resize":
            counts.append(p["state"]["job_no"])
        return p

    p = poll(watched, lambda p: p["state"]["job"] == "sdlora_tools_resize" and p["state"]["job_no"] >= 3, timeout=300)
    webui.call("POST", "/sdapi/v1/interrupt")
    call.join(600)
    assert p["state"]["job_count"] == modules and re.fullmatch(rf"Resizing {big_network}: \d+/{modules}", p["textinfo"])
    assert counts == sorted(counts) and 0 < p["progress"] < 1 and p["eta_relative"] > 0
    status, res = answer["r"]
    assert status == 200 and res["cancelled"] and res["path"] is None, res
    assert res["message"] == f"Resizing {big_network}: cancelled; nothing was written"
    assert sorted(p.name for p in lora_dir.iterdir()) == before  # no file, no temp file
    state = webui.call("GET", "/sdapi/v1/progress?skip_current_image=true")[1]["state"]
    assert state["job"] == "" and not state["interrupted"]


def test_tools_tab_shows_progress_and_cancels(webui, lora_dir, big_network):
    before = sorted(p.name for p in lora_dir.iterdir())
    with browser_page(webui) as page:
        open_webui_tab(page, webui, "LoRA Tools", "#sdlora_tools_resize_go")
        name = page.locator("#sdlora_tools_resize_name input")
        name.fill(big_network)
        name.press("Enter")
        out = page.locator("#sdlora_tools_resize_output textarea")
        out.fill("big_tab")
        out.press("Tab")
        page.locator("#sdlora_tools_resize_go").click()
        bar = page.locator("#tab_sdlora_tools .progressDiv .progress")
        bar.filter(has_text=re.compile(rf"Resizing {big_network}: [1-9]\d*/\d+ \d+% ETA: ")).wait_for(timeout=300_000)
        page.screenshot(path=str(ARTIFACTS / "tools_tab_progress.png"))
        page.locator("#sdlora_tools_resize_cancel").click()
        cancelled = "document.querySelector('#sdlora_tools_resize_result textarea').value.includes('cancel')"
        page.wait_for_function(cancelled, timeout=300_000)
        text = page.locator("#sdlora_tools_resize_result textarea").input_value()
        bar.wait_for(state="detached")
    assert text == f"Resizing {big_network}: cancelled; nothing was written"
    assert sorted(p.name for p in lora_dir.iterdir()) == before
