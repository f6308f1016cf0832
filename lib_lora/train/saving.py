"""Saving a run: network files with kohya's names and metadata, resumable states, the loss curve, kohya's
``save_last_n_*`` pruning; and resuming from a state.

A state folder holds the network, the optimizer / scheduler / scaler states and every RNG that runs on, and
``train_state.json`` (counters, losses, the config); it is written to a temporary folder that replaces the old
one only when complete (``train_state.json`` last), so a crash never leaves half a state.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from ..errors import LoraError
from ..safetensors_io import read_state_dict
from .metadata import SAVE_DTYPES, minimum, modelspec, write_network
from .plot import write_loss_curve

if TYPE_CHECKING:
    from .loop import Trainer

STATE_VERSION = 2


def file_stem(name: str, *, epoch: int | None = None, step: int | None = None) -> str:
    """kohya's file names: ``name-000004`` (epoch), ``name-step00000100`` (step), ``name`` (last)."""
    if epoch is not None:
        return f"{name}-{epoch:06d}"
    if step is not None:
        return f"{name}-step{step:08d}"
    return name


def save(t: Trainer, stem: str, epoch: int) -> tuple[str, str | None]:
    """The network file ``<stem>.safetensors`` (and its state, with save_state), the loss curve; only the first
    process writes, the others wait for it."""
    cfg = t.cfg
    t.emit("saving", message=f"saving {stem}")
    os.makedirs(cfg.output_dir, exist_ok=True)
    path = os.path.join(cfg.output_dir, stem + ".safetensors")
    state = os.path.join(cfg.output_dir, stem + "-state") if cfg.save_state else None
    if not t.dist.main:
        t.dist.barrier()
        return path, state
    now = time.time()
    metadata = dict(t.metadata, ss_training_finished_at=str(now), ss_steps=str(t.step), ss_epoch=str(epoch))
    if cfg.no_metadata:
        metadata = minimum(metadata)
    metadata.update(modelspec(cfg, t.network.family, now, t.version))
    write_network(path, t.network.kohya_state_dict(SAVE_DTYPES[cfg.save_precision]), metadata)
    t.saved.append(path)
    if state:
        write_state(t, state)
    write_loss_curve(os.path.join(cfg.output_dir, cfg.output_name + "-loss.png"), t.losses, t.val_losses,
                     f"{cfg.output_name}: step {t.step}/{t.plan.total_steps}")
    t.log(f"saved {path}")
    t.dist.barrier()
    return path, state


def prune(t: Trainer, *, epoch: int | None = None, step: int | None = None) -> None:
    """kohya's ``save_last_n_epochs`` / ``save_last_n_steps`` (and their ``_state`` forms): remove the file (and
    state) that fell out of the window after saving this epoch or step."""
    cfg = t.cfg
    if not t.dist.main:
        return
    if epoch is not None:
        every = t.plan.save_every_n_epochs or 1
        for keep, kind in ((cfg.save_last_n_epochs, "file"), (cfg.save_last_n_epochs_state or cfg.save_last_n_epochs, "state")):
            if keep and epoch - every * keep > 0:
                _remove(cfg.output_dir, file_stem(cfg.output_name, epoch=epoch - every * keep), kind)
    if step is not None and cfg.save_every_n_steps:
        for keep, kind in ((cfg.save_last_n_steps, "file"), (cfg.save_last_n_steps_state or cfg.save_last_n_steps, "state")):
            if keep:
                old = step - keep - 1
                old -= old % cfg.save_every_n_steps
                if old > 0:
                    _remove(cfg.output_dir, file_stem(cfg.output_name, step=old), kind)


def _remove(folder: str, stem: str, kind: str) -> None:
    if kind == "file":
        path = os.path.join(folder, stem + ".safetensors")
        if os.path.isfile(path):
            os.remove(path)
    else:
        shutil.rmtree(os.path.join(folder, stem + "-state"), ignore_errors=True)


def write_state(t: Trainer, folder: str) -> None:
    """network + optimizer + scheduler + RNG states + counters, written to a temp folder first."""
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(t.network.kohya_state_dict(), os.path.join(tmp, "network.safetensors"))
    torch.save({
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler else None,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(t.device) if t.device.type == "cuda" else None,
    }, os.path.join(tmp, "optimizer.pt"))
    info = {"version": STATE_VERSION, "step": t.step, "seed": t.seed, "session_id": t.session_id,
            "training_started_at": t.started_at, "steps_per_epoch": t.plan.steps_per_epoch,
            "total_steps": t.plan.total_steps, "losses": t.losses, "val_losses": t.val_losses,
            "processes": t.dist.world, "config": t.cfg.to_dict()}
    with open(os.path.join(tmp, "train_state.json"), "w", encoding="utf-8") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    old = folder + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def read_state(folder: str) -> dict:
    """The counters of a state folder (``train_state.json``), checked."""
    path = os.path.join(folder, "train_state.json")
    if not os.path.isfile(path):
        raise LoraError(folder, "is not a training state (no train_state.json)",
                        "resume from a '<name>-...-state' folder written by a run with save_state")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise LoraError(path, f"unreadable training state ({e.__class__.__name__})", "resume from another state") from None
    if info.get("version") != STATE_VERSION:
        raise LoraError(path, f"training state version {info.get('version')} is not {STATE_VERSION}",
                        "it was written by another version of this trainer")
    return info


def load_state(t: Trainer, folder: str, info: dict) -> None:
    """The network, optimizer, scheduler, scaler, RNGs and counters of a state into the trainer."""
    t.network.load_kohya_state_dict(read_state_dict(os.path.join(folder, "network.safetensors"))[0], folder)
    blob = torch.load(os.path.join(folder, "optimizer.pt"), map_location="cpu", weights_only=True)
    try:
        t.optimizer.load_state_dict(blob["optimizer"])
    except (ValueError, KeyError) as e:
        raise LoraError(folder, f"optimizer state does not fit ({e})", "resume with the same optimizer_type") from None
    t.scheduler.load_state_dict(blob["scheduler"])
    if t.scaler and blob["scaler"]:
        t.scaler.load_state_dict(blob["scaler"])
    torch.set_rng_state(blob["torch_rng"])
    if t.device.type == "cuda" and blob["cuda_rng"] is not None:
        torch.cuda.set_rng_state(blob["cuda_rng"], t.device)
    t.step = int(info["step"])
    t.losses = [tuple(x) for x in info["losses"]]
    t.val_losses = [tuple(x) for x in info["val_losses"]]
    t.session_id = int(info["session_id"])
    t.started_at = float(info["training_started_at"])
    if info.get("processes", 1) != t.dist.world:
        t.warn(f"the saved run used {info.get('processes', 1)} processes, this one {t.dist.world}: "
               "steps now hold a different number of batches")
    elif info["steps_per_epoch"] != t.plan.steps_per_epoch:
        t.warn(f"the dataset now gives {t.plan.steps_per_epoch} steps per epoch, the saved run had "
               f"{info['steps_per_epoch']}: batches will not match the interrupted run")
    if t.step >= t.plan.total_steps:
        t.warn(f"the state is at step {t.step}, already at max_train_steps {t.plan.total_steps}")
    t.log(f"resumed from {folder} at step {t.step}")
