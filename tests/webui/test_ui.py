"""The Lora card page and its editor in the real WebUI, driven by headless Chromium, with the built-in
Lora enabled too (ours must be the only Lora tab). Screenshots land in artifacts/."""
from __future__ import annotations

import base64
import io
import json
import os
import pathlib
import shutil
import time

import pytest

from conftest import ARTIFACTS, browser_page

EDITOR = "#txt2img_lora_edit_user_metadata"
CARDS = "#txt2img_lora_cards_html"
CONTROLS = "#txt2img_extra_tabs .extra-networks-controls-div"  # where the WebUI moves the page's search and sort


@pytest.fixture(scope="module")
def client(server):
    return server.ensure("both")


@pytest.fixture(scope="module")
def page(client):
    with browser_page(client) as tab:
        open_lora_tab(tab, client.url)
        yield tab


def open_lora_tab(tab, url: str) -> None:
    tab.goto(url)
    tab.wait_for_selector("#txt2img_prompt textarea", timeout=120_000)
    tab.wait_for_function("typeof opts !== 'undefined' && opts.extra_networks_default_multiplier !== undefined")
    tab.locator("#txt2img_extra_tabs > div.tab-nav > button", has_text="Lora").click()
    tab.wait_for_selector(f"{CARDS} .card[data-name='styled']")


def card(tab, name: str):
    return tab.locator(f"{CARDS} .card[data-name='{name}']")


def open_editor(tab, name: str) -> None:
    card(tab, name).hover()
    card(tab, name).locator(".edit-button").click()
    tab.wait_for_function(f"document.querySelector('{EDITOR} .extra-network-name')?.textContent.trim() == {json.dumps(name)}")
    tab.wait_for_selector(EDITOR, state="visible")


def field(tab, suffix: str):
    return tab.locator(f"#txt2img_lora_edit_user_metadata_{suffix} :is(textarea, input)").first


def prompt(tab, neg: bool = False):
    return tab.locator(f"#txt2img_{'neg_' if neg else ''}prompt textarea")


def wait_for(check, what: str, timeout: float = 60):
    end = time.time() + timeout
    while time.time() < end:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def read_json(path: pathlib.Path) -> dict:
    """{} while the file is missing or not (yet) the new JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def test_one_lora_tab_with_cards_and_badges(page):
    tabs = page.locator("#txt2img_extra_tabs > div.tab-nav > button").all_inner_texts()
    assert [t.strip() for t in tabs].count("Lora") == 1, tabs
    names = page.locator(f"{CARDS} .card").evaluate_all("cards => cards.map(c => c.dataset.name)")
    assert {"kohya_a", "sub/nested", "styled", "broken", "corrupt_card"} <= set(names)
    assert "xl_only" not in names, "an SDXL network is hidden while an SD1.5 checkpoint is loaded"
    styled = card(page, "styled")
    assert styled.locator(".sdlora-kind").inner_text() == "LoRA"
    assert styled.locator(".sdlora-large").inner_text() == "rank 32"
    assert styled.locator(".sdlora-base").inner_text() == "SD1"
    assert "Ink wash painting style" in styled.locator(".description").inner_text()  # from civitai.info
    assert "preview" in styled.locator("img.preview").get_attribute("src")
    assert card(page, "kohya_a").locator(".sdlora-rank").inner_text() == "rank 4"
    assert "unreadable" in card(page, "corrupt_card").locator(".sdlora-error").get_attribute("title")
    assert card(page, "broken").locator(".sdlora-error").count() == 1
    assert page.locator(f"{CONTROLS} #txt2img_lora_extra_sort_size").count() == 1
    assert page.locator("#txt2img_lora_pane button", has_text="sub/").count() == 1  # the folder view
    page.mouse.move(0, 0)
    page.locator("#txt2img_extra_tabs").screenshot(path=str(ARTIFACTS / "ui-cards.png"))


def test_search_finds_trigger_words_tags_and_base_model(page):
    search = page.locator(f"{CONTROLS} #txt2img_lora_extra_search")
    for term, expected in (("monochrome", ["styled"]), ("kohya_a_alias", ["kohya_a"]), ("LoHa", ["lyco_loha"])):
        search.fill(term)
        shown = page.locator(f"{CARDS} .card:not(.hidden)").evaluate_all("cards => cards.map(c => c.dataset.name)")
        assert shown == expected, (term, shown)
    search.fill("")


def test_card_click_toggles_token(page):
    prompt(page).fill("a cat")
    card(page, "kohya_a").click()
    assert prompt(page).input_value() == "a cat <lora:kohya_a_alias:1>"
    card(page, "kohya_a").click()
    assert prompt(page).input_value() == "a cat"


def test_both_tabs_have_their_cards_and_refresh_lists_a_new_file(page, lora_dir):
    """The txt2img and img2img pages share one making of the cards (each with its own tab's click); the page's
    Refresh lists files added or removed since."""
    img2img = page.locator("#img2img_lora_cards_html .card[data-name='kohya_a']")
    assert "cardClicked('img2img'" in img2img.get_attribute("onclick")
    assert "cardClicked('txt2img'" in card(page, "kohya_a").get_attribute("onclick")
    added = lora_dir / "fresh_copy.safetensors"
    shutil.copyfile(lora_dir / "kohya_a.safetensors", added)
    refresh = page.locator(f"{CONTROLS} #txt2img_lora_extra_refresh")
    try:
        refresh.click()
        card(page, "fresh_copy").wait_for()
    finally:
        added.unlink()
    refresh.click()
    card(page, "fresh_copy").wait_for(state="detached")
    assert card(page, "kohya_a").count() == 1


def test_editor_saves_to_sidecar_and_reads_back(page, client, lora_dir):
    open_editor(page, "styled")
    assert field(page, "activation_text").input_value() == ""
    page.locator(f"{EDITOR} button", has_text="Suggest trigger words").click()
    suggestions = page.locator("#txt2img_lora_edit_user_metadata_suggestions")
    suggestions.get_by_text("inkstyle").wait_for()
    text = suggestions.inner_text()
    assert text.index("inkstyle") < text.index("monochrome") < text.index("sketch"), text  # civitai first, then by count
    assert "civitai" in text and "15" in text and "9" in text, text
    suggestions.get_by_text("inkstyle").click()
    wait_for(lambda: field(page, "activation_text").input_value() == "inkstyle", "a suggestion to fill the trigger words")
    field(page, "activation_text").fill("inkstyle, monochrome")
    field(page, "preferred_weight").fill("0.7")
    field(page, "negative_text").fill("color")
    page.locator(f"{EDITOR} .file-metadata").first.wait_for()
    page.set_viewport_size({"width": 1500, "height": 2400})  # the whole editor in one shot
    page.locator(EDITOR).screenshot(path=str(ARTIFACTS / "ui-editor.png"))
    page.set_viewport_size({"width": 1500, "height": 1100})
    page.locator(f"{EDITOR} button", has_text="Save").click()
    saved = wait_for(lambda: (s := read_json(lora_dir / "styled.json")).get("activation text") and s, "styled.json")
    assert saved["activation text"] == "inkstyle, monochrome" and saved["preferred weight"] == 0.7
    assert saved["negative text"] == "color" and saved["custom key"] == "kept"
    assert saved["description"] == "Ink wash painting style" and saved["sd version"] == "SD1"

    open_lora_tab(page, client.url)
    open_editor(page, "styled")
    assert field(page, "activation_text").input_value() == "inkstyle, monochrome"
    assert float(field(page, "preferred_weight").input_value()) == 0.7
    assert field(page, "negative_text").input_value() == "color"
    assert "Dim / alpha" in page.locator(f"{EDITOR} .file-metadata").first.inner_text()
    page.keyboard.press("Escape")

    prompt(page).fill("a cat")
    prompt(page, neg=True).fill("")
    card(page, "styled").click()
    assert prompt(page).input_value() == "a cat <lora:styled:0.7> inkstyle, monochrome"
    assert prompt(page, neg=True).input_value().strip() == "(color:1)"
    card(page, "styled").click()
    assert prompt(page).input_value() == "a cat" and prompt(page, neg=True).input_value().strip() == ""


def test_corrupt_sidecar_is_kept_aside_on_save(page, lora_dir):
    open_editor(page, "corrupt_card")
    page.locator(f"{EDITOR} .sdlora-problem", has_text="unreadable").wait_for()
    field(page, "activation_text").fill("fixed")
    page.locator(f"{EDITOR} button", has_text="Save").click()
    wait_for(lambda: read_json(lora_dir / "corrupt_card.json").get("activation text") == "fixed", "the new sidecar")
    assert (lora_dir / "corrupt_card.json.bad").read_text() == '{"activation text": "cut off'
    page.locator(f"{EDITOR} .sdlora-problem", has_text="kept as corrupt_card.json.bad").wait_for()
    page.keyboard.press("Escape")


def small_txt2img_settings(page) -> None:
    tabs = page.locator("#txt2img_extra_tabs > div.tab-nav > button")
    tabs.filter(has_text="Generation").click()
    for name, value in (("width", "64"), ("height", "64"), ("steps", "2")):
        box = page.locator(f"#txt2img_{name} input[type=number]")
        box.fill(value)
        box.press("Enter")
    prompt(page).fill("a cat")
    tabs.filter(has_text="Lora").click()


def test_replace_preview_and_try_weights(page, lora_dir):
    from PIL import Image
    small_txt2img_settings(page)
    page.locator("#txt2img_generate").click()
    page.wait_for_selector("#txt2img_gallery img", state="attached", timeout=180_000)
    open_editor(page, "kohya_b")
    page.locator(f"{EDITOR} button", has_text="Replace preview").click()
    wait_for(lambda: (lora_dir / "kohya_b.png").exists(), "kohya_b.png")
    preview = Image.open(lora_dir / "kohya_b.png")
    assert preview.size == (64, 64) and "a cat" in preview.info.get("parameters", "")
    assert not [p for p in os.listdir(lora_dir) if p.startswith(".tmp-")]
    page.locator(f"{EDITOR} .standalone-card-preview img").wait_for()

    page.locator(f"{EDITOR} button", has_text="Try weights").click()
    grid = page.locator("#txt2img_lora_edit_user_metadata_try_result img.sdlora-try-grid")
    grid.wait_for(timeout=300_000)
    png = base64.b64decode(grid.get_attribute("src").split(",", 1)[1])
    image = Image.open(io.BytesIO(png))
    assert image.width == 5 * 64 and image.height > 64, image.size  # five panels under a row of labels
    grid.screenshot(path=str(ARTIFACTS / "ui-try-weights.png"))
    page.keyboard.press("Escape")
