"""The "Train LoRA" tab and the ``/lora/v1/train`` routes: the trainer's options as a form (or as JSON), Start /
Cancel / Resume, and live progress.

Thin glue: fields, defaults, help texts and choices come from ``TrainConfig`` (through ``lib_lora.train.form``),
the run is a ``lib_lora.train.session.Session`` on the WebUI's loaded model (``train_model``), a job of the WebUI
(``job.TrainingJob``): its progress bar, live preview, ``/sdapi/v1/progress`` and Interrupt follow the run.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any, Callable, Iterator

import gradio as gr

from ..errors import LoraError
from ..train import Progress, TrainConfig, form
from ..train.plot import svg
from ..train.session import Session
from . import glue, job, route_guards, train_model

RUN: Session | None = None  # the current or last run; it holds the model while RUN.holds_model
RUN_TASK = ""  # RUN's task id in the WebUI's queue, which its progress bar follows
_STARTING = threading.Lock()
BUSY = "A training run is already going: cancel it or wait for it to finish"
REFUSAL = ("A LoRA training run is using the model, so this generation was refused: cancel the run in the "
           "Train LoRA tab or wait for it to finish.")
PLOT_EVERY_S = 3.0  # a new loss plot at most this often while running
SAMPLE_STEPS, SAMPLE_SEED = 20, 1  # sample images' defaults, in the tab and through the API

GROUPS = {  # accordion → rows of {option: label}
    "Dataset": [
        {"train_data_dir": "Image folder", "reg_data_dir": "Regularisation folder"},
        {"caption_extension": "Caption extension", "resolution": "Resolution",
         "prior_loss_weight": "Regularisation loss weight"},
        {"enable_bucket": "Aspect-ratio buckets", "bucket_no_upscale": "Never upscale", "flip_aug": "Random flips",
         "random_crop": "Random crop", "color_aug": "Colour shift", "shuffle_caption": "Shuffle tags"},
        {"min_bucket_reso": "Smallest bucket side", "max_bucket_reso": "Largest bucket side",
         "keep_tokens": "Keep first tags"},
        {"caption_prefix": "Caption prefix", "caption_suffix": "Caption suffix",
         "max_token_length": "Max caption tokens"},
        {"caption_dropout_rate": "Caption dropout", "caption_tag_dropout_rate": "Tag dropout",
         "validation_split": "Validation split"},
        {"cache_latents": "Cache latents", "cache_latents_to_disk": "Cache latents on disk",
         "vae_batch_size": "VAE batch size"}],
    "Network": [
        {"kind": "Kind", "network_dim": "Rank", "network_alpha": "Alpha", "network_dropout": "Dropout"},
        {"conv_dim": "Conv rank", "conv_alpha": "Conv alpha", "train_unet": "Train the UNet",
         "train_text_encoder": "Train the text encoder"},
        {"learning_rate": "Learning rate", "unet_lr": "UNet learning rate",
         "text_encoder_lr": "Text encoder learning rate"},
        {"network_weights": "Start from network file"}],
    "Optimisation": [
        {"optimizer_type": "Optimizer", "lr_scheduler": "Scheduler", "lr_warmup_steps": "Warm-up steps",
         "optimizer_args": "Optimizer arguments"},
        {"max_train_steps": "Steps", "max_train_epochs": "Epochs", "train_batch_size": "Batch size",
         "gradient_accumulation_steps": "Gradient accumulation"},
        {"min_snr_gamma": "Min-SNR gamma", "noise_offset": "Noise offset", "seed": "Seed",
         "max_grad_norm": "Max gradient norm"},
        {"mixed_precision": "Mixed precision", "gradient_checkpointing": "Gradient checkpointing"},
        {"loss_type": "Loss", "huber_schedule": "Huber schedule", "huber_c": "Huber threshold",
         "debiased_estimation_loss": "Debiased estimation"},
        {"multires_noise_iterations": "Multires noise levels", "multires_noise_discount": "Multires noise discount",
         "ip_noise_gamma": "Input perturbation noise", "zero_terminal_snr": "Zero terminal SNR"}],
    "Output": [
        {"output_dir": "Output folder", "output_name": "Name"},
        {"save_every_n_epochs": "Save every N epochs", "save_every_n_steps": "Save every N steps",
         "save_precision": "Save precision", "save_state": "Save resumable states"},
        {"training_comment": "Comment"}],
    "Samples": [{"sample_every_n_steps": "Sample every N steps", "sample_every_n_epochs": "Sample every N epochs"}],
}


def refuse_while_training(p) -> None:
    """For ``Script.process``: a generation reaching the model while a run holds it makes no image and says
    why. (UI and API generations wait in the WebUI's queue behind a run; this stops callers that skip it.)"""
    if RUN is not None and RUN.holds_model:
        p.n_iter = 0
        p.comment(REFUSAL)
        p.extra_generation_params["Lora errors"] = REFUSAL


def field(name: str, label: str, value=None) -> gr.components.Component:
    """A form field for a TrainConfig option (or a form-only value), from its type, default, help and choices."""
    value = form.form_default(name) if value is None else value
    kw = {"label": label, "info": form.help_text(name), "elem_id": f"sdlora_train_{name}"}
    choices = form.choices(name)
    if choices:
        return gr.Dropdown(choices, value=value, **kw)
    if isinstance(value, bool):
        return gr.Checkbox(value, **kw)
    kind = form.value_type(name)
    if kind in (int, float):
        return gr.Number(value, precision=0 if kind is int else None, **kw)
    return gr.Textbox(value, **kw)


def begin_run(make_config: Callable[[], tuple[TrainConfig, train_model.SampleOptions | None]],
              task_id: str) -> Session | None:
    """Start a run of ``make_config()`` (called only when no run is going) as the WebUI task ``task_id``;
    None while another run is going."""
    global RUN, RUN_TASK
    with _STARTING:
        if RUN is not None and RUN.alive:
            return None
        cfg, samples = make_config()
        RUN = Session(cfg, lambda: train_model.make_bundle(cfg, samples), lambda: train_model.hold_model(task_id),
                      hooks=job.TrainingJob(cfg.output_name))
        RUN_TASK = task_id
        RUN.start()
    return RUN


def start(resume_from: str, prompts: str, sample_steps: float, sample_seed: float, *values) -> tuple[str, str]:
    """Start (or, with a state folder, resume) a run on the loaded model; the form's errors are shown at once.
    Returns the status and the run's task id (for the WebUI's progress bar)."""
    task = job.new_task_id()
    try:
        run = begin_run(lambda: form_config(resume_from, prompts, sample_steps, sample_seed, values), task)
    except LoraError as e:
        raise gr.Error(e.message) from None
    except OSError as e:
        raise gr.Error(f"cannot write the sample prompts: {e}") from None
    if run is None:
        raise gr.Error(BUSY)
    return run.status(), task


def form_config(resume_from: str, prompts: str, sample_steps: float, sample_seed: float,
                values: tuple) -> tuple[TrainConfig, train_model.SampleOptions | None]:
    """The form's options and sample settings (its prompts written to a file, as the trainer reads them)."""
    cfg = form.from_form(dict(zip(FIELD_NAMES, values), resume=resume_from))
    samples = None
    if prompts.strip():
        cfg.sample_prompts = write_prompts(cfg.output_dir, cfg.output_name, prompts)
        w, h = cfg.resolution_wh()
        samples = train_model.SampleOptions(w, h, int(sample_steps or SAMPLE_STEPS), int(sample_seed or 0))
    return cfg, samples


def start_new(*values) -> tuple[str, str]:
    """Start without resuming."""
    return start("", *values)


def write_prompts(output_dir: str, name: str, prompts: str) -> str:
    """The sample prompts as the trainer reads them: a text file, one prompt per line."""
    path = os.path.join(output_dir, "sample", f"{name}-prompts.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(prompts.strip() + "\n")
    return path


def cancel() -> str:
    """Ask the run to stop after its current step."""
    if RUN is None or not RUN.alive:
        return RUN.status() if RUN else "No run is going."
    RUN.cancel()
    return RUN.status()


def running_task() -> str:
    """The task id of the run going, for the progress bar of a page opened during it."""
    return RUN_TASK if RUN is not None and RUN.alive else ""


def watch() -> Iterator[tuple]:
    """Progress text, log (newest first), loss plot, samples and the state folder to resume from, every
    second while the current run is alive (once when it is not); unchanged plots and images are not sent again."""
    run = RUN
    if run is None:
        yield "", "", gr.update(), gr.update(), gr.update()
        return
    shown_steps, shown_samples, plotted_at = -1, -1, 0.0
    while True:
        snap = run.snapshot()
        plot = gallery = resume = gr.update()
        points = len(snap.losses) + len(snap.val_losses)
        if points != shown_steps and (not snap.alive or time.monotonic() - plotted_at >= PLOT_EVERY_S):
            plot = svg(snap.losses, snap.val_losses)
            shown_steps, plotted_at = points, time.monotonic()
        if snap.sample_count != shown_samples:
            gallery, shown_samples = snap.samples, snap.sample_count
        if snap.result is not None and snap.result.cancelled and snap.result.state:
            resume = snap.result.state
        yield snap.status, "\n".join(reversed(snap.log)), plot, gallery, resume
        if not snap.alive:
            return
        time.sleep(1)


def apply_preset(name: str) -> list:
    """Updates for every field a preset may set: the chosen preset's values, the others unchanged."""
    values = form.PRESETS.get(name, {})
    return [gr.update(value=values[k]) if k in values else gr.update() for k in PRESET_FIELDS]


FIELD_NAMES = [name for rows in GROUPS.values() for row in rows for name in row]
PRESET_FIELDS = sorted({k for values in form.PRESETS.values() for k in values})


def on_ui_tabs() -> list:
    """The tab: presets, the options in accordions, the buttons and the live outputs."""
    fields = {}
    with gr.Blocks(analytics_enabled=False) as ui:
        gr.Markdown(
            "Trains a network on the **loaded checkpoint** (SD1.x, SD2.x or SDXL: set the resolution to 1024 for "
            "SDXL), sharing its weights. While a run "
            "holds the model, txt2img and img2img jobs wait in the WebUI's queue; afterwards the model is "
            "exactly as before. Cancel stops after the current step and saves a usable network and a "
            "resumable state. The text encoder sees captions as kohya's trainer does (no emphasis, no "
            "embeddings), at the *CLIP skip* setting.")
        with gr.Row():
            preset = gr.Dropdown(list(form.PRESETS), label="Preset", info="sets only its own fields: pick a "
                                 "purpose, then a memory tier", elem_id="sdlora_train_preset")
        with gr.Row():
            with gr.Column(scale=3):
                for title, rows in GROUPS.items():
                    with gr.Accordion(title, open=title == "Dataset", elem_id=f"sdlora_train_{title.lower()}"):
                        for row in rows:
                            with gr.Row():
                                for name, label in row.items():
                                    default = glue.lora_dirs()[0] if name == "output_dir" else None
                                    fields[name] = field(name, label, default)
                        if title == "Samples":
                            with gr.Row():
                                sample_steps = gr.Number(SAMPLE_STEPS, label="Sampling steps", precision=0,
                                                         elem_id="sdlora_train_sample_steps")
                                sample_seed = gr.Number(SAMPLE_SEED, label="Sample seed", precision=0,
                                                        info="the same at every step, so samples compare",
                                                        elem_id="sdlora_train_sample_seed")
                            prompts = gr.Textbox(label="Sample prompts", lines=3, info="one per line; "
                                                 "rendered with txt2img (Euler a, CFG 7) at the training "
                                                 "resolution unless the line says otherwise with kohya's "
                                                 "options: --n negative --w 512 --h 768 --s 20 --l 7 --d 1 "
                                                 "--ss euler_a", elem_id="sdlora_train_sample_prompts")
            with gr.Column(scale=2, elem_id="sdlora_train_job"):
                with gr.Row():
                    button_start = gr.Button("Start", variant="primary", elem_id="sdlora_train_start")
                    button_cancel = gr.Button("Cancel", variant="stop", elem_id="sdlora_train_cancel")
                    button_resume = gr.Button("Resume", elem_id="sdlora_train_resume")
                resume_from = gr.Textbox(label="Resume from state folder", elem_id="sdlora_train_resume_from",
                                         info="a '<name>-...-state' folder; filled in when a run is cancelled")
                task = gr.Textbox(visible=False, elem_id="sdlora_train_task")
                # clicked by a page opened after a run began (javascript/sd_webui_lora.js): no page-load events,
                # which cost every page of the WebUI 0.6 s in the browser with a big Lora library
                follow = gr.Button(visible=False, elem_id="sdlora_train_follow")
                gr.HTML(elem_id="sdlora_train_progress")  # the WebUI's progress bar goes here
                status = gr.Textbox(label="Progress", interactive=False, elem_id="sdlora_train_status")
                plot = gr.HTML(elem_id="sdlora_train_plot")
                gallery = gr.Gallery(label="Sample images", columns=4, height=260, object_fit="contain",
                                     elem_id="sdlora_train_samples")
                log = gr.Textbox(label="Log (newest first)", lines=8, max_lines=8, interactive=False,
                                 elem_id="sdlora_train_log")

        form_inputs = [prompts, sample_steps, sample_seed] + [fields[n] for n in FIELD_NAMES]
        watched = [status, log, plot, gallery, resume_from]
        preset.change(apply_preset, inputs=[preset], outputs=[fields[k] for k in PRESET_FIELDS], show_progress=False)
        for started in (button_start.click(start_new, inputs=form_inputs, outputs=[status, task], show_progress=False),
                        button_resume.click(start, inputs=[resume_from] + form_inputs, outputs=[status, task],
                                            show_progress=False)):
            started.success(None, _js="sdloraFollowTrainRun", inputs=[task])
            started.success(watch, outputs=watched, show_progress=False)
        button_cancel.click(cancel, outputs=[status], show_progress=False)
        follow.click(running_task, outputs=[task], show_progress=False)\
            .then(None, _js="sdloraFollowTrainRun", inputs=[task])
        follow.click(watch, outputs=watched, show_progress=False)
    return [(ui, "Train LoRA", "sdlora_train")]


def run_json(run: Session | None) -> dict[str, Any]:
    """The run as ``GET /lora/v1/train`` answers: its state and status line, the trainer's phase and message,
    the last step's report (step, loss, ETA, ...; null before the first), the files saved so far, and at the
    end the network, the state folder to resume from and the warnings."""
    out: dict[str, Any] = {"state": "idle", "status": "", "task_id": "", "name": None, "error": None, "saved": [],
                           "output": None, "resume_from": None, "warnings": [], "log": []}
    out.update(dict.fromkeys(f.name for f in dataclasses.fields(Progress)))
    if run is None:
        return out
    snap = run.snapshot()
    out.update(state=snap.state, status=snap.status, task_id=RUN_TASK, name=run.cfg.output_name,
               error=snap.error, saved=[f for f in snap.saved if os.path.exists(f)], log=snap.log[-20:])
    if snap.last_step is not None:
        out.update(dataclasses.asdict(snap.last_step))
    if snap.progress is not None:
        out.update(phase=snap.progress.phase, message=snap.progress.message, step=snap.progress.step)
    if snap.result is not None:
        out.update(output=snap.result.output, resume_from=snap.result.state, warnings=snap.result.warnings)
    return out


def api_config(options: dict) -> tuple[TrainConfig, train_model.SampleOptions | None]:
    """A config from the API's JSON (the CLI's and kohya's option names); samples at the training resolution."""
    cfg = TrainConfig.from_dict(options)
    samples = train_model.SampleOptions(*cfg.resolution_wh(), SAMPLE_STEPS, SAMPLE_SEED) if cfg.sample_prompts else None
    return cfg, samples


def on_app_started(_demo, app) -> None:
    """``POST /lora/v1/train`` (start a run: 400 for a bad config, 409 while a run is going), ``GET
    /lora/v1/train`` (the current or last run), ``POST /lora/v1/train/cancel``; each answers ``run_json``. And
    for the tab, ``GET /internal/lora/train/run``."""
    from fastapi import Body, HTTPException

    guard = route_guards.api_dependencies()

    @app.post("/lora/v1/train", dependencies=guard)
    def train_start(options: dict = Body(...)):
        try:
            run = begin_run(lambda: api_config(options), job.new_task_id())
        except LoraError as e:
            raise HTTPException(status_code=400, detail=e.message) from None
        if run is None:
            raise HTTPException(status_code=409, detail=BUSY)
        return run_json(run)

    @app.get("/lora/v1/train", dependencies=guard)
    def train_status():
        return run_json(RUN)

    @app.get("/internal/lora/train/run", dependencies=route_guards.page_dependencies(app))
    def train_run_known():
        """Whether the page has a run to follow (``RUN``: the current or last one)."""
        return {"run": RUN is not None}

    @app.post("/lora/v1/train/cancel", dependencies=guard)
    def train_cancel():
        run = RUN
        if run is not None and run.alive:
            run.cancel()
        return run_json(run)
