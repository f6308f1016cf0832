"""kohya's ``--logging_dir``: the run's loss, learning rates, validation loss and sample images as TensorBoard
event files (``tensorboard``'s writer, through ``torch.utils.tensorboard``), or, when tensorboard is not
installed, as a CSV file with a note saying so.

The folder is kohya's: ``<logging_dir>/<log_prefix><YYYYmmddHHMMSS>/<log_tracker_name or network_train>``, and the
tags are kohya's (``loss/current``, ``loss/average``, ``lr/textencoder``, ``lr/unet``, ``loss/epoch_average``,
``loss/validation/...``).
"""
from __future__ import annotations

import csv
import os
import time
from typing import Callable

import numpy as np

from .config import TrainConfig


def tensorboard_writer(folder: str):
    """torch's SummaryWriter, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(folder)


class RunLog:
    """Scalars and images of one run; does nothing without ``logging_dir``."""

    def __init__(self, cfg: TrainConfig, note: Callable[[str], None]):
        self.folder: str | None = None
        self.writer = None
        self.csv_path: str | None = None
        if not cfg.logging_dir:
            return
        if cfg.log_with in ("wandb", "all"):
            note("log_with wandb: Weights & Biases is not supported here; logging to TensorBoard files only")
        run = (cfg.log_prefix or "") + time.strftime("%Y%m%d%H%M%S", time.localtime())
        self.folder = os.path.join(cfg.logging_dir, run, cfg.log_tracker_name or "network_train")
        os.makedirs(self.folder, exist_ok=True)
        self.writer = tensorboard_writer(self.folder)
        if self.writer is None:
            self.csv_path = os.path.join(self.folder, "scalars.csv")
            with open(self.csv_path, "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerow(["step", "tag", "value", "wall_time"])
            note(f"tensorboard is not installed: logging to {self.csv_path} instead of TensorBoard files")

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        elif self.csv_path:
            now = time.time()
            with open(self.csv_path, "a", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows([step, tag, value, now] for tag, value in values.items())

    def images(self, images: list, captions: list[str], step: int) -> None:
        """Sample images (PIL) under ``samples/<n>`` (TensorBoard only; the PNGs are in output_dir/sample)."""
        if self.writer is None:
            return
        for n, (img, caption) in enumerate(zip(images, captions)):
            self.writer.add_image(f"samples/{n}", np.asarray(img.convert("RGB")), step, dataformats="HWC")
            self.writer.add_text(f"samples/{n}/prompt", caption, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
