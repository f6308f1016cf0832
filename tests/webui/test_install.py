"""Installed as a user installs it: Extensions → Install from URL (a clone of this repository), then a restart:
the Lora card page, the Train LoRA and LoRA Tools tabs and the API are there, with nothing installed by hand."""
from __future__ import annotations

import pathlib
import shutil

import pytest

from conftest import ARTIFACTS, ROOT, browser_page, open_webui_tab

DIRNAME = "sd-webui-lora-installed"


@pytest.fixture
def installed_dir(server):
    target = pathlib.Path(server.bed, "webui", "extensions", DIRNAME)
    shutil.rmtree(target, ignore_errors=True)
    yield target
    shutil.rmtree(target, ignore_errors=True)
    server.stop()
    server.config = None  # the next test starts a WebUI without the installed copy


def test_install_by_url_then_restart(server, installed_dir):
    client = server.ensure("ours")
    with browser_page(client) as page:
        open_webui_tab(page, client, "Extensions", "#tabs_extensions")
        page.locator("#tabs_extensions button", has_text="Install from URL").click()
        page.get_by_label("URL for extension's git repository").fill(f"file://{ROOT}")
        page.get_by_label("Local directory name").fill(DIRNAME)
        page.get_by_role("button", name="Install", exact=True).click()
        page.wait_for_selector("#extension_install_result:has-text('Installed into')", timeout=300_000)
        page.screenshot(path=str(ARTIFACTS / "install-from-url.png"))
    assert (installed_dir / "scripts" / "sd_webui_lora.py").exists()

    client = server.ensure("installed")
    log = client.log()
    assert "Error loading script" not in log and "Error running install.py" not in log, log[-3000:]
    status, loras = client.call("GET", "/sdapi/v1/loras")
    assert status == 200 and any(e["name"] == "kohya_a" for e in loras)
    png, info = client.txt2img("a cat <lora:kohya_a:1>")
    assert "Lora hashes" in info["infotexts"][0]
    with browser_page(client) as page:
        page.goto(client.url)
        page.wait_for_selector("#txt2img_prompt textarea", timeout=120_000)
        tabs = page.locator("#tabs > .tab-nav > button").all_inner_texts()
        assert "Train LoRA" in tabs and "LoRA Tools" in tabs, tabs
        page.locator("#txt2img_extra_tabs > div.tab-nav > button", has_text="Lora").click()
        page.wait_for_selector("#txt2img_lora_cards_html .card[data-name='kohya_a']")
        page.screenshot(path=str(ARTIFACTS / "install-restarted.png"))
