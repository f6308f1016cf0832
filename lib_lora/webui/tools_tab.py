"""The LoRA Tools tab and its HTTP routes: resize, merge and extract through ``lib_lora.tools``.

Each operation is a job of the WebUI (``job.webui_job``): it waits in the WebUI's queue behind generations, so
no generation merges networks meanwhile, shows in its progress bar and ``/sdapi/v1/progress``, and stops on its
Interrupt (or the tab's Cancel) without writing anything. Resize and merge read the loaded checkpoint's weights
(with every network taken out first); merging into a checkpoint and extracting read checkpoint files from disk.
New files go to the first Lora folder (networks) or the checkpoint folder, never over an existing file, and the
lists are refreshed.
"""
from __future__ import annotations

import os
import re
from typing import Callable

import gradio as gr
from pydantic import BaseModel

from modules import sd_models, shared

from ..errors import LoraError
from ..prompt import PromptError, parse_prompt
from ..tools import (RankRule, ToolResult, as_modules, extract, merge_into_checkpoint, merge_networks, read_checkpoint,
                     resize, save_checkpoint, save_network)
from ..tools.lowrank import DYNAMIC, ToolProgress
from ..train.metadata import SAVE_DTYPES
from . import glue, job, route_guards

_RE_FILE_NAME = re.compile(r"[\w][\w .()\[\]+-]*")


def output_path(name: str, folder: str) -> str:
    """``folder/name.safetensors`` for a plain file name; anything that could leave the folder or replace a
    file is refused."""
    name = (name or "").strip()
    if name.lower().endswith(".safetensors"):
        name = name[:-len(".safetensors")]
    if not _RE_FILE_NAME.fullmatch(name):
        raise LoraError(None, f"output name {name!r} is not a plain file name",
                        "use letters, digits, spaces and - _ . ( ) [ ] +, without folders")
    path = os.path.join(folder, name + ".safetensors")
    if os.path.exists(path):
        raise LoraError(path, "already exists", "choose another output name")
    return path


def networks(spec: str) -> list[tuple]:
    """(Network, weight) pairs from ``<lora:name:0.7> <lora:other:0.3>`` or ``name:0.7, other:0.3``."""
    if "<" not in spec:
        spec = " ".join(f"<lora:{part.strip()}>" for part in re.split(r"[,\n]", spec or "") if part.strip())
    _text, requests, problems = parse_prompt(spec)
    if problems:
        raise LoraError(None, problems[0], "write networks as <lora:name:0.7> or name:0.7")
    if not requests:
        raise LoraError(None, "no networks given", "write networks as <lora:name:0.7> or name:0.7")
    st = glue.state()
    out = []
    for req in requests:
        if (req.unet is not None and req.unet != req.te) or req.dyn or req.lbw or req.lbwe or req.start is not None \
                or req.stop is not None:
            raise LoraError(None, f"{req.text}: a merge takes one weight per network",
                            "write <lora:name:weight> without UNet weights, dyn, lbw, start or stop")
        entry, warning = st.catalog.resolve(req.name, st.settings().prefer_alias)
        if entry is None:
            raise LoraError(None, warning or f"no network named {req.name!r}", "refresh the Lora list or fix the name")
        out.append((st.catalog.load(entry), 1.0 if req.te is None else req.te))
    return out


def _loaded_model():
    """The loaded checkpoint with every network taken out (call in a job: with the queue lock held)."""
    model = shared.sd_model
    if model is None:
        raise LoraError(None, "no checkpoint is loaded", "load the checkpoint the networks were made for")
    glue.state().activator.patcher_for(model).apply([])
    return model


def _checkpoint_file(title: str) -> str:
    info = sd_models.get_closet_checkpoint_match(title or "")
    if info is None:
        raise LoraError(None, f"no checkpoint named {title!r}", "pick one from the list")
    return info.filename


def _saved(path: str, result: ToolResult) -> dict:
    save_network(path, result)
    glue.state().catalog.refresh()
    return {"path": path, "summary": result.summary(), "skipped": result.skipped,
            "message": f"Saved {path}: {result.summary()}"}


def as_job(tool: str, title: str, task_id: str | None, work: Callable[[ToolProgress], dict]) -> dict:
    """``work(progress)`` as one WebUI job (its task ``task_id``, or a new one); an Interrupt during it answers
    ``cancelled`` with nothing written."""
    with job.webui_job(job.TOOLS_JOB + tool, task_id) as running:
        try:
            return dict(work(running.ticker(title)), cancelled=False)
        except job.Interrupted:
            message = f"{title}: cancelled; nothing was written"
            return {"path": None, "summary": message, "skipped": [], "message": message, "cancelled": True}


def do_resize(task_id: str | None, name: str, rank: int, conv_rank: int | None, dynamic: str | None,
              dynamic_param: float | None, precision: str, output: str) -> dict:
    rule = RankRule(int(rank), None if conv_rank is None else int(conv_rank), dynamic or None, dynamic_param)

    def work(progress: ToolProgress) -> dict:
        path = output_path(output, glue.lora_dirs()[0])
        (net, _w), = networks(f"<lora:{name}:1>")
        return _saved(path, resize(net, _loaded_model(), rule, precision, progress))
    return as_job("resize", f"Resizing {name}", task_id, work)


def do_merge(task_id: str | None, spec: str, rank: int, conv_rank: int | None, precision: str, output: str,
             into_checkpoint: bool) -> dict:
    def to_network(progress: ToolProgress) -> dict:
        items = networks(spec)
        path = output_path(output, glue.lora_dirs()[0])
        rule = RankRule(int(rank), conv_rank and int(conv_rank))
        return _saved(path, merge_networks(items, _loaded_model(), rule, precision, progress))

    def to_checkpoint(progress: ToolProgress) -> dict:
        items = networks(spec)
        source = shared.sd_model.sd_checkpoint_info.filename if shared.sd_model is not None else None
        if not source:
            raise LoraError(None, "no checkpoint is loaded", "load the checkpoint to merge into")
        path = output_path(output, os.path.dirname(source))
        progress(0, 3)
        tensors, metadata = read_checkpoint(source)
        progress(1, 3)
        res = merge_into_checkpoint(items, tensors)
        progress(2, 3)
        save_checkpoint(path, tensors, metadata)
        sd_models.list_models()
        message = f"Saved {path}: {len(res.matched)} layers merged into {os.path.basename(source)}"
        return {"path": path, "summary": message, "skipped": res.skipped, "message": message}
    if into_checkpoint:
        return as_job("merge", "Merging into the checkpoint", task_id, to_checkpoint)
    return as_job("merge", "Merging networks", task_id, to_network)


def do_extract(task_id: str | None, base: str, tuned: str, rank: int, conv_rank: int | None, min_diff: float,
               precision: str, output: str) -> dict:
    def work(progress: ToolProgress) -> dict:
        path = output_path(output, glue.lora_dirs()[0])
        trees = [as_modules(read_checkpoint(_checkpoint_file(title))[0]) for title in (base, tuned)]
        rule = RankRule(int(rank), int(conv_rank or 0))
        return _saved(path, extract(trees[0], trees[1], rule, float(min_diff), precision, progress))
    return as_job("extract", f"Extracting {tuned} - {base}", task_id, work)


# ---- UI and routes ------------------------------------------------------------------------------------
def _ui_call(fn, *args) -> str:
    try:
        res = fn(*args)
    except (LoraError, PromptError) as e:
        raise gr.Error(getattr(e, "message", str(e))) from None
    lines = [res["message"]] + [f"skipped: {s}" for s in res["skipped"][:20]]
    return "\n".join(lines)


def _number_or_none(value) -> int | None:
    return None if value in (None, "") or value < 0 else int(value)


def resize_from_form(task_id, name, rank, conv, dynamic, param, precision, output) -> str:
    return _ui_call(do_resize, task_id, name, rank, _number_or_none(conv), dynamic or None,
                    param if dynamic else None, precision, output)


def job_controls(tool: str, label: str, task: gr.Textbox, fn: Callable, inputs: list) -> None:
    """The tool's button (``fn`` on ``inputs``, its task id from the page first), a Cancel (the WebUI's
    Interrupt, for the tools only) and the result, above which the WebUI's progress bar shows."""
    with gr.Row():
        go = gr.Button(label, variant="primary", elem_id=f"sdlora_tools_{tool}_go")
        cancel = gr.Button("Cancel", elem_id=f"sdlora_tools_{tool}_cancel")
    result = gr.Textbox(label="Result", lines=3, interactive=False, elem_id=f"sdlora_tools_{tool}_result")
    go.click(fn, [task] + inputs, [result], _js=f"(...args) => sdloraToolStart('{tool}', args)", show_progress=False)
    cancel.click(job.interrupt_tools, [], [], show_progress=False)


def network_choices():
    glue.state().catalog.refresh()
    return gr.update(choices=sorted(glue.state().catalog.entries))


def checkpoint_choices():
    sd_models.list_models()
    tiles = sd_models.checkpoint_tiles()
    return gr.update(choices=tiles), gr.update(choices=tiles)


def on_ui_tabs() -> list:
    names = sorted(glue.state().catalog.entries)
    with gr.Blocks(analytics_enabled=False) as ui:
        gr.Markdown("Resize, merge or extract networks. New files go to the Lora folder (merged checkpoints to the "
                    "checkpoint's folder); an existing file is never replaced. Resize and merge use the loaded "
                    "checkpoint, so load the one the networks were made for. Each waits for the WebUI's current "
                    "job; Cancel (or the WebUI's Interrupt) stops it without writing anything.")
        task = gr.Textbox(visible=False, elem_id="sdlora_tools_task")
        with gr.Tab("Resize", elem_id="sdlora_tools_resize"):
            with gr.Row():
                name = gr.Dropdown(names, label="Network", elem_id="sdlora_tools_resize_name", allow_custom_value=True)
                refresh = gr.Button("\U0001f504", elem_id="sdlora_tools_resize_refresh", scale=0, min_width=40)
                rank = gr.Number(8, label="Rank", precision=0, elem_id="sdlora_tools_resize_rank")
                conv = gr.Number(-1, label="Conv rank (-1: the rank)", precision=0, elem_id="sdlora_tools_resize_conv")
            with gr.Row():
                dynamic = gr.Dropdown(["", *DYNAMIC], value="", label="Dynamic rank", elem_id="sdlora_tools_resize_dynamic")
                param = gr.Number(0.9, label="Dynamic parameter", elem_id="sdlora_tools_resize_param")
                precision = gr.Dropdown(list(SAVE_DTYPES), value="fp16", label="Precision",
                                        elem_id="sdlora_tools_resize_precision")
                out = gr.Textbox(label="Output name", elem_id="sdlora_tools_resize_output")
            job_controls("resize", "Resize", task, resize_from_form, [name, rank, conv, dynamic, param, precision, out])
            refresh.click(network_choices, [], [name])
        with gr.Tab("Merge", elem_id="sdlora_tools_merge"):
            spec = gr.Textbox(label="Networks", placeholder="<lora:style:0.7> <lora:detail:0.3>", lines=2,
                              elem_id="sdlora_tools_merge_networks")
            with gr.Row():
                m_rank = gr.Number(16, label="Rank", precision=0, elem_id="sdlora_tools_merge_rank")
                m_conv = gr.Number(-1, label="Conv rank (-1: the rank)", precision=0, elem_id="sdlora_tools_merge_conv")
                m_prec = gr.Dropdown(list(SAVE_DTYPES), value="fp16", label="Precision", elem_id="sdlora_tools_merge_precision")
                into = gr.Checkbox(False, label="Into the loaded checkpoint (a new checkpoint file)",
                                   elem_id="sdlora_tools_merge_into")
                m_out = gr.Textbox(label="Output name", elem_id="sdlora_tools_merge_output")
            job_controls("merge", "Merge", task,
                         lambda t, s, r, c, p, o, i: _ui_call(do_merge, t, s, r, _number_or_none(c), p, o, i),
                         [spec, m_rank, m_conv, m_prec, m_out, into])
        with gr.Tab("Extract", elem_id="sdlora_tools_extract"):
            tiles = sd_models.checkpoint_tiles()
            with gr.Row():
                base = gr.Dropdown(tiles, label="Base checkpoint", elem_id="sdlora_tools_extract_base")
                tuned = gr.Dropdown(tiles, label="Fine-tuned checkpoint", elem_id="sdlora_tools_extract_tuned")
                e_refresh = gr.Button("\U0001f504", elem_id="sdlora_tools_extract_refresh", scale=0, min_width=40)
            with gr.Row():
                e_rank = gr.Number(32, label="Rank", precision=0, elem_id="sdlora_tools_extract_rank")
                e_conv = gr.Number(0, label="Conv rank (0: no convs)", precision=0, elem_id="sdlora_tools_extract_conv")
                e_min = gr.Number(0.01, label="Minimum text-encoder change", elem_id="sdlora_tools_extract_min")
                e_prec = gr.Dropdown(list(SAVE_DTYPES), value="fp16", label="Precision", elem_id="sdlora_tools_extract_precision")
                e_out = gr.Textbox(label="Output name", elem_id="sdlora_tools_extract_output")
            job_controls("extract", "Extract", task, lambda *a: _ui_call(do_extract, *a),
                         [base, tuned, e_rank, e_conv, e_min, e_prec, e_out])
            e_refresh.click(checkpoint_choices, [], [base, tuned])
    return [(ui, "LoRA Tools", "sdlora_tools")]


class Resize(BaseModel):  # request bodies of the routes below
    name: str
    rank: int = 8
    conv_rank: int | None = None
    dynamic: str | None = None
    dynamic_param: float | None = None
    precision: str = "fp16"
    output: str

class Merge(BaseModel):
    networks: str
    rank: int = 16
    conv_rank: int | None = None
    precision: str = "fp16"
    output: str
    into_checkpoint: bool = False

class Extract(BaseModel):
    base: str
    tuned: str
    rank: int = 32
    conv_rank: int = 0
    min_diff: float = 0.01
    precision: str = "fp16"
    output: str


def on_app_started(_demo, app) -> None:
    """``POST /lora/v1/tools/{resize,merge,extract}``: the tab's operations; errors answer 400 with the message,
    an interrupted operation ``cancelled: true``."""
    from fastapi import HTTPException

    def run(fn, *args) -> dict:
        try:
            return fn(*args)
        except (LoraError, PromptError) as e:
            raise HTTPException(status_code=400, detail=getattr(e, "message", str(e))) from None

    guard = route_guards.api_dependencies()

    @app.post("/lora/v1/tools/resize", dependencies=guard)
    def resize_route(r: Resize):
        return run(do_resize, None, r.name, r.rank, r.conv_rank, r.dynamic, r.dynamic_param, r.precision, r.output)

    @app.post("/lora/v1/tools/merge", dependencies=guard)
    def merge_route(r: Merge):
        return run(do_merge, None, r.networks, r.rank, r.conv_rank, r.precision, r.output, r.into_checkpoint)

    @app.post("/lora/v1/tools/extract", dependencies=guard)
    def extract_route(r: Extract):
        return run(do_extract, None, r.base, r.tuned, r.rank, r.conv_rank, r.min_diff, r.precision, r.output)
