"""The Lora card page and its editor in the WebUI's extra-networks area, and the "try weights" route.

Thin glue over the WebUI's ExtraNetworksPage / UserMetadataEditor API: what a card shows is decided in
``lib_lora.cards``; the files are the catalog's of ``glue.state()``; user metadata goes through
``lib_lora.sidecar`` (atomic, unknown keys kept, corrupt files kept aside).
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import json
import os
import threading
from dataclasses import dataclass

import gradio as gr
from fastapi import HTTPException
from pydantic import BaseModel

from modules import (call_queue, images, infotext_utils, processing, scripts, sd_models,
                     sd_samplers, shared, sysinfo, ui_extra_networks)
from modules.ui_extra_networks_user_metadata import UserMetadataEditor

from .. import cards, sidecar
from ..adapters import kind_label
from ..errors import LoraError
from ..keymap import FAMILY_NAMES
from ..structure import LARGE_RANK
from ..summary import file_summary
from . import glue, route_guards

VERSIONS = [*cards.SD_VERSIONS, "Unknown"]


def model_family() -> str | None:
    """The loaded checkpoint's family, without loading one (``shared.sd_model`` would)."""
    model = sd_models.model_data.sd_model
    if model is None:
        return None
    for family, flag in (("sd3", "is_sd3"), ("sdxl", "is_sdxl"), ("sd2", "is_sd2"), ("sd1", "is_sd1")):
        if getattr(model, flag, False):
            return family
    return None


def js_string(text: str) -> str:
    """A JS string literal (``quote_js`` leaves newlines raw, which breaks the card's onclick)."""
    return json.dumps(text)


@dataclass(frozen=True)
class CardView:
    """The settings every card of one render is made with, read once per render rather than once per card."""

    prefer_alias: bool
    family: str | None
    show_all: bool
    hide_unknown_for: tuple[str, ...]

    @classmethod
    def now(cls) -> CardView:
        return cls(prefer_alias=glue.state().settings().prefer_alias and glue.opt("lora_preferred_name", "") != "Filename",
                   family=model_family(), show_all=bool(glue.opt("lora_show_all", False)),
                   hide_unknown_for=tuple(glue.opt("lora_hide_unknown_for_versions", []) or []))


class LoraPage(ui_extra_networks.ExtraNetworksPage):
    def __init__(self):
        super().__init__("Lora")
        self.uis: list = []  # each tab's ExtraNetworksUi, see forget_rendered()
        self._made: tuple[dict, CardView, list[dict]] | None = None  # see list_items
        self._made_lock = threading.Lock()

    def refresh(self):
        glue.state().catalog.refresh()

    def allowed_directories_for_previews(self):
        return list(glue.state().catalog.roots)

    def list_items(self):
        """The cards of the catalog's current listing. The WebUI renders the page once per tab (txt2img, img2img: at
        the same time, on the first page load) and then serves that HTML until a refresh or an edit; the tabs share
        one making of the cards until then (a new listing of the catalog, forget_rendered() or other settings)."""
        view, entries = CardView.now(), glue.state().catalog.entries
        with self._made_lock:
            if self._made is None or self._made[0] is not entries or self._made[1] != view:
                made = (self.create_item(name, index, view=view) for index, name in enumerate(list(entries)))
                self._made = (entries, view, [item for item in made if item is not None])
            return iter(self._made[2])

    def create_item(self, name, index=None, enable_filter=True, view: CardView | None = None):
        view = view or CardView.now()
        catalog = glue.state().catalog
        entry = catalog.entries.get(name)
        if entry is None:
            return None
        civitai, civitai_problem = cards.read_civitai(entry.path, self.lister.exists)
        struct = cards.structure(entry)
        base = os.path.splitext(entry.path)[0]
        item = {
            "name": entry.relpath,
            "filename": entry.path,
            "shorthash": entry.shorthash,
            "preview": self.find_preview(base) or self.find_embedded_preview(base, entry.relpath, entry.metadata),
            "local_preview": base + ".png",
            "metadata": entry.metadata,
            "sort_keys": {"default": list(catalog.entries).index(name) if index is None else index,
                          **self.get_sort_keys(entry.path), "size": entry.size},
            "sdlora": {"entry": entry, "civitai": civitai, "structure": struct, "prefer_alias": view.prefer_alias,
                       "problems": [p for p in (entry.metadata_error, civitai_problem) if p]},
        }
        self.read_user_metadata(item)
        if enable_filter and not cards.fits(item["sdlora"]["family"], view.family, view.show_all, view.hide_unknown_for):
            return None
        return item

    def read_user_metadata(self, item, use_cache=True):
        """Everything that depends on ``name.json``: read again whenever the WebUI asks (after a save)."""
        info = item["sdlora"]
        entry, civitai, struct = info["entry"], info["civitai"], info["structure"]
        user, problem = sidecar.read_or_empty(entry.path, self.lister.exists if use_cache else os.path.exists)
        info["sidecar_problem"] = problem
        info["family"] = family = cards.base_model(user, struct.base_model, civitai)
        item["user_metadata"] = user
        item["sd_version"] = cards.VERSION_OF.get(family, "Unknown")
        item["description"] = cards.description(user, civitai) or self.find_description(os.path.splitext(entry.path)[0])
        # one span per card: the WebUI's filter reads every span's text on each key stroke, and joins them with spaces
        item["search_terms"] = [" ".join(cards.search_terms(entry, user, civitai, struct, family))]
        name = cards.prompt_name(glue.state().catalog, entry, info["prefer_alias"])
        weight = sidecar.preferred_weight(user)
        activation = str(user.get("activation text") or "").strip()
        item["prompt"] = " + ".join([
            js_string(f"<lora:{name}:"),
            js_string(f"{weight:g}") if weight else "opts.extra_networks_default_multiplier",
            js_string(">" + (" " + activation if activation else "")),
        ])
        negative = str(user.get("negative text") or "").strip()
        item["negative_prompt"] = js_string(f"({negative}:1)" if negative else "")

    def find_preview(self, path):
        """A fixed order (the WebUI's iterates a set): name.png first, which is what "Replace preview" writes."""
        found = cards.preview_path(path, self.lister.exists)
        return self.link_preview(found) if found else None

    def create_item_html(self, tabname, item, template=None):
        args = super().create_item_html(tabname, item)
        if not isinstance(args, dict):
            return args
        args["background_image"] += badges_html(item)
        return template.format(**args) if template else args

    def create_user_metadata_editor(self, ui, tabname):
        self.uis.append(ui)
        return LoraEditor(ui, tabname, self)

    def forget_rendered(self) -> None:
        """The WebUI renders the pages once and serves that HTML to every later page load; after an edit
        it is stale, so the next load renders again."""
        self._made = None
        for ui in self.uis:
            ui.pages_contents = []


def badges_html(item: dict) -> str:
    """Kind, rank (flagged from LARGE_RANK up), base model and problems, top left on the card."""
    info = item["sdlora"]
    struct = info["structure"]
    badges = []
    if struct.kind:
        modules = ", ".join(f"{n} {kind_label(k)}" for k, n in struct.kind_counts.items())
        badges.append(("kind", struct.kind, f"modules: {modules}"))
    if struct.rank:
        if struct.large:
            badges.append(("rank sdlora-large", f"rank {struct.rank}",
                           f"rank {LARGE_RANK} or more: a large network, more likely to overfit and slower"))
        else:
            badges.append(("rank", f"rank {struct.rank}", ""))
    if info["family"]:
        badges.append(("base", cards.VERSION_OF[info["family"]], f"base model: {FAMILY_NAMES[info['family']]}"))
    header_error = [struct.error] if struct.error and not info["entry"].metadata_error else []
    problems = [p for p in (*header_error, *info["problems"], info["sidecar_problem"]) if p]
    if problems:
        badges.append(("error", "!", "\n".join(problems)))
    spans = "".join(f"<span class='sdlora-{cls}'{badge_title(title)}>{html.escape(text)}</span>" for cls, text, title in badges)
    return f"<div class='sdlora-badges'>{spans}</div>"


def badge_title(title: str) -> str:
    """Thousands of cards: no empty attributes."""
    return f" title='{html.escape(title, quote=True)}'" if title else ""


def table_html(rows: list[tuple[str, str]]) -> str:
    return "<table class='file-metadata'>" + "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows) + "</table>"


def toggle_suggestion(text: str, evt: gr.SelectData) -> str:
    return cards.toggle_word(text, evt.value[0])


class LoraEditor(UserMetadataEditor):
    """The WebUI's editor with the Lora fields, trigger-word suggestions and "Try weights"."""

    def create_extra_default_items_in_left_column(self):
        self.select_sd_version = gr.Dropdown(VERSIONS, value="Unknown", label="Stable Diffusion version",
                                             interactive=True, elem_id=f"{self.id_part}_sd_version")

    def create_editor(self):
        self.create_default_editor_elems()
        self.edit_activation_text = gr.Textbox(label="Activation text (trigger words)", info="Added to the prompt with the network",
                                               elem_id=f"{self.id_part}_activation_text")
        button_suggest = gr.Button("Suggest trigger words", elem_id=f"{self.id_part}_suggest")
        self.suggestions = gr.HighlightedText(label="Suggestions (from civitai.info and training tags, with counts): "
                                              "click one to add or remove it", visible=False, elem_id=f"{self.id_part}_suggestions")
        self.slider_preferred_weight = gr.Slider(label="Preferred weight", info="0 = the default weight (1)", minimum=0.0,
                                                 maximum=2.0, step=0.01, value=0.0, elem_id=f"{self.id_part}_preferred_weight")
        self.edit_negative_text = gr.Textbox(label="Negative text", info="Added to the negative prompt",
                                             elem_id=f"{self.id_part}_negative_text")
        self.edit_notes = gr.TextArea(label="Notes", lines=3, elem_id=f"{self.id_part}_notes")
        button_try = gr.Button("Try weights 0, 0.25, 0.5, 0.75, 1 (txt2img prompt and seed)", elem_id=f"{self.id_part}_try")
        self.html_try = gr.HTML(elem_id=f"{self.id_part}_try_result")
        self.create_default_buttons()

        button_suggest.click(fn=self.suggest, inputs=[self.edit_name_input], outputs=[self.suggestions], show_progress=False)
        self.suggestions.select(fn=toggle_suggestion, inputs=[self.edit_activation_text], outputs=[self.edit_activation_text], show_progress=False)
        button_try.click(fn=None, inputs=[self.edit_name_input], outputs=[],
                         _js=f"function(name){{ sdloraTryWeights(name, {js_string(self.html_try.elem_id)}); return []; }}")
        shown = [self.edit_name, self.edit_description, self.html_filedata, self.html_preview, self.edit_notes,
                 self.select_sd_version, self.edit_activation_text, self.slider_preferred_weight, self.edit_negative_text,
                 self.suggestions, self.html_try, self.html_status]
        self.button_edit.click(fn=self.put_values_into_components, inputs=[self.edit_name_input], outputs=shown)\
            .then(fn=lambda: gr.update(visible=True), inputs=[], outputs=[self.box])
        edited = [self.edit_description, self.select_sd_version, self.edit_activation_text, self.slider_preferred_weight,
                  self.edit_negative_text, self.edit_notes]
        close_if_clean = ("function(name, status){ if (!status) closePopup(); extraNetworksRefreshSingleCard("
                          f"{js_string(self.page.name)}, {js_string(self.tabname)}, name); }}")
        self.button_save.click(fn=self.save_lora_user_metadata, inputs=[self.edit_name_input, *edited], outputs=[self.html_status])\
            .then(fn=None, _js=close_if_clean, inputs=[self.edit_name_input, self.html_status], outputs=[])

    def _item(self, name: str) -> dict:
        item = self.page.items.get(name) or self.page.create_item(name, enable_filter=False)
        if item is None:
            raise gr.Error(f"{name} is no longer in the Lora folder; refresh the page")
        self.page.items[name] = item
        return item

    def put_values_into_components(self, name):
        item = self._item(name)
        self.page.read_user_metadata(item)
        info, user = item["sdlora"], item["user_metadata"]
        problems = [p for p in (info["sidecar_problem"], *info["problems"]) if p]
        status = "".join(f"<p class='sdlora-problem'>{html.escape(p)}</p>" for p in problems)
        return [
            html.escape(name),
            str(user.get("description") or "") or info["civitai"].description,
            self.file_table(item),
            self.get_card_html(name),
            str(user.get("notes") or ""),
            item["sd_version"],
            str(user.get("activation text") or ""),
            sidecar.preferred_weight(user),
            str(user.get("negative text") or ""),
            gr.update(value=[], visible=False),
            "",
            status,
        ]

    def file_table(self, item: dict) -> str:
        """File, hashes, the engine's file summary and kohya's training metadata; then the tag table."""
        entry, civitai = item["sdlora"]["entry"], item["sdlora"]["civitai"]
        rows = [("File", os.path.relpath(entry.path, entry.root)), ("Size", sysinfo.pretty_bytes(entry.size)),
                ("Modified", datetime.datetime.fromtimestamp(entry.mtime).strftime("%Y-%m-%d %H:%M"))]
        try:
            summary = file_summary(entry.path, glue.state().catalog.limits)
        except LoraError as e:
            rows.append(("Error", e.message))
        else:
            hashes = summary["hashes"]
            rows += [("SHA256", hashes["sha256"]), ("AutoV2", hashes["autov2"]), ("AutoV3", hashes["autov3"]),
                     ("Format", summary["format"]), ("Detected base model", FAMILY_NAMES[summary["base_model"]]),
                     ("Modules", ", ".join(f"{n} {kind_label(k)}" for k, n in summary["kinds"].items())),
                     ("Rank / alpha", f"{summary['rank']} / {summary['alpha']}"), ("Unused keys", summary["unmatched"])]
        if civitai.base_label:
            rows.append(("civitai base model", civitai.base_label))
        rows += cards.training_rows(entry.metadata)
        tags = cards.tag_counts(entry.metadata)
        table = table_html(rows)
        if tags:
            table += (f"<details class='sdlora-tags'><summary>Training tags ({len(tags)})</summary>"
                      + table_html([(t, str(n)) for t, n in tags[:200]]) + "</details>")
        return table

    def suggest(self, name):
        info = self._item(name)["sdlora"]
        found = cards.suggestions(info["entry"].metadata, info["civitai"])
        if not found:
            gr.Info("No civitai.info trained words and no ss_tag_frequency in this file")
        return gr.update(value=found, visible=bool(found))

    def save_lora_user_metadata(self, name, desc, sd_version, activation_text, preferred_weight, negative_text, notes):
        """Writes through lib_lora.sidecar; a corrupt old file is kept aside and the editor says so."""
        entry = self._item(name)["sdlora"]["entry"]
        _, problem = sidecar.read_or_empty(entry.path)
        try:
            sidecar.write(entry.path, {"description": desc, "sd version": sd_version, "activation text": activation_text,
                                       "preferred weight": float(preferred_weight or 0), "negative text": negative_text,
                                       "notes": notes})
        except OSError as e:
            return f"<p class='sdlora-problem'>Not saved: {html.escape(str(e))}</p>"
        self.page.lister.update_file_entry(sidecar.sidecar_path(entry.path))
        self.page.forget_rendered()
        if problem:
            kept = os.path.basename(sidecar.sidecar_path(entry.path)) + ".bad"
            return f"<p class='sdlora-problem'>Saved. The old file was unreadable and is kept as {html.escape(kept)}: {html.escape(problem)}</p>"
        return ""

    def save_preview(self, index, gallery, name):
        """The WebUI's "Replace preview", written atomically as name.png (first in the preview order)."""
        if not gallery:
            return self.get_card_html(name), "There is no image in the gallery to save as a preview."
        item = self._item(name)
        index = min(max(int(index), 0), len(gallery) - 1)
        image = infotext_utils.image_from_url_text(gallery[index])
        geninfo, _ = images.read_info_from_image(image)
        buffer = io.BytesIO()
        images.save_image_with_geninfo(image, geninfo, buffer, extension=".png")
        sidecar.atomic_write_bytes(item["local_preview"], buffer.getvalue())
        self.page.lister.update_file_entry(item["local_preview"])
        self.page.forget_rendered()
        item["preview"] = self.page.find_preview(os.path.splitext(item["filename"])[0])
        return self.get_card_html(name), ""


# ---- try weights -------------------------------------------------------------------------------------
class TryWeights(BaseModel):
    name: str
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 20
    width: int = 512
    height: int = 512
    cfg_scale: float = 7.0
    sampler_name: str = ""
    scheduler: str = ""


def try_weights(req: TryWeights) -> dict:
    """txt2img once per weight in cards.TRY_WEIGHTS (same seed), through the WebUI's processing and
    scripts, as one labelled grid (PNG, base64)."""
    st = glue.state()
    prefer_alias = st.settings().prefer_alias
    entry, warning = st.catalog.resolve(req.name, prefer_alias)
    if entry is None:
        raise HTTPException(status_code=404, detail=warning or f"Lora not found: {req.name}")
    user, _ = sidecar.read_or_empty(entry.path)
    name = cards.prompt_name(st.catalog, entry, prefer_alias)
    prompts = cards.weight_prompts(req.prompt, name, str(user.get("activation text") or "").strip(),
                                   lambda n: st.catalog.resolve(n, prefer_alias)[0] is entry)
    seed = int(processing.get_fixed_seed(req.seed))
    sampler, scheduler = sd_samplers.get_sampler_and_scheduler(req.sampler_name or None, req.scheduler or None)
    with call_queue.queue_lock:
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model, prompt=prompts, negative_prompt=req.negative_prompt, seed=[seed] * len(prompts),
            steps=req.steps, width=req.width, height=req.height, cfg_scale=req.cfg_scale, sampler_name=sampler,
            scheduler=scheduler, n_iter=len(prompts), batch_size=1, do_not_save_samples=True, do_not_save_grid=True)
        runner = scripts.scripts_txt2img
        p.is_api = True  # else the UI-only seed/sampler scripts put their defaults over ours
        p.scripts = runner
        # What the txt2img UI sends with every script control at its default (as the WebUI's API does).
        p.script_args = tuple([0] + [getattr(c, "value", None) for c in runner.inputs[1:]])
        try:
            shared.state.begin(job="sdlora_try_weights")
            processed = processing.process_images(p)
        finally:
            shared.state.end()
            p.close()
    shots = processed.images[:len(prompts)]
    if len(shots) != len(prompts):
        raise HTTPException(status_code=500, detail=f"got {len(shots)} images for {len(prompts)} weights (interrupted?)")
    grid = images.image_grid(shots, rows=1)
    grid = images.draw_grid_annotations(grid, shots[0].width, shots[0].height,
                                        [[images.GridAnnotation(f"{w:g}")] for w in cards.TRY_WEIGHTS],
                                        [[images.GridAnnotation("")]])
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return {"image": base64.b64encode(buffer.getvalue()).decode(), "weights": list(cards.TRY_WEIGHTS),
            "seed": seed, "prompts": prompts}


def add_routes(_demo, app) -> None:
    """The API route, and the same for the page's own button (which has no API credentials)."""
    app.add_api_route("/lora/v1/try-weights", try_weights, methods=["POST"], dependencies=route_guards.api_dependencies())
    app.add_api_route("/internal/lora/try-weights", try_weights, methods=["POST"], dependencies=route_guards.page_dependencies(app))


# ---- registration --------------------------------------------------------------------------------------
def register_page() -> None:
    ui_extra_networks.extra_pages[:] = [p for p in ui_extra_networks.extra_pages if p.name != "lora"]
    ui_extra_networks.register_page(LoraPage())


def drop_builtin_page(*_args, **_kwargs) -> None:
    """Ours is the only "Lora" page. The WebUI runs before_ui callbacks last-registered first, so the
    built-in's page arrives after ours; the first UI component (created before any extra-networks tab)
    takes it out."""
    pages = ui_extra_networks.extra_pages
    if any(p.name == "lora" and not isinstance(p, LoraPage) for p in pages):
        pages[:] = [p for p in pages if p.name != "lora" or isinstance(p, LoraPage)]
