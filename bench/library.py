#!/usr/bin/env python
"""A big Lora library in the real WebUI (the test bed's A1111 v1.10.1): 2,000 generated network files (a quarter in
subfolders, a third with kohya's ss_tag_frequency; each a real 264-module SD1.5 kohya header, rank 1 to keep the
disk small), for this extension and for the built-in Lora alone, in the same run:

* start-up: the WebUI's own start-up timer (``/internal/profile-startup``) and the time start.sh waits, on a cold
  start (new files: no cache knows them) and a warm one (a restart);
* ``GET /sdapi/v1/loras`` and ``POST /sdapi/v1/refresh-loras``;
* the Lora page in headless Chromium: from loading the page until all cards are in the Lora tab and shown, and a
  search (typing a file name into the tab's search box until only its card is left; the median of 5), on the first
  load after a start (the WebUI makes the cards) and on later loads (it serves the HTML it made);
* the first generation with one of the files (bench/webui_probe times the job).

gradio 3.41 refuses to serve any file under a folder whose name starts with a dot (the bed lives in ~/.cache): the
browser gets the WebUI's own JS and CSS (and ours) from the bed's tree instead, as the WebUI tests do.

Prints each figure and ours / built-in; the goal is every ratio ≤ 1. The machine may be shared: the two
configurations alternate, and the ratios of one run are what count.

Run (the test venv: it has playwright):
    WEBUI_TESTBED=~/.cache/sd-webui-testbed ~/.cache/sd-webui-lora/venv/bin/python bench/library.py [--files 2000]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench"), str(ROOT / "tests" / "webui")]

import torch  # noqa: E402

from machine import cpu_model, loadavg  # noqa: E402
from webui import CONFIGS, bed, call, log, start, stop  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CARDS = "#txt2img_lora_cards_html .card"  # the Lora tab's cards in txt2img
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def write_library(folder: pathlib.Path, count: int) -> list[str]:
    """``count`` files: names ``style_0000``...; every fourth in one of 10 subfolders; every third with training
    tags. Each file's data differs (so every file has its own hash)."""
    import lorafiles
    import models
    from safetensors.torch import save_file

    template = {k: v.half() for k, v in lorafiles.attention_lora(models.full_model("sd1", device="meta"), rank=1,
                                                                  seed=0).items()}
    first = next(k for k in template if k.endswith("lora_up.weight"))
    rng = random.Random(0)
    words = [f"tag{i}" for i in range(400)]
    names = []
    for i in range(count):
        sub = folder / f"sub{i % 10}" if i % 4 == 3 else folder
        sub.mkdir(exist_ok=True)
        name = f"style_{i:04d}"
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": "1", "ss_network_alpha": "1",
                "ss_base_model_version": "sd_v1", "ss_output_name": name}
        if i % 3 == 0:
            meta["ss_tag_frequency"] = json.dumps({"10_style": {w: rng.randint(1, 50) for w in rng.sample(words, 120)}})
        tensors = dict(template)
        tensors[first] = torch.full_like(template[first], i / count)
        save_file(tensors, str(sub / f"{name}.safetensors"), meta)
        names.append(name)
    return names


def browse(url: str, count: int, searches: list[str], loads: int) -> list[tuple[float, float]]:
    """Per page load (``loads`` of them, each in a new browser page; the WebUI renders the cards on the first and
    serves that HTML to later ones): seconds from loading the page until ``count`` Lora cards are there and the tab
    shows them, and the median over ``searches`` of the seconds from typing a name into the tab's search box until
    only its card is left visible."""
    from playwright.sync_api import sync_playwright
    out = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            serve_static = webui_tests_conftest()._serve_static
            webui_dir = pathlib.Path(bed(), "webui")
            for _ in range(loads):
                page = browser.new_page(viewport={"width": 1500, "height": 1100})
                page.set_default_timeout(1_800_000)
                page.route("**/file=**", lambda route: serve_static(route, webui_dir))
                t0 = time.perf_counter()
                page.goto(url)
                page.wait_for_selector("#txt2img_prompt textarea")
                page.locator("#txt2img_extra_tabs > div > button", has_text="Lora").click()
                page.wait_for_function(f"document.querySelectorAll('{CARDS}').length >= {count}", polling=100)
                page.locator(CARDS).first.wait_for(state="visible")
                shown = time.perf_counter() - t0
                box = page.locator("#txt2img_extra_tabs .extra-networks-controls-div #txt2img_lora_extra_search")
                found = []
                for term in searches:
                    t0 = time.perf_counter()
                    box.fill(term)
                    page.wait_for_function(f"document.querySelectorAll('{CARDS}:not(.hidden)').length == 1", polling=20)
                    found.append(time.perf_counter() - t0)
                    box.fill("")
                    page.wait_for_function(f"document.querySelectorAll('{CARDS}:not(.hidden)').length >= {count}",
                                           polling=20)
                out.append((shown, statistics.median(found)))
                page.close()
        finally:
            browser.close()
    return out


def webui_tests_conftest():
    """tests/webui/conftest.py (by path: tests/conftest.py has the same module name)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("webui_tests_conftest", ROOT / "tests" / "webui" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def startup(url: str) -> float:
    return float(call(url, "GET", "/internal/profile-startup")["total"])


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(config: str, lora_dir: str, names: list[str], results: dict, threads: int | None,
            page_loads: int) -> None:
    for start_kind in ("cold", "warm"):
        t0 = time.perf_counter()
        url = start(config, lora_dir, threads)
        results.setdefault(f"start-up, {start_kind}: WebUI timer", []).append(startup(url))
        results.setdefault(f"start-up, {start_kind}: start.sh until ready", []).append(time.perf_counter() - t0)
        if start_kind == "cold":
            stop()
    listed = []
    results.setdefault("GET /sdapi/v1/loras", []).append(timed(lambda: listed.extend(call(url, "GET", "/sdapi/v1/loras"))))
    assert len(listed) == len(names), (config, len(listed))
    results.setdefault("POST /sdapi/v1/refresh-loras", []).append(timed(lambda: call(url, "POST", "/sdapi/v1/refresh-loras")))
    loads = browse(url, len(names), [names[i * 617 % len(names)] for i in range(1, 6)], page_loads)
    results.setdefault("Lora page, first load (cards made): until the cards are shown", []).append(loads[0][0])
    results.setdefault("Lora page, first load: a search", []).append(loads[0][1])
    if len(loads) > 1:
        results.setdefault("Lora page, later loads: until the cards are shown", []).append(
            statistics.median(s for s, _ in loads[1:]))
        results.setdefault("Lora page, later loads: a search", []).append(statistics.median(f for _, f in loads[1:]))
    body = {"prompt": f"a cat <lora:{names[777 % len(names)]}:0.8>", "steps": 2, "width": 64, "height": 64, "seed": 1,
            "sampler_name": "Euler", "save_images": False}
    res = call(url, "POST", "/sdapi/v1/txt2img", body)
    assert "Lora errors" not in json.loads(res["info"]).get("extra_generation_params", {}), res["info"]
    phases = call(url, "GET", "/bench/v1/last")
    results.setdefault("first generation with a file: whole job", []).append(sum(phases["job"]))
    results.setdefault("first generation with a file: activation", []).append(sum(phases.get("activation", [0])))
    stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, help="torch threads in the WebUI (default: torch's own choice)")
    ap.add_argument("--page-loads", type=int, default=4, help="loads of the Lora page per start (the first makes the cards)")
    args = ap.parse_args()
    log(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores visible), load average {loadavg()}, bed {bed()}")
    results: dict[str, dict[str, list[float]]] = {c: {} for c in CONFIGS}
    try:
        for r in range(args.rounds):
            for config in (CONFIGS if r % 2 == 0 else list(CONFIGS)[::-1]):
                with tempfile.TemporaryDirectory(prefix="lora-library-bench-") as tmp:
                    log(f"round {r + 1}, {config}: writing {args.files} files ...")
                    names = write_library(pathlib.Path(tmp), args.files)
                    log(f"round {r + 1}, {config}: measuring ...")
                    measure(config, tmp, names, results[config], args.threads, args.page_loads)
                    log(f"  {json.dumps(results[config])}")
    finally:
        stop()
    ours, builtin = results["ours"], results["built-in"]
    print(f"{args.files} files, {args.rounds} round(s) (median); load average {loadavg()} (shared machine)\n")
    print("| figure | ours | built-in | ours / built-in |\n|---|---|---|---|")
    for key in ours:
        a, b = statistics.median(ours[key]), statistics.median(builtin[key])
        print(f"| {key} | {a:.2f} s | {b:.2f} s | {a / b:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
