"""The Train LoRA tab in the real WebUI, driven by headless Chromium: a 4-step run on the loaded random SD1.5
checkpoint (64 px, rank 4), cancelled after step 2 and resumed to the end; a txt2img job sent meanwhile waits
for the run and then gives exactly the image it gave before training. The WebUI's progress bar and live preview
(the newest sample) follow the run in the tab; the loss plot answers the mouse. Screenshots in artifacts/."""
from __future__ import annotations

import pathlib
import re
import threading

import pytest
from PIL import Image
from safetensors.torch import load_file

import lib_lora
from conftest import ARTIFACTS, browser_page, cat_dataset, field, fill, open_train_tab, wait_status



@pytest.fixture(scope="module")
def tab(webui):
    with browser_page(webui) as page:
        open_train_tab(page, webui, "network", "optimisation", "output", "samples")
        yield page


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("train_tab")
    cat_dataset(root)
    return root


def test_train_tab_cancel_resume_and_model_restored(webui, tab, dataset, lora_dir):
    plain, _ = webui.txt2img("a cat", seed=3)
    assert field(tab, "output_dir").input_value() == str(lora_dir)  # the first Lora folder
    assert field(tab, "optimizer_type").input_value() == "AdamW" and field(tab, "kind").input_value() == "LoRA"
    field(tab, "preset").click()
    tab.locator("ul.options li", has_text="Style").click()
    tab.wait_for_function("document.querySelector('#sdlora_train_network_dim input').value == '8'")
    assert field(tab, "lr_scheduler").input_value() == "cosine"

    fill(tab, "network_dim", 0)  # a form mistake is refused at once, naming the option
    tab.locator("#sdlora_train_start").click()
    toast = tab.locator(".toast-body", has_text="option network_dim must be at least 1")
    toast.wait_for()
    toast.locator(".toast-close").click()

    out = dataset / "out"
    for name, value in {"train_data_dir": dataset / "img", "resolution": 64, "min_bucket_reso": 64, "network_dim": 4,
                        "network_alpha": 2, "max_train_steps": 4, "train_batch_size": 1, "seed": 1,
                        "output_dir": out, "output_name": "tabcat", "sample_every_n_steps": 2,
                        "sample_prompts": "a cat --w 128 --d 5", "sample_steps": 2}.items():
        fill(tab, name, value)
    tab.locator("#sdlora_train_start").click()
    bar = tab.locator("#sdlora_train_job .progressDiv .progress")
    bar.filter(has_text=re.compile(r"Training tabcat: step 1/4, loss [\d.]+ \d+% ETA: ")).wait_for(timeout=600_000)
    tab.locator("#sdlora_train_start").scroll_into_view_if_needed()
    tab.screenshot(path=str(ARTIFACTS / "train_tab_progress.png"))
    assert re.search(r"epoch 1/1 loss [\d.]+ avg [\d.]+ lr \S+ [\d.]+ it/s ETA", wait_status(tab, r"^steps 1/4"))

    queued = {}
    job = threading.Thread(target=lambda: queued.update(png=webui.txt2img("a cat", seed=3)[0]))
    job.start()
    wait_status(tab, r"^(steps [2-4]/4|\[sampling\])")
    assert job.is_alive(), "a txt2img job ran while the run held the model"
    preview = tab.locator("#sdlora_train_samples .livePreview img").first  # the step 2 sample, 128x64
    preview.wait_for(timeout=600_000)
    assert preview.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [128, 64]
    tab.screenshot(path=str(ARTIFACTS / "train_tab_preview.png"))
    tab.locator("#sdlora_train_cancel").click()
    text = wait_status(tab, "^(Finished|Cancelled)")
    cancelled = re.match(r"Cancelled at step ([23]): saved ", text)
    assert cancelled, text
    step = int(cancelled[1])
    job.join(300)
    assert queued["png"] == plain, "the job queued behind the run saw a changed model"

    partial = out / f"tabcat-step{step:08d}.safetensors"
    state = out / f"tabcat-step{step:08d}-state"
    assert (state / "train_state.json").is_file()
    tab.wait_for_function(f"document.querySelector('#sdlora_train_resume_from textarea').value == {str(state)!r}")
    net = lib_lora.load(str(partial))
    assert net.metadata["ss_network_dim"] == "4" and net.metadata["ss_steps"] == str(step)
    assert {t.part for t in net.modules} == {"unet", "te"}

    tab.locator("#sdlora_train_resume").click()
    text = wait_status(tab, "^Finished")
    assert text.startswith(f"Finished at step 4: saved {out / 'tabcat.safetensors'}"), text
    final = lib_lora.load(str(out / "tabcat.safetensors"))
    assert final.metadata["ss_steps"] == "4" and final.metadata["ss_sd_model_name"] == "random-sd15.safetensors"
    ups = {k: t for k, t in load_file(out / "tabcat.safetensors").items() if k.endswith("lora_up.weight")}
    for part in ("lora_te_", "lora_unet_"):  # zero at the start: gradients reached both through the WebUI's modules
        assert any(t.abs().sum() > 0 for k, t in ups.items() if k.startswith(part)), part
    assert f"resumed from {state} at step {step}" in field(tab, "log").input_value()
    chart = tab.locator("#sdlora_train_plot svg")  # each point names its curve, step and loss when hovered
    chart.wait_for()
    titles = chart.locator("title").all_text_contents()
    assert titles and all(re.fullmatch(r"(training loss \(moving average\)|validation loss), step [1-4]: [\d.e-]+", t) for t in titles), titles
    assert chart.bounding_box()["width"] > 200
    assert tab.locator("#sdlora_train_samples img").count() >= 1  # samples at steps 2 and 4
    samples = sorted(p.name for p in (out / "sample").glob("tabcat_*.png"))
    assert samples == ["tabcat_000002_00.png", "tabcat_000004_00.png"]
    assert Image.open(out / "sample" / samples[0]).size == (128, 64)  # the line's --w, the tab's height

    again, _ = webui.txt2img("a cat", seed=3)
    assert again == plain, "the model is not as it was before training"
    tab.screenshot(path=str(ARTIFACTS / "train_tab.png"), full_page=True)


def test_a_page_opened_after_the_run_shows_it(webui, tab):
    """The tab asks once per page whether there is a run to show; gradio load events would cost every page of the
    WebUI (0.6 s in the browser with a big Lora library), so the tab has none."""
    status, config = webui.call("GET", "/config")
    assert status == 200
    ours = {c["id"] for c in config["components"] if str(c["props"].get("elem_id") or "").startswith("sdlora_")}
    assert not [d for d in config["dependencies"] if d["trigger"] == "load" and ours & set(d["outputs"])]
    open_train_tab(tab, webui)  # the page loaded again
    assert wait_status(tab, "^Finished").startswith("Finished at step 4: saved ")
    assert "resumed from " in field(tab, "log").input_value()
