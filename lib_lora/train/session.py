"""One training run in a background thread, for a UI: start it, cancel it, and poll ``snapshot()``.

The caller supplies ``hold``, a context manager entered in the run's thread before anything touches the
model (the WebUI's queue lock), and ``make_bundle``, called inside it, so the model is taken only while held;
``hooks`` let a host follow the run as it goes (the WebUI's progress bar, live preview and Interrupt).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, ContextManager

from ..errors import LoraError
from .config import TrainConfig
from .loop import Progress, Trainer, TrainResult, progress_line
from .model import ModelBundle
from .samples import SamplePrompt

log = logging.getLogger("sd-webui-lora")


@dataclass
class Snapshot:
    """What a UI shows: ``losses`` only grow during a run and ``sample_count`` counts every sample image, so
    a poller can tell what changed; ``samples`` are the latest images with captions."""

    alive: bool
    state: str
    status: str
    log: list[str]
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[tuple[object, str]] = field(default_factory=list)
    sample_count: int = 0
    result: TrainResult | None = None
    error: str | None = None
    progress: Progress | None = None
    last_step: Progress | None = None  # the last report of a training step: its loss, speed and ETA
    saved: list[str] = field(default_factory=list)


_STATUS = {"idle": "", "waiting": "Waiting for the WebUI's current job to finish...", "starting": "Starting...",
           "cancelled": "Cancelled before training started; nothing was saved."}


class RunHooks:
    """How a host follows a run, called in the run's thread; this one does nothing."""

    def progress(self, p: Progress) -> None:
        """After each of the trainer's progress reports (every step, and each phase)."""

    def sample(self, image) -> None:
        """The newest sample image."""

    def stop_requested(self) -> bool:
        """Asked after each report and each sample: True cancels the run as ``cancel()`` does."""
        return False


class Session:
    """``start()`` runs ``Trainer(cfg, make_bundle()).run()`` in a daemon thread inside ``hold()``."""

    def __init__(self, cfg: TrainConfig, make_bundle: Callable[[], ModelBundle],
                 hold: Callable[[], ContextManager] = contextlib.nullcontext, log_lines: int = 200,
                 keep_samples: int = 24, hooks: RunHooks | None = None):
        self.cfg = cfg
        self.make_bundle = make_bundle
        self.hold = hold
        self.hooks = hooks or RunHooks()
        self.holds_model = False
        self._held = False  # the hold was entered: no longer waiting
        self.trainer: Trainer | None = None
        self.progress: Progress | None = None
        self.last_step: Progress | None = None
        self.result: TrainResult | None = None
        self.error: str | None = None
        self.losses: list[tuple[int, float]] = []  # the trainer's, kept when it is dropped after the run
        self.val_losses: list[tuple[int, float]] = []
        self._log: deque[str] = deque(maxlen=log_lines)
        self._samples: deque[tuple[object, str]] = deque(maxlen=keep_samples)
        self._sample_count = 0
        self._lock = threading.Lock()  # log and samples are appended by the run's thread, read by pollers
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sd-webui-lora-train", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        """Stop at the next step (a network and a resumable state are saved), or before the run starts."""
        self._cancel.set()
        trainer = self.trainer
        if trainer is not None:
            trainer.cancel()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def snapshot(self) -> Snapshot:
        t = self.trainer
        with self._lock:
            lines, samples, count = list(self._log), list(self._samples), self._sample_count
        saved = self.result.saved if self.result is not None else list(getattr(t, "saved", []))
        return Snapshot(self.alive, self.state(), self.status(), lines, list(getattr(t, "losses", self.losses)),
                        list(getattr(t, "val_losses", self.val_losses)), samples, count, self.result, self.error,
                        self.progress, self.last_step, saved)

    def state(self) -> str:
        """One word: waiting (for the hold), starting, running, cancelling, then, once the run has let go of the
        model, finished, cancelled or failed (idle before ``start()``)."""
        if self.alive:
            if not self._held:
                return "waiting"
            if self.progress is None:
                return "starting"
            return "cancelling" if self._cancel.is_set() else "running"
        if self.error:
            return "failed"
        if self.result is not None:
            return "cancelled" if self.result.cancelled else "finished"
        return "cancelled" if self._cancel.is_set() else "idle"

    def status(self) -> str:
        """One line: the progress while training, the files saved at the end."""
        state, r = self.state(), self.result
        if state == "failed":
            return f"Failed: {self.error}"
        if state in ("running", "cancelling"):
            return progress_line(self.progress) + (" (cancelling after this step)" if state == "cancelling" else "")
        if r is not None and r.output is not None:
            resume = f"; resume from {r.state}" if r.state else ""
            return f"{'Cancelled' if r.cancelled else 'Finished'} at step {r.step}: saved {r.output}{resume}"
        return _STATUS[state]

    # ---- the thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        self._note("waiting for the model")
        try:
            with self.hold():
                self._held = True
                if self._cancel.is_set():
                    return
                self.holds_model = True
                try:
                    bundle = self.make_bundle()
                    if bundle.sample_fn is not None:
                        bundle.sample_fn = self._recording(bundle.sample_fn)
                    self.trainer = Trainer(self.cfg, bundle, log_fn=self._note)
                    if self._cancel.is_set():
                        self.trainer.cancel()
                    self.result = self.trainer.run(self._on_progress)
                finally:
                    self.holds_model = False
                    self._drop_trainer()
        except LoraError as e:
            self.error = e.message
        except Exception as e:  # the thread's only report is the UI: show any failure there, traceback to the log
            log.exception("training failed")
            self.error = f"{e.__class__.__name__}: {e}"
        if self.error:
            self._note("error: " + self.error)

    def _drop_trainer(self) -> None:
        """Free the network, optimizer, dataset and latents once the run is over; keep the loss curve."""
        t = self.trainer
        self.losses, self.val_losses = list(getattr(t, "losses", [])), list(getattr(t, "val_losses", []))
        self.trainer = None

    def _on_progress(self, p: Progress) -> None:
        if p.phase != "training" and (self.progress is None or p.phase != self.progress.phase):
            self._note(progress_line(p))
        self.progress = p
        if p.phase == "training":
            self.last_step = p
        self.hooks.progress(p)
        if self.hooks.stop_requested():
            self.cancel()

    def _note(self, message: str) -> None:
        with self._lock:
            self._log.append(time.strftime("%H:%M:%S ") + message)

    def _recording(self, sample_fn: Callable[[list[SamplePrompt], int], list]
                   ) -> Callable[[list[SamplePrompt], int], list]:
        def sample(prompts: list[SamplePrompt], step: int) -> list:
            images = sample_fn(prompts, step)
            with self._lock:
                self._samples.extend((img, f"step {step}: {p.prompt}") for img, p in zip(images, prompts))
                self._sample_count += len(images)
            if images:
                self.hooks.sample(images[-1])
            if self.hooks.stop_requested():
                self.cancel()
            return images
        return sample
