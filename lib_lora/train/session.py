"""One training run in a background thread, for a UI: start it, cancel it, and poll ``snapshot()``.

The caller supplies ``hold``, a context manager entered in the run's thread before anything touches the
model (the WebUI's queue lock), and ``make_bundle``, called inside it, so the model is taken only while held.
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
    status: str
    log: list[str]
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[tuple[object, str]] = field(default_factory=list)
    sample_count: int = 0
    result: TrainResult | None = None
    error: str | None = None


class Session:
    """``start()`` runs ``Trainer(cfg, make_bundle()).run()`` in a daemon thread inside ``hold()``."""

    def __init__(self, cfg: TrainConfig, make_bundle: Callable[[], ModelBundle],
                 hold: Callable[[], ContextManager] = contextlib.nullcontext, log_lines: int = 200,
                 keep_samples: int = 24):
        self.cfg = cfg
        self.make_bundle = make_bundle
        self.hold = hold
        self.holds_model = False
        self.trainer: Trainer | None = None
        self.progress: Progress | None = None
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
        return Snapshot(self.alive, self.status(), lines, list(getattr(t, "losses", self.losses)),
                        list(getattr(t, "val_losses", self.val_losses)), samples, count, self.result, self.error)

    def status(self) -> str:
        if self.error:
            return f"Failed: {self.error}"
        r = self.result
        if r is not None:
            if r.output is None:
                return "Cancelled before training started; nothing was saved."
            state = f"; resume from {r.state}" if r.state else ""
            return f"{'Cancelled' if r.cancelled else 'Finished'} at step {r.step}: saved {r.output}{state}"
        if not self.holds_model:
            if self.alive:
                return "Waiting for the WebUI's current job to finish..."
            return "Cancelled before training started; nothing was saved." if self._cancel.is_set() else ""
        if self.progress is None:
            return "Starting..."
        cancelling = " (cancelling after this step)" if self._cancel.is_set() else ""
        return progress_line(self.progress) + cancelling

    # ---- the thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        self._note("waiting for the model")
        try:
            with self.hold():
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
            return images
        return sample
