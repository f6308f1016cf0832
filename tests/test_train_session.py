"""What the WebUI tab stands on: TrainConfig as form values (presets, kinds, unset fields) and a Session
running the trainer in a thread inside a caller's hold, cancellable, polled through snapshots, followed and
stopped by a host's hooks."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading

import pytest
import torch
from PIL import Image

import lib_lora
import models
from lib_lora.catalog import Catalog
from lib_lora.errors import LoraError
from lib_lora.train import TrainConfig
from lib_lora.train import form
from lib_lora.train import plot
from lib_lora.train.session import RunHooks, Session
from test_train import make_bundle, make_images


def defaults() -> dict:
    names = [f.name for f in dataclasses.fields(TrainConfig)] + list(form.EXTRAS)
    return {n: form.form_default(n) for n in names if n not in ("network_algo", "network_train_unet_only",
                                                               "network_train_text_encoder_only")}


def test_form_defaults_give_the_default_config():
    assert form.from_form(defaults()) == TrainConfig()
    assert form.form_default("seed") == -1 and form.form_default("noise_offset") == 0
    assert form.form_default("reg_data_dir") == "" and "0 = unset" in form.help_text("conv_dim")
    assert form.choices("optimizer_type")[0] == "AdamW" and form.value_type("noise_offset") is float


@pytest.mark.parametrize("name", list(form.PRESETS))
def test_presets_fill_valid_options(name):
    cfg = form.from_form({**defaults(), **form.PRESETS[name]})
    for key, value in form.PRESETS[name].items():
        assert getattr(cfg, key) == value


def test_kinds_parts_and_unset_values():
    cfg = form.from_form({**defaults(), "kind": "LoCon", "network_dim": 8, "conv_dim": 0, "seed": -1,
                          "optimizer_args": "weight_decay=0.01 betas=0.9,0.99", "train_text_encoder": False})
    assert (cfg.network_algo, cfg.conv_dim, cfg.seed, cfg.network_train_unet_only) == ("lora", 8, None, True)
    assert cfg.optimizer_args == ["weight_decay=0.01", "betas=0.9,0.99"]
    cfg = form.from_form({**defaults(), "kind": "LoRA", "conv_dim": 4, "seed": 0, "train_unet": False})
    assert (cfg.conv_dim, cfg.seed, cfg.network_train_text_encoder_only) == (None, 0, True)
    assert form.from_form({**defaults(), "kind": "LoKr", "conv_dim": 2}).network_algo == "lokr"
    with pytest.raises(LoraError, match="neither"):
        form.from_form({"train_unet": False, "train_text_encoder": False})
    with pytest.raises(LoraError, match="network_dim"):
        form.from_form({"network_dim": 0})


@pytest.fixture()
def run_config(tmp_path):
    make_images(str(tmp_path / "img" / "2_cat"), sizes=[(64, 64), (64, 64)])
    (tmp_path / "prompts.txt").write_text("a cat\n")
    return TrainConfig(train_data_dir=str(tmp_path / "img"), resolution="64", min_bucket_reso=64, seed=1,
                       output_dir=str(tmp_path / "out"), output_name="run", max_train_steps=40,
                       sample_prompts=str(tmp_path / "prompts.txt"), sample_every_n_steps=1)


def test_session_runs_inside_the_hold_and_cancels_with_a_state(run_config):
    torch.set_num_threads(1)
    model = models.sd_model("sd1", seed=0)
    before = copy.deepcopy(model.state_dict())
    events, step_two = [], threading.Event()

    @contextlib.contextmanager
    def hold():
        events.append("enter")
        yield
        events.append("exit")

    def sample_fn(prompts, step):
        if step >= 2:
            step_two.set()
        return [Image.new("RGB", (8, 8), (step, 0, 0)) for _ in prompts]

    def make():
        events.append("bundle")
        return make_bundle(model, sample_fn=sample_fn)

    run = Session(run_config, make, hold)
    run.start()
    assert step_two.wait(120)
    assert run.holds_model and run.status() and run.state() == "running"
    run.cancel()
    run.join(120)
    snap = run.snapshot()
    assert not snap.alive and not run.holds_model and events == ["enter", "bundle", "exit"]
    assert snap.state == "cancelled"
    assert snap.saved == [snap.result.output] and snap.progress.phase == "cancelled"
    assert snap.last_step.phase == "training" and snap.last_step.step == snap.result.step and snap.last_step.loss > 0
    assert snap.result.cancelled and 2 <= snap.result.step < 40 and snap.error is None
    assert snap.status.startswith(f"Cancelled at step {snap.result.step}: saved ") and snap.result.state in snap.status
    assert len(snap.losses) == snap.result.step and snap.sample_count == snap.result.step and run.trainer is None
    assert snap.samples[-1][1] == f"step {snap.result.step}: a cat"
    assert any("saving run-step" in line for line in snap.log)
    assert lib_lora.load(snap.result.output).modules
    catalog = Catalog([run_config.output_dir])  # the output is a Lora folder: the state is no network
    catalog.refresh()
    assert [e.path for e in catalog.entries.values()] == [snap.result.output]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_session_reports_errors_and_cancel_before_start(run_config, tmp_path):
    run = Session(dataclasses.replace(run_config, train_data_dir=str(tmp_path / "missing")),
                  lambda: make_bundle(models.sd_model("sd1", seed=0)))
    run.start()
    run.join(60)
    assert run.snapshot().error and run.status().startswith("Failed: ") and "does not exist" in run.status()
    assert run.state() == "failed" and run.snapshot().saved == []

    gate = threading.Event()

    @contextlib.contextmanager
    def busy():
        gate.wait(60)  # a generation holds the WebUI's queue
        yield

    waiting = Session(run_config, lambda: pytest.fail("the model must not be taken"), busy)
    waiting.start()
    assert waiting.status().startswith("Waiting") and waiting.state() == "waiting"
    waiting.cancel()
    gate.set()
    waiting.join(60)
    assert waiting.result is None and waiting.status().startswith("Cancelled before training started")
    assert waiting.state() == "cancelled"


def test_session_hooks_follow_the_run_and_stop_it(run_config):
    """A host (the WebUI) sees every report and the newest sample in the run's thread; its stop request (the
    WebUI's Interrupt) cancels as cancel() does: after a sample, before the next step."""
    torch.set_num_threads(1)

    class Host(RunHooks):
        def __init__(self):
            self.steps, self.images, self.threads = [], [], set()

        def progress(self, p):
            self.threads.add(threading.current_thread().name)
            if p.phase == "training":
                self.steps.append(p.step)

        def sample(self, image):
            self.images.append(image)

        def stop_requested(self):
            return len(self.images) == 2

    def sample_fn(prompts, step):
        return [Image.new("RGB", (8, 8), (step, i, 0)) for i in range(2)]

    host = Host()
    run = Session(run_config, lambda: make_bundle(models.sd_model("sd1", seed=0), sample_fn=sample_fn), hooks=host)
    assert run.state() == "idle"
    run.start()
    run.join(120)
    snap = run.snapshot()
    assert snap.state == "cancelled" and snap.result.step == 2 and host.steps == [1, 2]
    assert [im.getpixel((0, 0)) for im in host.images] == [(1, 1, 0), (2, 1, 0)]  # the newest of each sampling
    assert host.threads == {"sd-webui-lora-train"} and snap.sample_count == 4


def test_loss_chart_for_the_train_tab():
    """The tab's SVG: training loss and its moving average at no more than 500 evenly spaced steps (the last one
    always), each validation loss; hovering a point names its curve, step and loss."""
    import xml.etree.ElementTree as ET
    train = [(s, 1.0 / s) for s in range(1, 1201)]
    root = ET.fromstring(plot.svg(train, [(600, 0.5), (1200, 0.25)]))
    ns = "{http://www.w3.org/2000/svg}"
    raw, average, val = [[tuple(map(float, xy.split(","))) for xy in line.get("points").split()]
                         for line in root.iter(ns + "polyline")]
    assert len(raw) == len(average) == 400 and len(val) == 2
    assert [x for x, _ in raw] == [x for x, _ in average] == sorted(x for x, _ in raw)
    titles = [t.text for t in root.iter(ns + "title")]
    assert len(titles) == 402 and titles[-2:] == ["validation loss, step 600: 0.5", "validation loss, step 1200: 0.25"]
    last = sum(1.0 / s for s in range(1141, 1201)) / 60
    assert titles[399] == f"training loss (moving average), step 1200: {last:.5g}"
    assert raw[-1][0] == pytest.approx(plot.W - plot.RIGHT)  # the last step at the right edge
    assert plot.svg([], []) == "" and len(list(ET.fromstring(plot.svg(train[:3], [])).iter(ns + "circle"))) == 3
