"""The extension inside A1111: the ``lora``/``lyco`` extra network, callbacks, settings and API routes.

Mirrors the WebUI's own contracts (modules/extra_networks.py, modules/processing.py,
modules/script_callbacks.py, extensions-builtin/Lora); every decision is made by the engine.
"""
from __future__ import annotations

import logging
import os
import random
import re
import threading
from typing import Callable

from modules import extensions, extra_networks, paths, script_callbacks, scripts, shared
from modules import hashes as webui_hashes

from ..activation import Activator, Settings
from ..block_presets import XYZ, ZYX, BlockPresets, inverted, xyz_cell
from ..catalog import Catalog
from ..devices import BackupPlace
from ..errors import LoraError
from ..hashes import file_hashes, short_hash
from ..patcher import Patcher
from ..prompt import TOKEN, PromptError, parse_items, rewrite_tokens, with_block_weights, with_weight, with_xyz_vectors
from ..safetensors_io import Limits
from ..summary import network_summary
from .route_guards import api_dependencies

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
        self.catalog = Catalog(lora_dirs(), hash_cache=webui_hashes.cache("hashes-addnet"),
                               file_cache=webui_hashes.cache("sdlora-files"), caches_written=webui_hashes.dump_cache,
                               cache_limit=cache_limit(), limits=limits())
        self.catalog.refresh()
        self.activator = Activator(self.catalog, make_patcher)
        self.active_uses: list = []

    def settings(self) -> Settings:
        return Settings(
            mode="bypass" if opt("lora_functional", False) else opt("sdlora_apply_mode", "auto"),
            prefer_alias=opt("sdlora_preferred_name", "Alias from file") == "Alias from file",
            warn_base_model=bool(opt("sdlora_warn_base_model", True)),
            trigger_words=opt("sdlora_trigger_words", "warn"),
            weight_limit=float(opt("sdlora_weight_limit", 1.0)),
        )


def make_patcher(model) -> Patcher:
    return Patcher(model, backups=backup_place(), precise_weight=fp16_cache)


def backup_place() -> BackupPlace:
    return BackupPlace(keep_on_device=bool(opt("sdlora_backups_on_device", False)))


def fp16_cache(module, pname: str):
    """With FP8 weights and *Cache FP16 weight for LoRA*, the WebUI keeps an fp16 copy of each Linear/Conv weight
    and bias (modules/sd_models.py); merges start from it, as the built-in's do."""
    return getattr(module, "fp16_" + pname, None) if pname in ("weight", "bias") else None


def cache_limit() -> int:
    """Ours, or the built-in's ``lora_in_memory_limit`` when a user asked it for more."""
    return max(int(opt("sdlora_cache_limit", 4)), int(opt("lora_in_memory_limit", 0) or 0))


def limits() -> Limits:
    """Files over these sizes are refused before they are read."""
    return Limits(max_file_bytes=int(float(opt("sdlora_max_file_mb", 4096)) * 1024 ** 2))


def opt(name: str, default):
    return getattr(shared.opts, name, default)


_state: State | None = None
_state_lock = threading.Lock()


def state() -> State:
    """The process's State, made once: the model-loading thread and the UI's callbacks may both ask first."""
    global _state
    with _state_lock:
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
        requests += always_added(p, requests)
        hr = getattr(p, "is_hr_pass", False)
        settings = st.settings()
        settings.presets = block_presets(p)
        if lbw_enabled() and any(r.lbw or r.lbwe or r.start is not None or r.stop is not None for r in requests):
            p.comment(LBW_NOTE)
        model = shared.sd_model
        patcher = st.activator.patcher_for(model)
        prompt = " ".join(getattr(p, "prompts", None) or [getattr(p, "prompt", "")])
        rep = st.activator.build(requests, patcher.family, prompt, settings)
        rep.errors[:0] = problems
        st.activator.apply(model, rep, settings)
        rep.warnings += sync_bundled_embeddings(rep.embeddings)
        st.active_uses = rep.uses
        if rep.uses:
            note_fp8_precision(p, model)
        if rep.add_to_prompt:
            extra = ", ".join(rep.add_to_prompt)
            p.prompts = [f"{x}, {extra}" for x in p.prompts]
        for msg in rep.errors + rep.warnings:
            p.comment(msg)
        warn_not_found(rep.errors)
        if rep.errors:
            p.extra_generation_params["Lora errors"] = "; ".join(rep.errors)
        if not hr or not hasattr(p, "lora_hashes"):
            p.lora_hashes = {}
        p.lora_hashes.update(rep.hashes)
        if p.lora_hashes and opt("lora_add_hashes_to_infotext", True):
            p.extra_generation_params["Lora hashes"] = ", ".join(f"{k}: {v}" for k, v in p.lora_hashes.items())

    def deactivate(self, p):
        patcher = state().activator.patcher
        if patcher is not None:
            patcher.set_step(None)


network = ExtraNetworkLora()


def always_added(p, requests: list) -> list:
    """The built-in's *Add network to prompt* (``sd_lora``): that network at the default multiplier in every job
    that does not name it, also written into the prompts the infotext shows."""
    name = opt("sd_lora", "None")
    if not name or name == "None" or any(r.name == name for r in requests) or state().catalog.resolve(name)[0] is None:
        return []
    weight = opt("extra_networks_default_multiplier", 1.0)
    token = f"<lora:{name}:{weight:g}>"
    p.all_prompts = [x if token in x else x + token for x in p.all_prompts]
    return [parse_items([name, f"{weight:g}"])]


def warn_not_found(errors: list[str]) -> None:
    """The built-in's console and pop-up warnings for networks that are not there."""
    missing = [e for e in errors if e.startswith("Lora not found")]
    if not missing:
        return
    if opt("lora_not_found_warning_console", False):
        print("\n" + "; ".join(missing) + "\n")
    if opt("lora_not_found_gradio_warning", False):
        import gradio as gr
        gr.Warning("; ".join(missing))


FP8_NOTE = ("FP8 weights without *Cache FP16 weight for LoRA*: networks are merged into the 8-bit weights, so "
            "each merged layer keeps about 2 significant digits (small weights change little or not at all); turn "
            "the cache on in Settings > Optimizations for full precision, or use the bypass apply mode")


def note_fp8_precision(p, model) -> None:
    """Said once per loaded model: what a merge into FP8 storage loses when the WebUI keeps no fp16 copy."""
    from modules import devices

    if (not devices.fp8 or opt("cache_fp16_weight", False) or state().settings().mode == "bypass"
            or getattr(model, "sdlora_fp8_noted", False)):
        return
    model.sdlora_fp8_noted = True
    log.warning(FP8_NOTE)
    p.comment(FP8_NOTE)


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
        sync_bundled_embeddings({})


def job_finished(p) -> None:
    state().active_uses = []


def record_networks_switch(p) -> None:
    """The job's own ``disable_extra_networks``, before any script's batch hooks run."""
    p.sdlora_disable_networks = getattr(p, "disable_extra_networks", False)


def restore_networks_switch(p) -> None:
    """sd-webui-lora-block-weight, without the built-in Lora, switches extra networks off after they are activated
    (its pre-1.5 WebUI path); switch them back as the job asked, so the hires pass and the end of the batch see
    ours."""
    if lbw_enabled() and hasattr(p, "sdlora_disable_networks"):
        p.disable_extra_networks = p.sdlora_disable_networks


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
        patcher.set_step(getattr(params.denoiser, "step", params.sampling_step), params.total_sampling_steps)


_bundled: dict[str, tuple] = {}  # embedding name → (the engine's BundledEmbedding, the WebUI Embedding registered)


def sync_bundled_embeddings(wanted: dict) -> list[str]:
    """The embeddings that the listed networks bring (name → (network, its name in the prompt)), and only those, in
    the WebUI's embedding database; one loaded from the embeddings folder is never replaced. The infotext's
    "TI hashes" names each one's network, as the built-in Lora writes it. Returns warnings."""
    if not wanted and not _bundled:
        return []
    from modules import sd_hijack
    from modules.textual_inversion.textual_inversion import create_embedding_from_data

    db, model = sd_hijack.model_hijack.embedding_db, shared.sd_model
    for name, (source, emb) in list(_bundled.items()):
        ours = db.word_embeddings.get(name) is emb  # the database may have been reloaded since
        if not ours or name not in wanted or wanted[name][0].embeddings[name] is not source:
            if ours:
                db.register_embedding_by_name(None, model, name)
            del _bundled[name]
    warnings = []
    for name, (net, label) in wanted.items():
        source = net.embeddings[name]
        if name not in _bundled:
            if name in db.word_embeddings:
                warnings.append(f"{label}: its embedding {name} is not used; the embeddings folder has one of that name")
                continue
            vectors = source.vectors
            emb = create_embedding_from_data({"string_to_param": vectors} if "*" in vectors else dict(vectors), name)
            if db.expected_shape not in (-1, emb.shape):
                warnings.append(f"{label}: its embedding {name} is {emb.shape} wide, the loaded model's text encoders "
                                f"take {db.expected_shape}; not used")
                continue
            emb.filename = net.path  # the Textual Inversion page lists it under its network
            db.register_embedding(emb, model)
            _bundled[name] = (source, emb)
        _bundled[name][1].shorthash = label if opt("lora_bundled_ti_to_infotext", True) else ""
    return warnings


re_lora = re.compile(r"<(lora|lyco):([^:>]+)")


def on_infotext_pasted(infotext, params: dict) -> None:
    """Renamed files are found again through the ``Lora hashes`` of a pasted infotext, among the hashes known now
    (files not hashed yet are hashed in the background; the paste never waits for them)."""
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
        if entry is not None and short_hash(entry.hash) == short.lower():
            return m.group(0)
        found, _still_hashing = catalog.by_hash(short)
        return f"<{m.group(1)}:{found.relpath}" if found is not None else m.group(0)

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

    guard = api_dependencies()

    @app.get("/sdapi/v1/loras", dependencies=guard)
    async def get_loras():
        return [network_json(e) for e in list(state().catalog.entries.values())]

    @app.post("/sdapi/v1/refresh-loras", dependencies=guard)
    def refresh_loras():
        state().catalog.refresh()
        return None

    @app.get("/lora/v1/info/{name:path}", dependencies=guard)
    def get_info(name: str):
        catalog = state().catalog
        entry, warning = catalog.resolve(name, state().settings().prefer_alias)
        if entry is None:
            raise HTTPException(status_code=404, detail=warning or f"Lora not found: {name}")
        hashes = file_hashes(entry.path)
        try:
            info = network_summary(catalog.load(entry), hashes=hashes)
        except LoraError as e:  # a broken file still gets an answer naming the reason
            info = {"error": e.message, "metadata": entry.metadata, "hashes": hashes, "base_model": None}
        user, problem = catalog.user_metadata(entry)
        info.update({"name": entry.name, "relpath": entry.relpath, "alias": entry.alias, "user_metadata": user,
                     "user_metadata_error": problem, "shorthash": short_hash(entry.hash or hashes["sha256"])})
        return info


# ---- sd-webui-lora-block-weight (LBW): its presets, its XYZ plot, and who applies block weights ------------
LBW_SCRIPT = "lora_block_weight.py"
LBW_NOTE = ("Block weights, elemental weights and steps (lbw=, lbwe=, start=/stop=/step=) are applied by sd-webui-lora; "
            "sd-webui-lora-block-weight is installed but acts only on the built-in Lora's networks, so it stays idle")
PRESET_FILES = ("lbwpresets.txt", "elempresets.txt")


def lbw_enabled() -> bool:
    return any(os.path.basename(d.path) == LBW_SCRIPT for d in scripts.scripts_data)


def lbw_folder() -> str | None:
    """LBW's extension folder, enabled or not: its presets files are the user's."""
    for ext in extensions.extensions:
        if os.path.isfile(os.path.join(ext.path, "scripts", LBW_SCRIPT)):
            return ext.path
    return None


def read_presets_files(folder: str) -> tuple[str | None, str | None]:
    texts = []
    for name in PRESET_FILES:
        path = os.path.join(folder, name)
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
        except FileNotFoundError:
            texts.append(None)
        except OSError as e:
            log.warning("cannot read the block-weight presets file %s: %s", path, e)
            texts.append(None)
    return texts[0], texts[1]


def block_presets(p=None) -> BlockPresets:
    """LBW's default presets; then LBW's presets files; then, in a job where LBW is enabled, the presets text of
    its UI or API arguments (what LBW itself uses) and the vectors of its own XYZ plot; then the presets files
    in the first Lora folder."""
    presets = BlockPresets()
    folder = lbw_folder()
    if folder:
        presets = presets.updated(*read_presets_files(os.path.join(folder, "scripts")))
    script = next((s for s in getattr(getattr(p, "scripts", None), "alwayson_scripts", [])
                   if os.path.basename(getattr(s, "filename", "") or "") == LBW_SCRIPT), None)
    args = list(getattr(p, "script_args", None) or [])[script.args_from:script.args_to] if script else []
    if len(args) > 15:
        presets = presets.updated(args[0] if isinstance(args[0], str) else None,
                                  args[15] if isinstance(args[15], str) else None)
        lbw_globals = getattr(type(script).__init__, "__globals__", {})  # its module's globals
        if args[2] and lbw_globals.get("lxyz") and XYZ in getattr(p, "prompt", ""):
            presets.weights.update({XYZ: lbw_globals["lxyz"], ZYX: lbw_globals.get("lzyx") or inverted(lbw_globals["lxyz"])})
        if lbw_globals.get("xyelem"):
            presets.elements[XYZ] = ",".join(filter(None, (presets.elements.get(XYZ), lbw_globals["xyelem"])))
    return presets.updated(*read_presets_files(lora_dirs()[0]))


def tell_who_applies_block_weights() -> None:
    if lbw_enabled():
        log.warning(LBW_NOTE + ".")


# ---- X/Y/Z plot axes ---------------------------------------------------------------------------------------
def _rewrite(p, axis: str, change) -> None:
    p.prompt, count = rewrite_tokens(p.prompt, change)
    if not count:
        raise RuntimeError(f"{axis}: the prompt has no <lora:…> token")


def apply_weight(p, x, xs) -> None:
    """Every network in the prompt at this weight (text encoder and UNet)."""
    _rewrite(p, "LoRA weight", lambda items: with_weight(items, f"{x:g}"))


def apply_block_weights(p, x, xs) -> None:
    """Every network in the prompt with these block weights (a preset or a vector)."""
    _rewrite(p, "LoRA block weights", lambda items: with_block_weights(items, x))


def confirm_block_weights(p, xs) -> None:
    presets = block_presets(p)
    for x in xs:
        presets.block_weights(x, None, rng=random)  # raises with the reason


def xyz_axis(kind: str):
    """LBW's XYZ plot through the WebUI's: networks written ``lbw=XYZ`` (``ZYX``: 1 - each) get the cell's vector,
    written into the prompt so that each image's infotext reproduces it."""
    def apply(p, x, xs) -> None:
        state = dict(getattr(p, "sdlora_xyz", None) or {"prompt": p.prompt, "value": None, "blocks": None, "originals": ()})
        if kind == "originals":
            state["originals"] += (x,)
        else:
            state[kind] = x
        p.sdlora_xyz = state
        vector = xyz_cell(block_presets(p), state["value"], state["blocks"], state["originals"])
        p.prompt, found = with_xyz_vectors(state["prompt"], vector)
        if not found:
            raise RuntimeError("LBW XYZ axes: write lbw=XYZ (or ZYX) in the <lora:…> token to vary")
    return apply


AXES = (("LoRA weight", float, apply_weight, None),
        ("LoRA block weights", str, apply_block_weights, "presets"),
        ("LBW XYZ: values", str, xyz_axis("value"), None),
        ("LBW XYZ: Block ID", str, xyz_axis("blocks"), None),
        ("LBW XYZ: Original Weights", str, xyz_axis("originals"), "presets"))


def add_xyz_axes() -> None:
    """Our axes in the WebUI's X/Y/Z plot (its ``AxisOption`` list, read when its UI is built)."""
    xyz = next((d.module for d in scripts.scripts_data if os.path.basename(d.path) == "xyz_grid.py"), None)
    if xyz is None:
        return
    known = {o.label for o in xyz.axis_options}
    for label, kind, apply, choices in AXES:
        if label in known:
            continue
        extra = {"choices": lambda: list(block_presets().weights), "confirm": confirm_block_weights} if choices else {}
        fmt = xyz.format_value_add_label if kind is float else xyz.format_value
        xyz.axis_options.append(xyz.AxisOption(label, kind, apply, format_value=fmt, **extra))


def before_ui() -> None:
    register_network()
    add_xyz_axes()
    tell_who_applies_block_weights()


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
        "sdlora_backups_on_device": shared.OptionInfo(
            False, "Keep the original weights of merged layers on the GPU").info(
            "faster weight changes and restores for users with VRAM to spare; off: they wait in system RAM"),
        "sdlora_max_file_mb": shared.OptionInfo(
            4096, "Refuse network files larger than (MB)", gr.Number, {"precision": 0}).info(
            "checked before a file is read; LoRA files are rarely over 1000 MB"),
    }
    options.update((key, info) for key, info in builtin_options(gr).items() if key not in shared.opts.data_labels)
    for key, info in options.items():
        info.section = SECTION
        shared.opts.add_option(key, info)
    carry_over_builtin_settings()
    shared.opts.onchange("sdlora_cache_limit", on_cache_limit_change)
    if "lora_in_memory_limit" in shared.opts.data_labels:
        shared.opts.onchange("lora_in_memory_limit", on_cache_limit_change)
    shared.opts.onchange("sdlora_max_file_mb", on_limits_change)
    shared.opts.onchange("sdlora_backups_on_device", on_backup_place_change)


def builtin_options(gr) -> dict:
    """The built-in Lora's settings (extensions-builtin/Lora/scripts/lora_script.py) that this extension honours
    under their own keys. The built-in registers them itself when it is enabled; otherwise they are shown here,
    so each is shown once and a user's stored value keeps its meaning."""
    def names() -> dict:
        return {"choices": ["None", *sorted(e.relpath for e in state().catalog.entries.values())]}

    return {
        "sd_lora": shared.OptionInfo("None", "Add network to prompt", gr.Dropdown, names, refresh=state().catalog.refresh),
        "lora_preferred_name": shared.OptionInfo(
            "Alias from file", "When adding to prompt, refer to Lora by", gr.Radio, {"choices": ["Alias from file", "Filename"]}),
        "lora_add_hashes_to_infotext": shared.OptionInfo(True, "Add Lora hashes to infotext"),
        "lora_show_all": shared.OptionInfo(False, "Always show all networks on the Lora page").info(
            "otherwise, those detected as for incompatible version of Stable Diffusion will be hidden"),
        "lora_hide_unknown_for_versions": shared.OptionInfo(
            [], "Hide networks of unknown versions for model versions", gr.CheckboxGroup, {"choices": ["SD1", "SD2", "SDXL"]}),
        "lora_not_found_warning_console": shared.OptionInfo(False, "Lora not found warning in console"),
        "lora_not_found_gradio_warning": shared.OptionInfo(False, "Lora not found warning popup in webui"),
        "lora_bundled_ti_to_infotext": shared.OptionInfo(True, "Add Lora name as TI hashes for bundled Textual Inversion").info(
            '"Add Textual Inversion hashes to infotext" needs to be enabled'),
    }


# (built-in key or our former key, our key, the value ours takes): a stored value carried over once, when ours
# was never set.
CARRY_OVER = (
    ("lora_functional", "sdlora_apply_mode", lambda v: "bypass" if v else None),
    ("sdlora_hide_incompatible", "lora_show_all", lambda v: True if v is False else None),
)


def carry_over_builtin_settings() -> None:
    data = shared.opts.data
    for old, new, convert in CARRY_OVER:
        value = convert(data[old]) if old in data else None
        if value is not None and new not in data:
            data[new] = value


def on_cache_limit_change() -> None:
    state().catalog.cache_limit = cache_limit()
    state().catalog.trim()


def on_backup_place_change() -> None:
    """Backups taken from now on go to the new place; existing ones stay where they are until restored."""
    patcher = state().activator.patcher
    if patcher is not None:
        patcher.backups = backup_place()


def on_limits_change() -> None:
    state().catalog.limits = limits()


def install_callbacks(parts: dict[str, list[Callable]] | None = None) -> None:
    """One registration per WebUI event: this module's handler, then the other parts' (``parts``: event name →
    handlers, in order). The WebUI records where each registration came from with ``inspect.stack()``, which
    costs 30–40 ms apiece at start-up."""
    events: dict[str, list[Callable]] = {
        "before_ui": [before_ui], "model_loaded": [on_model_loaded], "cfg_denoiser": [on_cfg_denoiser],
        "infotext_pasted": [on_infotext_pasted], "app_started": [on_app_started], "ui_settings": [on_ui_settings]}
    for event, handlers in (parts or {}).items():
        events.setdefault(event, []).extend(handlers)
    for event, handlers in events.items():
        getattr(script_callbacks, f"on_{event}")(handlers[0] if len(handlers) == 1 else _each_of(handlers))


def _each_of(handlers: list[Callable]) -> Callable:
    """The handlers in turn; one that fails is logged and the rest still run. Lists returned (``ui_tabs``' tabs) are
    joined."""
    def each(*args):
        joined = []
        for handler in handlers:
            try:
                result = handler(*args)
            except Exception:
                log.exception("sd-webui-lora: %s failed", handler.__qualname__)
                continue
            if isinstance(result, list):
                joined.extend(result)
        return joined or None
    return each
