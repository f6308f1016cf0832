"""The /lora/v1/train routes in the real WebUI on the random SD1.5 checkpoint (64 px, rank 4): a run started
through the API is a job of the WebUI (its step count grows in /sdapi/v1/progress, its newest sample is the live
preview), a second start while it goes is refused (409), the WebUI's Interrupt stops it leaving a network that
changes images and the model exactly as it was; GET reports the run, /lora/v1/train/cancel cancels one, and
the Train tab opened meanwhile shows it in the WebUI's progress bar."""
from __future__ import annotations

import base64
import io
import re
import shutil

import pytest
from PIL import Image

import lib_lora
from conftest import ARTIFACTS, browser_page, cat_dataset, open_train_tab, poll

STEPS, RESUMED = 50, 20


@pytest.fixture(scope="module")
def config(webui, lora_dir, tmp_path_factory) -> dict:
    """Written into the Lora folder (so prompts find the result), removed afterwards."""
    root = tmp_path_factory.mktemp("train_api")
    (root / "prompts.txt").write_text("a cat --w 128 --s 1 --d 5\n")
    out = lora_dir / "train_api"
    yield {"train_data_dir": str(cat_dataset(root)), "resolution": "64", "min_bucket_reso": 64, "network_dim": 4,
           "network_alpha": 4, "learning_rate": 0.01, "max_train_steps": STEPS, "train_batch_size": 1, "seed": 1,
           "output_dir": str(out), "output_name": "apicat", "sample_prompts": str(root / "prompts.txt"),
           "sample_every_n_steps": 1}
    shutil.rmtree(out, ignore_errors=True)
    webui.call("POST", "/sdapi/v1/refresh-loras")


def run_info(webui) -> dict:
    status, info = webui.call("GET", "/lora/v1/train")
    assert status == 200, info
    return info


def webui_progress(webui) -> dict:
    status, progress = webui.call("GET", "/sdapi/v1/progress")
    assert status == 200, progress
    return progress


def finished(webui) -> dict:
    info = poll(lambda: run_info(webui), lambda i: i["state"] not in ("waiting", "starting", "running", "cancelling"))
    assert info["state"] != "failed", info
    return info


@pytest.fixture(scope="module")
def interrupted_run(webui, config) -> dict:
    """A run started through the API and stopped by the WebUI's Interrupt after its second step."""
    plain, _ = webui.txt2img("a cat", seed=3)
    status, started = webui.call("POST", "/lora/v1/train", config)
    assert status == 200, started
    assert started["state"] in ("waiting", "starting") and started["task_id"].startswith("task(")
    status, refused = webui.call("POST", "/lora/v1/train", config)
    assert status == 409 and "already going" in refused, refused

    counts = []

    def watched() -> dict:
        p = webui_progress(webui)
        if p["state"]["job"] == "sdlora_train":
            counts.append(p["state"]["job_no"])
        return p

    p = poll(watched, lambda p: p["state"]["job_no"] >= 2 and p["state"]["job"] == "sdlora_train"
             and p["current_image"] is not None)
    info = run_info(webui)
    webui.call("POST", "/sdapi/v1/interrupt")
    return {"plain": plain, "counts": counts, "progress": p, "running": info, "done": finished(webui)}


def test_run_is_a_webui_job(interrupted_run):
    counts, p, info = interrupted_run["counts"], interrupted_run["progress"], interrupted_run["running"]
    assert counts == sorted(counts) and {0, 1, 2} <= set(counts), counts  # the step count grew
    assert p["state"]["job_count"] == STEPS and p["eta_relative"] > 0
    assert p["textinfo"].startswith("Training apicat: ")
    preview = Image.open(io.BytesIO(base64.b64decode(p["current_image"])))
    assert preview.size == (128, 64)  # the newest sample (--w 128)
    assert info["state"] == "running" and info["step"] >= 2 and info["total_steps"] == STEPS
    assert info["loss"] > 0 and info["avg_loss"] > 0 and info["eta_s"] > 0 and info["it_per_s"] > 0
    assert info["name"] == "apicat" and info["phase"] in ("training", "sampling")
    assert info["status"].startswith(f"steps {info['step']}/{STEPS}" if info["phase"] == "training" else "[sampling]")


def test_interrupt_stops_the_run_with_a_usable_network(webui, interrupted_run, config):
    done = interrupted_run["done"]
    step = done["step"]
    assert done["state"] == "cancelled" and 2 <= step < STEPS, done
    out = f"{config['output_dir']}/apicat-step{step:08d}.safetensors"
    assert done["output"] == out and done["saved"] == [out] and done["resume_from"].endswith("-state")
    assert done["status"].startswith(f"Cancelled at step {step}: saved {out}")
    state = webui_progress(webui)["state"]
    assert state["job"] == "" and not state["interrupted"]  # the WebUI's job state is back to idle
    assert lib_lora.load(out).metadata["ss_steps"] == str(step)
    with_lora, info = webui.txt2img(f"a cat <lora:apicat-step{step:08d}:1>", seed=3)
    assert "Lora errors" not in info["extra_generation_params"] and info["extra_generation_params"]["Lora hashes"]
    assert with_lora != interrupted_run["plain"], "the trained network did not change the image"
    again, _ = webui.txt2img("a cat", seed=3)
    assert again == interrupted_run["plain"], "the model is not as it was before training"


def test_cancel_route_stops_a_resumed_run(webui, interrupted_run, config):
    first = interrupted_run["done"]["step"]
    body = dict(config, resume=interrupted_run["done"]["resume_from"], max_train_steps=first + RESUMED,
                sample_every_n_steps=None)
    status, started = webui.call("POST", "/lora/v1/train", body)
    assert status == 200, started
    p = poll(lambda: webui_progress(webui), lambda p: p["state"]["job_no"] >= 1 and p["state"]["job"] == "sdlora_train")
    assert p["state"]["job_count"] == RESUMED  # the WebUI's bar counts this session's steps
    assert p["textinfo"].startswith(f"Training apicat: step {first + 1}/{first + RESUMED}, loss ")
    with browser_page(webui) as page:  # a page opened during a run started elsewhere follows it
        open_train_tab(page, webui)
        bar = page.locator("#sdlora_train_job .progressDiv .progress")
        bar.filter(has_text=re.compile(r"Training apicat: step \d+/")).wait_for(timeout=300_000)
        page.screenshot(path=str(ARTIFACTS / "train_tab_api_run.png"))
    status, info = webui.call("POST", "/lora/v1/train/cancel")
    assert status == 200 and info["state"] in ("cancelling", "cancelled"), info
    done = finished(webui)
    assert done["state"] == "cancelled" and first < done["step"] < first + RESUMED, done
    assert done["output"].endswith(f"apicat-step{done['step']:08d}.safetensors")
    assert f"resumed from {interrupted_run['done']['resume_from']} at step {first}" in "\n".join(done["log"])
    status, info = webui.call("POST", "/lora/v1/train/cancel")  # nothing going: the last run, unchanged
    assert status == 200 and info["state"] == "cancelled" and info["step"] == done["step"]
    status, refused = webui.call("POST", "/lora/v1/train", dict(config, network_dim=0))
    assert status == 400 and "network_dim must be at least 1" in refused, refused
