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


TINY_KINDS = ("sdxl", "sd2v", "sd1", "sd3")


def tiny_checkpoint(bed: str, kind: str) -> pathlib.Path:
    """tests/webui/tiny_checkpoints.py's ``kind`` (one of TINY_KINDS) checkpoint, built with the bed's Python once
    per version of that script; SD3 also needs the T5 tokenizer in the bed's HF cache, written once per bed."""
    script = pathlib.Path(__file__).with_name("tiny_checkpoints.py")
    version = hashlib.sha256(script.read_bytes()).hexdigest()[:12]
    out = pathlib.Path.home() / ".cache" / "sd-webui-lora" / f"tiny-{kind}-{version}"
    ckpt = out / f"tiny-{kind}.safetensors"
    hub = pathlib.Path(bed, "hf-home", "hub")
    if kind == "sd3" and not (hub / "models--google--t5-v1_1-xxl" / "refs" / "main").exists():
        _run_bed_python(bed, script, "t5-tokenizer", str(hub))
    if not ckpt.exists():
        snapshot = next((hub / "models--openai--clip-vit-large-patch14" / "snapshots").iterdir())
        _run_bed_python(bed, script, kind, str(out), str(pathlib.Path(bed, "webui")), str(snapshot))
        assert ckpt.exists()
    return ckpt


def _run_bed_python(bed: str, *args) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="", HF_HOME=str(pathlib.Path(bed, "hf-home")))
    run = subprocess.run([str(pathlib.Path(bed, "venv", "bin", "python")), *map(str, args)], capture_output=True,
                         text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]


AUTH = ("tester", "s3cret")

# name → (this extension linked in, built-in Lora enabled, tiny checkpoint kind or None, more launch.py arguments)
CONFIGS = {
    "ours": (True, False, None, ()),
    "both": (True, True, None, ()),
    "builtin": (False, True, None, ()),
    "sdxl": (True, False, "sdxl", ()),
    "sd2v": (True, False, "sd2v", ()),
    "sd3": (True, False, "sd3", ()),
    "fp8": (True, False, None, ()),  # "ours", restarted for tests that change the FP8 settings
    "medvram": (True, False, None, ("--medvram",)),
    "lowvram": (True, False, None, ("--lowvram",)),
    "auth": (True, False, None, ("--api-auth", ":".join(AUTH), "--gradio-auth", ":".join(AUTH))),
    "installed": (False, False, None, ()),  # only what the Extensions tab installed into the bed
}


class Server:
    """One WebUI at a time on the bed, restarted only when a test needs another configuration."""

    def __init__(self, bed: str, lora_dir: pathlib.Path):
        self.bed, self.lora_dir, self.config, self.client = bed, lora_dir, None, None
        self.extensions: dict[str, str] = {}  # key → "FOLDER=PATH" of another extension a test links in

    def ensure(self, config: str, checkpoint: str | None = None) -> "Client":
        """A WebUI in one of ``CONFIGS``, with all settings at their defaults when it starts; ``checkpoint``: one of
        TINY_KINDS to run it on instead of the configuration's own checkpoint; "CONFIG+KEY" links
        ``extensions[KEY]`` in too."""
        if (config, checkpoint) == self.config:
            return self.client
        base, *extra = config.split("+")
        ours, builtin, ckpt, more = CONFIGS[base]
        args = ["--port", "0", "--replace", "--reset-config"]
        if ours:
            args += ["--ext", f"sd-webui-lora={ROOT}"]
        for key in extra:
            args += ["--ext", self.extensions[key]]
        if not builtin:
            args.append("--no-builtin-lora")
        args += ["--", "--lora-dir", str(self.lora_dir), *more]
        ckpt = checkpoint or ckpt
        if ckpt:
            args += ["--ckpt", str(tiny_checkpoint(self.bed, ckpt))]
        self.config = self.client = None  # start.sh --replace stops the running WebUI, whatever happens next
        env = dict(os.environ)
        if "--api-auth" in more:  # start.sh asks the API whether it is up with curl: give curl the credentials
            curl_home = pathlib.Path(self.bed, "curl-auth")
            curl_home.mkdir(exist_ok=True)
            (curl_home / ".curlrc").write_text(f'user = "{":".join(AUTH)}"\n', encoding="utf8")
            env["CURL_HOME"] = str(curl_home)
        out = subprocess.run([str(TB / "start.sh"), self.bed, *args], stdout=subprocess.PIPE, text=True, timeout=900,
                             env=env)
        if out.returncode != 0:
            log = pathlib.Path(self.bed, "webui.log")
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            pytest.fail(f"WebUI did not start (exit {out.returncode}):\n{tail}")
        self.config = (config, checkpoint)
        self.client = Client(out.stdout.strip().splitlines()[-1], self.bed, auth=AUTH if base == "auth" else None)
        if ckpt:  # the live-preview approximation model would be downloaded
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
    def __init__(self, url: str, bed: str, auth: tuple[str, str] | None = None):
        self.url = url
        self.bed = bed
        self.auth = auth

    def call(self, method: str, path: str, body=None, timeout: float = 1800, auth: tuple[str, str] | None | bool = True):
        """``auth``: True sends this client's credentials (if any), a pair sends those, None sends none."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        creds = self.auth if auth is True else auth or None
        if creds:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(creds).encode()).decode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
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


# ---- training ------------------------------------------------------------------------------------------
def cat_dataset(root: pathlib.Path) -> pathlib.Path:
    """``root/img/2_cat``: two 64 px images with captions, a kohya folder (2 repeats); returns ``root/img``."""
    from PIL import Image, ImageDraw
    folder = root / "img" / "2_cat"
    folder.mkdir(parents=True)
    for n in range(2):
        im = Image.new("RGB", (64, 64), (250, 250, 250))
        ImageDraw.Draw(im).ellipse([8, 8, 56, 56], fill=(40 + 150 * n, 200, 90))
        im.save(folder / f"img{n}.png")
        (folder / f"img{n}.txt").write_text(f"cat, color{n}")
    return root / "img"


def poll(read, until, timeout: float = 900, every: float = 0.3):
    """``read()`` until ``until(value)``; the last value (a failure after ``timeout`` seconds names it)."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if until(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting after {timeout} s; last: {value!r}")
        time.sleep(every)


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
