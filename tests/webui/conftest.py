"""The real A1111 WebUI v1.10.1 (../shared/webui-testbed) with this repo linked in as an extension."""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import mimetypes
import os
import pathlib
import re
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TB = ROOT.parent / "shared" / "webui-testbed"
ARTIFACTS = ROOT / "artifacts"


def _skip_or_fail(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"WebUI test bed unavailable in CI: {reason}")
    pytest.skip(f"WebUI test bed unavailable: {reason}")


@pytest.fixture(scope="session")
def webui_bed():
    if not (TB / "setup.sh").exists():
        _skip_or_fail(f"no test bed scripts at {TB}")
    out = subprocess.run([str(TB / "setup.sh")], stdout=subprocess.PIPE, text=True, timeout=3600)
    if out.returncode != 0:
        _skip_or_fail(f"setup.sh exited {out.returncode}")
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory):
    from webui_files import write_all
    d = tmp_path_factory.mktemp("loras")
    write_all(d)
    return d


def tiny_checkpoint(bed: str, kind: str) -> pathlib.Path:
    """tests/webui/tiny_checkpoints.py's ``kind`` ("sdxl" or "sd2v") checkpoint, built with the bed's Python
    once per version of that script."""
    script = pathlib.Path(__file__).with_name("tiny_checkpoints.py")
    version = hashlib.sha256(script.read_bytes()).hexdigest()[:12]
    out = pathlib.Path.home() / ".cache" / "sd-webui-lora" / f"tiny-{kind}-{version}"
    ckpt = out / f"tiny-{kind}.safetensors"
    if not ckpt.exists():
        snapshot = next(pathlib.Path(bed, "hf-home", "hub", "models--openai--clip-vit-large-patch14", "snapshots").iterdir())
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
        run = subprocess.run([str(pathlib.Path(bed, "venv", "bin", "python")), str(script), kind, str(out),
                              str(pathlib.Path(bed, "webui")), str(snapshot)], capture_output=True, text=True, env=env,
                             timeout=600)
        assert run.returncode == 0 and ckpt.exists(), run.stderr[-3000:]
    return ckpt


class Server:
    """One WebUI at a time on the bed, restarted only when a test needs another configuration."""

    def __init__(self, bed: str, lora_dir: pathlib.Path):
        self.bed, self.lora_dir, self.config, self.client = bed, lora_dir, None, None

    def ensure(self, config: str) -> "Client":
        """config: "ours" (built-in Lora disabled), "both" (ours + built-in), "builtin" (built-in only), "sdxl" or
        "sd2v" (ours, on tiny_checkpoints.py's SDXL or SD2 768-v checkpoint)."""
        if config == self.config:
            return self.client
        args = ["--port", "0", "--replace", "--reset-config"]
        if config != "builtin":
            args += ["--ext", f"sd-webui-lora={ROOT}"]
        if config in ("ours", "sdxl", "sd2v"):
            args.append("--no-builtin-lora")
        args += ["--", "--lora-dir", str(self.lora_dir)]
        if config in ("sdxl", "sd2v"):
            args += ["--ckpt", str(tiny_checkpoint(self.bed, config))]
        out = subprocess.run([str(TB / "start.sh"), self.bed, *args], stdout=subprocess.PIPE, text=True, timeout=900)
        if out.returncode != 0:
            log = pathlib.Path(self.bed, "webui.log")
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            pytest.fail(f"WebUI did not start (exit {out.returncode}):\n{tail}")
        self.config = config
        self.client = Client(out.stdout.strip().splitlines()[-1], self.bed)
        if config in ("sdxl", "sd2v"):  # the live-preview approximation model would be downloaded
            assert self.client.call("POST", "/sdapi/v1/options", {"live_previews_enable": False})[0] == 200
        return self.client

    def stop(self) -> None:
        subprocess.run([str(TB / "stop.sh"), self.bed], check=False, timeout=120)


@pytest.fixture(scope="session")
def server(webui_bed, lora_dir):
    srv = Server(webui_bed, lora_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def webui(server):
    """The WebUI with the built-in Lora disabled."""
    return server.ensure("ours")


class Client:
    def __init__(self, url: str, bed: str):
        self.url = url
        self.bed = bed

    def call(self, method: str, path: str, body=None, timeout: float = 600):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def txt2img(self, prompt: str, **kw) -> tuple[bytes, dict]:
        body = {"prompt": prompt, "steps": 2, "width": 64, "height": 64, "seed": 1, "sampler_name": "Euler",
                "cfg_scale": 7, "save_images": False}
        body.update(kw)
        status, res = self.call("POST", "/sdapi/v1/txt2img", body)
        assert status == 200, res
        info = json.loads(res["info"])
        return base64.b64decode(res["images"][0]), info

    def log(self) -> str:
        p = pathlib.Path(self.bed, "webui.log")
        return p.read_text(errors="replace") if p.exists() else ""


def pixels(png: bytes):
    from PIL import Image
    import numpy as np
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


@contextlib.contextmanager
def browser_page(client: "Client"):
    """A headless Debian Chromium tab (Playwright, no browser download) on the WebUI's page."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip_or_fail("the playwright package is not installed")
    if not os.path.exists(CHROMIUM):
        _skip_or_fail(f"no {CHROMIUM}")
    ARTIFACTS.mkdir(exist_ok=True)
    webui = pathlib.Path(client.bed, "webui")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        tab = browser.new_page(viewport={"width": 1500, "height": 1100})
        tab.set_default_timeout(60_000)
        tab.route("**/file=**", lambda route: _serve_static(route, webui))
        try:
            yield tab
        finally:
            browser.close()


def _serve_static(route, webui: pathlib.Path) -> None:
    """gradio 3.41 answers 403 for any file under a dot folder, and the bed lives in ~/.cache: then the
    WebUI's own JS/CSS (and ours) are served to the browser from the bed's tree, unchanged."""
    response = route.fetch()
    rel = urllib.parse.unquote(urllib.parse.urlsplit(route.request.url).path.split("/file=", 1)[1])
    path = pathlib.Path(os.path.normpath(webui / rel))
    if response.status != 403 or webui not in path.parents or not path.is_file():
        route.fulfill(response=response)
        return
    route.fulfill(status=200, body=path.read_bytes(), content_type=mimetypes.guess_type(path.name)[0] or "text/plain")


# ---- the Train LoRA tab's form --------------------------------------------------------------------------
def open_webui_tab(page, client: "Client", title: str, ready: str) -> None:
    """The WebUI's page with one of its top tabs shown (``ready``: a selector visible once it is)."""
    page.goto(client.url)
    page.wait_for_selector("#txt2img_prompt textarea", timeout=120_000)
    page.locator("#tabs > .tab-nav > button", has_text=title).click()
    page.wait_for_selector(ready, state="visible")


def open_train_tab(page, client: "Client", *groups: str) -> None:
    """The Train LoRA tab with these option groups (accordions: network, optimisation, ...) opened."""
    open_webui_tab(page, client, "Train LoRA", "#sdlora_train_start")
    for title in groups:
        page.locator(f"#sdlora_train_{title}").locator(".label-wrap").first.click()


def field(tab, name: str):
    return tab.locator(f"#sdlora_train_{name}").locator("input, textarea").first


def fill(tab, name: str, value) -> None:
    box = field(tab, name)
    box.fill(str(value))
    box.press("Tab")


def status(tab) -> str:
    return field(tab, "status").input_value()


def wait_status(tab, pattern: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = status(tab)
        if re.search(pattern, text):
            return text
        assert not text.startswith("Failed"), f"{text}\n{field(tab, 'log').input_value()}"
        time.sleep(0.3)
    pytest.fail(f"no status matching {pattern!r}; last: {status(tab)!r}\n{field(tab, 'log').input_value()}")
