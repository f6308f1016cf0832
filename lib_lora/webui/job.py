"""Our long jobs (a training run, a tool) as jobs of the WebUI: they wait in its queue behind generations, and
while one runs, the WebUI's progress bar (through its task id), ``/sdapi/v1/progress`` (``shared.state``) and its
Interrupt follow it, as they follow its own embedding training (modules/textual_inversion/textual_inversion.py).
"""
from __future__ import annotations

import contextlib
import secrets
import time
from typing import Iterator

from modules import call_queue, progress, shared

from ..train import Progress
from ..train.session import RunHooks

TRAIN_JOB = "sdlora_train"  # shared.state.job while a run holds the model
TOOLS_JOB = "sdlora_tools_"  # + the tool's name, while a tool runs


class Interrupted(Exception):
    """Raised by a ``WebUIJob.ticker`` once the WebUI's Interrupt was pressed: the tool stops before writing."""


def new_task_id() -> str:
    """A task id like the page's own (``randomId()`` in progressbar.js), for jobs started through the API."""
    return f"task({secrets.token_hex(8)})"


def interrupted() -> bool:
    """Interrupt (or, from v1.9, *Interrupt after current*) was pressed for the running job."""
    return bool(shared.state.interrupted or getattr(shared.state, "stopping_generation", False))


class WebUIJob:
    """The running job's counts and text, as the WebUI shows them: ``job_no`` of ``job_count`` (the bar's
    fraction), ``textinfo`` (its label)."""

    def __init__(self, name: str):
        self.name = name

    def report(self, done: int, total: int, text: str) -> None:
        st = shared.state
        st.job, st.job_no, st.job_count, st.textinfo = self.name, done, total, text
        st.sampling_step = st.sampling_steps = 0  # a sample image's sampler left its own counts

    def ticker(self, title: str):
        """A tool's ``progress(done, total)``: reported as ``title: done/total``; raises Interrupted after an
        Interrupt."""
        def tick(done: int, total: int) -> None:
            self.report(done, total, f"{title}: {done}/{total}")
            if interrupted():
                raise Interrupted
        return tick


@contextlib.contextmanager
def webui_job(name: str, task_id: str | None = None) -> Iterator[WebUIJob]:
    """Hold the WebUI's queue for one job, as ``call_queue.wrap_gradio_gpu_call`` does for its own: queued under
    ``task_id`` until the lock is free, then the current task with a fresh ``shared.state``."""
    task = task_id or new_task_id()
    progress.add_task_to_queue(task)
    with call_queue.queue_lock:
        shared.state.begin(job=name)
        progress.start_task(task)
        try:
            yield WebUIJob(name)
        finally:
            progress.finish_task(task)
            shared.state.end()
            shared.state.skipped = shared.state.interrupted = shared.state.stopping_generation = False


def interrupt_tools() -> None:
    """Interrupt the running job if it is one of our tools (their Cancel must not stop anything else)."""
    if str(shared.state.job or "").startswith(TOOLS_JOB):
        shared.state.interrupt()


class TrainingJob(RunHooks):
    """A training run as the WebUI's job: the steps of this session as its counts, the phase as its text, the
    newest sample as its live preview, and its Interrupt as Cancel. The WebUI's ETA is elapsed time scaled by
    the fraction done, so its clock restarts at the first step: caching latents does not count."""

    def __init__(self, name: str):
        self.job = WebUIJob(TRAIN_JOB)
        self.name = name
        self.first_step: int | None = None  # the step this session started from (a resumed run's is not 0)
        self.clock_set = False
        self.last: Progress | None = None

    def progress(self, p: Progress) -> None:
        self.last = p
        if self.first_step is None:
            self.first_step = p.step - 1 if p.phase == "training" else p.step
        if p.phase == "training":
            text = f"step {p.step}/{p.total_steps}, loss {p.avg_loss:.4f}"
            if not self.clock_set and p.it_per_s:
                shared.state.time_start = time.time() - 1 / p.it_per_s  # when this step began
                self.clock_set = True
        else:
            text = p.message or p.phase
        self.job.report(p.step - self.first_step, p.total_steps - self.first_step, f"Training {self.name}: {text}")

    def sample(self, image) -> None:
        """The newest sample as the live preview; its txt2img counted its own batch in the WebUI's job counts,
        so ours are put back."""
        shared.state.assign_current_image(image)
        if self.last is not None:
            self.progress(self.last)

    def stop_requested(self) -> bool:
        return interrupted()
