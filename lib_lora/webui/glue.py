"""The extension inside A1111: the ``lora``/``lyco`` extra network, callbacks, settings and API routes.

Mirrors the WebUI's own contracts (modules/extra_networks.py, modules/processing.py,
modules/script_callbacks.py, extensions-builtin/Lora); every decision is made by the engine.
"""
from __future__ import annotations

import logging
import os
import re

from modules import extra_networks, paths, script_callbacks, shared

from .. import inspect as lora_inspect
from ..activation import Activator, Settings
from ..catalog import Catalog
from ..errors import LoraError
from ..hashes import file_hashes
from ..prompt import TOKEN, PromptError, parse_items
from ..safetensors_io import Limits

log = logging.getLogger("sd-webui-lora")
SECTION = ("sd_webui_lora", "LoRA (sd-webui-lora)")


def lora_dirs() -> list[str]:
    opts = shared.cmd_opts
    dirs = [getattr(opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora")]
    lyco = getattr(opts, "lyco_dir_backcompat", None)
    if lyco and os.path.isdir(lyco):
        dirs.append(lyco)
    return dirs


class State:
    """The one catalog and activator of this WebUI process."""

    def __init__(self):
        os.makedirs(lora_dirs()[0], exist_ok=True)
        cache = os.path.join(paths.data_path, "cache", "sd-webui-lora-hashes.json")
        self.catalog = Catalog(lora_dirs(), cache_file=cache, cache_limit=int(opt("sdlora_cache_limit", 4)),
                               limits=limits())
        self.catalog.refresh()
        self.activator = Activator(self.catalog)
        self.active_uses: list = []

    def settings(self) -> Settings:
        return Settings(
            mode=opt("sdlora_apply_mode", "auto"),
            prefer_alias=opt("sdlora_preferred_name", "Alias from file") == "Alias from file",
            warn_base_model=bool(opt("sdlora_warn_base_model", True)),
            trigger_words=opt("sdlora_trigger_words", "warn"),
            weight_limit=float(opt("sdlora_weight_limit", 1.0)),
        )


def limits() -> Limits:
    """Files over these sizes are refused before they are read."""
    return Limits(max_file_bytes=int(float(opt("sdlora_max_file_mb", 4096)) * 1024 ** 2))


def opt(name: str, default):
    return getattr(shared.opts, name, default)


_state: State | None = None


def state() -> State:
    global _state
    if _state is None:
        _state = State()
    return _state


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    """``<lora:…>`` and ``<lyco:…>``: called by processing for every batch and for the hires pass."""

    def __init__(self):
        super().__init__("lora")

    def activate(self, p, params_list):
        st = state()
        requests, problems = [], []
        for params in list(params_list) + list(getattr(p, "sdlora_negative", [])):
            items = params.items if hasattr(params, "items") else params
            try:
                requests.append(parse_items([str(i) for i in items]))
            except PromptError as e:
                problems.append(f"<lora:{':'.join(map(str, items))}>: {e}")
        hr = getattr(p, "is_hr_pass", False)
        settings = st.settings()
        model = shared.sd_model
        patcher = st.activator.patcher_for(model)
        prompt = " ".join(getattr(p, "prompts", None) or [getattr(p, "prompt", "")])
        rep = st.activator.build(requests, patcher.family, prompt, settings)
        rep.errors[:0] = problems
        st.activator.apply(model, rep, settings)
        st.active_uses = rep.uses
        if rep.add_to_prompt:
            extra = ", ".join(rep.add_to_prompt)
            p.prompts = [f"{x}, {extra}" for x in p.prompts]
        for msg in rep.errors + rep.warnings:
            p.comment(msg)
        if rep.errors:
            p.extra_generation_params["Lora errors"] = "; ".join(rep.errors)
        if not hr or not hasattr(p, "lora_hashes"):
            p.lora_hashes = {}
        p.lora_hashes.update(rep.hashes)
        if p.lora_hashes:
            p.extra_generation_params["Lora hashes"] = ", ".join(f"{k}: {v}" for k, v in p.lora_hashes.items())

    def deactivate(self, p):
        patcher = state().activator.patcher
        if patcher is not None:
            patcher.step = None


network = ExtraNetworkLora()


def register_network() -> None:
    """Ours answers ``lora`` and ``lyco``; a built-in Lora registered earlier is replaced, so no
    network is applied twice."""
    extra_networks.register_extra_network(network)
    extra_networks.register_extra_network_alias(network, "lyco")


def strip_negative_tokens(p) -> None:
    """Negative-prompt tokens activate networks too (taken from the batch's first negative prompt, as the
    WebUI takes positive ones from the first prompt); they are removed from the text the model sees."""
    first = p.negative_prompts[0] if p.negative_prompts else ""
    p.sdlora_negative = [m.group(2).split(":") for m in TOKEN.finditer(first)]
    p.negative_prompts = [TOKEN.sub("", text) for text in p.negative_prompts]


def strip_hires_negative_tokens(p) -> None:
    """The hires pass's negative prompts are sliced after activation; keep tokens out of them too."""
    if getattr(p, "hr_negative_prompts", None):
        p.hr_negative_prompts = [TOKEN.sub("", text) for text in p.hr_negative_prompts]


def job_started(p) -> None:
    """Our network answers ``<lora>``; a job that disables extra networks runs on the plain model."""
    register_network()
    if getattr(p, "disable_extra_networks", False):
        st = state()
        st.activator.patcher_for(shared.sd_model).apply([])
        st.active_uses = []


def job_finished(p) -> None:
    state().active_uses = []


def on_model_loaded(sd_model) -> None:
    """Fresh weights were loaded: forget stale backups, then carry the job's networks onto this model
    (a refiner or a checkpoint switch in the middle of a job)."""
    st = state()
    if st.activator.patcher is not None and st.activator.patcher.model is sd_model:
        st.activator.forget_model()
    if st.active_uses:
        st.activator.patcher_for(sd_model).apply(st.active_uses, mode=st.settings().patch_mode)


def on_cfg_denoiser(params) -> None:
    """Scheduled networks follow the denoiser's own step counter and the steps this pass really runs."""
    patcher = state().activator.patcher
    if patcher is not None:
        patcher.step = getattr(params.denoiser, "step", params.sampling_step)
        patcher.total_steps = params.total_sampling_steps


re_lora = re.compile(r"<(lora|lyco):([^:>]+)")


def on_infotext_pasted(infotext, params: dict) -> None:
    """Renamed files are found again through the ``Lora hashes`` of a pasted infotext."""
    hashes = params.get("Lora hashes")
    if not hashes or "Prompt" not in params:
        return
    table = {}
    for part in str(hashes).split(","):
        name, _, short = part.partition(":")
        if short.strip():
            table[name.strip()] = short.strip()
    catalog = state().catalog

    def replace(m: re.Match) -> str:
        short = table.get(m.group(2))
        if not short:
            return m.group(0)
        entry, _ = catalog.resolve(m.group(2), state().settings().prefer_alias)
        if entry is not None and catalog.ensure_hash(entry)[:12] == short:
            return m.group(0)
        entry = catalog.by_hash(short)
        return f"<{m.group(1)}:{entry.relpath}" if entry is not None else m.group(0)

    params["Prompt"] = re_lora.sub(replace, params["Prompt"])


def network_json(entry) -> dict:
    return {"name": entry.name, "alias": entry.alias, "path": entry.path, "metadata": entry.metadata}


def on_app_started(_demo, app) -> None:
    """``/sdapi/v1/loras`` and ``/sdapi/v1/refresh-loras`` with the built-in's JSON shape (replacing its
    routes when it is enabled), and ``/lora/v1/info/{name}``."""
    from fastapi import HTTPException

    ours = {("/sdapi/v1/loras", "GET"), ("/sdapi/v1/refresh-loras", "POST")}
    app.router.routes[:] = [r for r in app.router.routes
                            if not any(getattr(r, "path", None) == path and method in getattr(r, "methods", ()) for path, method in ours)]

    @app.get("/sdapi/v1/loras")
    async def get_loras():
        return [network_json(e) for e in list(state().catalog.entries.values())]

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras():
        state().catalog.refresh()
        return None

    @app.get("/lora/v1/info/{name:path}")
    def get_info(name: str):
        catalog = state().catalog
        entry, warning = catalog.resolve(name, state().settings().prefer_alias)
        if entry is None:
            raise HTTPException(status_code=404, detail=warning or f"Lora not found: {name}")
        hashes = file_hashes(entry.path)
        try:
            info = lora_inspect.summary(catalog.load(entry), hashes=hashes)
        except LoraError as e:  # a broken file still gets an answer naming the reason
            info = {"error": e.message, "metadata": entry.metadata, "hashes": hashes, "base_model": None}
        user, problem = catalog.user_metadata(entry)
        info.update({"name": entry.name, "relpath": entry.relpath, "alias": entry.alias, "user_metadata": user,
                     "user_metadata_error": problem, "shorthash": catalog.ensure_hash(entry)[:12]})
        return info


def on_ui_settings() -> None:
    import gradio as gr

    options = {
        "sdlora_apply_mode": shared.OptionInfo(
            "auto", "How networks are applied", gr.Radio, {"choices": ["auto", "merge", "bypass"]}).info(
            "auto: merged into the weights (fastest sampling; restored bit-exactly when the set changes), "
            "except networks with start=/stop=, which run as a bypass on the layers' outputs"),
        "sdlora_cache_limit": shared.OptionInfo(4, "Networks kept in memory", gr.Number, {"precision": 0}),
        "sdlora_preferred_name": shared.OptionInfo(
            "Alias from file", "Prompt names refer to", gr.Radio, {"choices": ["Alias from file", "Filename"]}),
        "sdlora_warn_base_model": shared.OptionInfo(True, "Warn when a network was made for another base model"),
        "sdlora_trigger_words": shared.OptionInfo(
            "warn", "When none of a network's trigger words is in the prompt", gr.Radio,
            {"choices": ["warn", "add", "ignore"]}),
        "sdlora_weight_limit": shared.OptionInfo(1.0, "Warn for weights above", gr.Number),
        "sdlora_max_file_mb": shared.OptionInfo(
            4096, "Refuse network files larger than (MB)", gr.Number, {"precision": 0}).info(
            "checked before a file is read; LoRA files are rarely over 1000 MB"),
    }
    for key, info in options.items():
        info.section = SECTION
        shared.opts.add_option(key, info)
    shared.opts.onchange("sdlora_cache_limit", on_cache_limit_change)
    shared.opts.onchange("sdlora_max_file_mb", on_limits_change)


def on_cache_limit_change() -> None:
    state().catalog.cache_limit = int(opt("sdlora_cache_limit", 4))
    state().catalog.trim()


def on_limits_change() -> None:
    state().catalog.limits = limits()


def install_callbacks() -> None:
    script_callbacks.on_before_ui(register_network)
    script_callbacks.on_model_loaded(on_model_loaded)
    script_callbacks.on_cfg_denoiser(on_cfg_denoiser)
    script_callbacks.on_infotext_pasted(on_infotext_pasted)
    script_callbacks.on_app_started(on_app_started)
    script_callbacks.on_ui_settings(on_ui_settings)
