"""The Trainer: a kohya-style LoRA training loop over a caller-supplied model, resumable and cancellable.

A run is reproducible from its seed: the network's initialisation, batch order, caption choices, flips,
noise and timesteps all come from seeded generators, and the saved state holds every generator that runs
on (noise, torch's RNG for dropout), so a resumed run continues exactly where the saved one stopped. The
process-wide torch RNG is forked, so the WebUI's own random state is left as it was.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from safetensors.torch import save_file

from ..errors import LoraError
from ..safetensors_io import read_state_dict
from .cache import LatentCache
from .config import TrainConfig
from .dataset import Dataset, ImageItem, View, with_affixes
from .distributed import Distributed
from .metadata import base_model_info, modelspec, training_metadata, write_network
from .model import (ModelBundle, NoiseSchedule, checkpoint_blocks, elementwise_loss, frozen, gradient_checkpointing,
                    pyramid_noise, sdxl_vector)
from .network import TrainNetwork
from .optim import build_optimizer, build_scheduler
from .plot import write_loss_curve
from .samples import read_prompts

log = logging.getLogger("sd-webui-lora")

STATE_VERSION = 2
VALIDATION_TIMESTEPS = (10, 350, 500, 650, 990)  # kohya's fixed validation timesteps
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Progress:
    """What a progress bar or the WebUI tab shows; ``phase`` is caching, training, saving, validating,
    sampling, done or cancelled."""

    phase: str
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    total_epochs: int = 0
    loss: float | None = None
    avg_loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    message: str = ""


def progress_line(p: Progress) -> str:
    """One line for a progress bar: step, epoch, loss, learning rate, speed and ETA while training."""
    if p.phase != "training":
        return f"[{p.phase}] {p.message}"
    eta = str(datetime.timedelta(seconds=int(p.eta_s or 0)))
    return (f"steps {p.step}/{p.total_steps} epoch {p.epoch}/{p.total_epochs} loss {p.loss:.4f} "
            f"avg {p.avg_loss:.4f} lr {p.lr:.2e} {p.it_per_s:.2f} it/s ETA {eta}")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the model's compute. None on CPU except bf16: torch 2.1 (the WebUI's) refuses
    any other CPU autocast dtype, even disabled."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None or (device.type == "cpu" and dtype is not torch.bfloat16):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler() -> torch.amp.GradScaler:
    """fp16 loss scaling on CUDA: ``torch.amp.GradScaler`` from torch 2.3, ``torch.cuda.amp``'s before (the
    WebUI's torch 2.1)."""
    return torch.amp.GradScaler("cuda") if hasattr(torch.amp, "GradScaler") else torch.cuda.amp.GradScaler()


def _to_device(tokens, device: torch.device):
    """Token tensors (or a list of them, one per text encoder) on the model's device."""
    if isinstance(tokens, torch.Tensor):
        return tokens.to(device)
    if isinstance(tokens, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in tokens):
        return type(tokens)(t.to(device) for t in tokens)
    return tokens


def _size_conditions(items: list[ImageItem], views: list[View] | None = None) -> torch.Tensor:
    """SDXL's micro-conditioning per image, as kohya computes it: original (h, w), the crop's (top, left) in
    the resized image, and the bucket (h, w)."""
    rows = []
    for i, view in zip(items, views or [View()] * len(items)):
        (w, h), (rw, rh), (bw, bh) = i.size, i.resized, i.bucket
        left, top = view.crop if view.crop is not None else ((rw - bw) // 2, (rh - bh) // 2)
        rows.append([h, w, top, left, bh, bw])
    return torch.tensor(rows, dtype=torch.float32)


def batch_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one batch's noise and timesteps: a function of its place in the run only, so resuming and
    splitting steps between processes draw exactly what an uninterrupted single process would."""
    return (seed * 1_000_003 + epoch * 65_537 + index) % (2**63 - 1)


@dataclass
class TrainResult:
    output: str | None
    state: str | None
    step: int
    cancelled: bool
    saved: list[str] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def file_stem(name: str, *, epoch: int | None = None, step: int | None = None) -> str:
    """kohya's file names: ``name-000004`` (epoch), ``name-step00000100`` (step), ``name`` (last)."""
    if epoch is not None:
        return f"{name}-{epoch:06d}"
    if step is not None:
        return f"{name}-step{step:08d}"
    return name


def overfit_warning(val: list[tuple[int, float]], train: list[tuple[int, float]]) -> str | None:
    """A warning when the last validation loss rose while the mean training loss since the previous
    validation fell, compared with the interval before it."""
    if len(val) < 2:
        return None
    (s0, v0), (s1, v1) = val[-2], val[-1]
    start = val[-3][0] if len(val) >= 3 else 0
    before = [x for s, x in train if start < s <= s0]
    after = [x for s, x in train if s0 < s <= s1]
    if not before or not after or v1 <= v0:
        return None
    tb, ta = sum(before) / len(before), sum(after) / len(after)
    if ta >= tb:
        return None
    return (f"validation loss rose from {v0:.5f} to {v1:.5f} (steps {s0} to {s1}) while training loss fell "
            f"from {tb:.5f} to {ta:.5f}: the network may be overfitting; an earlier save may be better")


class Trainer:
    """One training run: ``run(progress_callback)`` trains and saves; ``cancel()`` (from any thread) stops it
    at the next step boundary, saving a loadable network and a resumable state. ``dist`` places the run in a
    multi-process launch (see ``distributed``); only its first process logs, reports and writes files."""

    def __init__(self, config: TrainConfig, bundle: ModelBundle, log_fn: Callable[[str], None] | None = None,
                 dist: Distributed | None = None):
        config.validate()
        self.cfg = config
        self.bundle = bundle
        self.dist = dist or Distributed()
        self.log = (log_fn or log.info) if self.dist.main else (lambda m: None)
        self.network: TrainNetwork | None = None
        self.dataset: Dataset | None = None
        self.warnings: list[str] = []
        self._cancel = threading.Event()
        self._started = False

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _stop_requested(self) -> bool:
        """A cancel on any process stops them all at the same step."""
        if self.dist.any(self._cancel.is_set()):
            self._cancel.set()
        return self.cancelled

    # ---- the run ---------------------------------------------------------------------------------
    def run(self, progress_callback: Callable[[Progress], None] | None = None) -> TrainResult:
        if self._started:
            raise RuntimeError("a Trainer runs once; make a new one (with resume=...) to continue")
        self._started = True
        self._progress = (progress_callback if self.dist.main else None) or (lambda p: None)
        unet = self.bundle.unet
        param = next(unet.parameters())
        self.device, self.unet_dtype = param.device, param.dtype
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), frozen(self.bundle.sd_model):
            self._prepare()
            if self.dist.any(self._caching_cancelled):
                self._emit("cancelled", message="cancelled while caching latents; nothing was trained")
                return self._result(None, None, True)
            self.network.attach()
            try:
                with gradient_checkpointing(checkpoint_blocks(self.bundle), self.cfg.gradient_checkpointing):
                    return self._train()
            finally:
                self.network.detach()

    def _prepare(self) -> None:
        cfg = self.cfg
        state = self._read_state(cfg.resume) if cfg.resume else None
        self.seed = state["seed"] if state else (cfg.seed if cfg.seed is not None else random.randint(0, 2**31 - 1))
        self.seed = self.dist.broadcast_int(self.seed)
        if state and cfg.seed is not None and cfg.seed != self.seed:
            self._warn(f"resuming with the saved seed {self.seed}, not seed={cfg.seed}")
        torch.manual_seed(self.seed)
        self.dataset = Dataset(cfg, self.seed)
        for w in self.dataset.warnings:
            self._warn(w)
        if cfg.lr_scheduler == "constant" and cfg.lr_warmup_steps:
            self._warn("lr_scheduler constant ignores lr_warmup_steps; use constant_with_warmup")
        self.network = TrainNetwork(self.bundle.sd_model, cfg).to(self.device)
        for s in self.network.skipped:
            self._warn(s)
        if self.network.family == "sdxl" and max(cfg.resolution_wh()) < 1024:
            self._warn(f"SDXL was trained at 1024x1024; resolution {cfg.resolution} gives a network that is "
                       "weaker at SDXL's sizes (use 1024, max_bucket_reso 2048)")
        if cfg.network_weights:
            tensors, _ = read_state_dict(cfg.network_weights)
            n = self.network.load_kohya_state_dict(tensors, cfg.network_weights, strict=False)
            if not n:
                raise LoraError(cfg.network_weights, "no tensor matches this network's kohya key names",
                                "start from a file trained for this model family with the same network_algo")
            self.log(f"started from {n} tensors of {cfg.network_weights}")
        self.train_te = any(p != "unet" for p in self.network.parts.values())
        self.micro_per_step = cfg.gradient_accumulation_steps * self.dist.world
        self.steps_per_epoch = math.ceil(self.dataset.batches_per_epoch() / self.micro_per_step)
        self.total_steps = (cfg.max_train_epochs * self.steps_per_epoch if cfg.max_train_epochs else cfg.max_train_steps)
        self.total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        groups = self.network.param_groups(cfg.text_encoder_lr or cfg.learning_rate, cfg.unet_lr or cfg.learning_rate)
        self.optimizer, optimizer_name = build_optimizer(cfg, groups)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.total_steps)
        self.scaler = grad_scaler() if cfg.mixed_precision == "fp16" and self.device.type == "cuda" else None
        self.noise = NoiseSchedule(zero_terminal_snr=cfg.zero_terminal_snr)
        if cfg.zero_terminal_snr and not cfg.v_parameterization:
            self._warn("zero_terminal_snr with ε-prediction: the last timestep's target cannot be predicted; "
                       "it is meant for v_parameterization")
        self.step = 0
        self.losses: list[tuple[int, float]] = []
        self.val_losses: list[tuple[int, float]] = []
        self.session_id = random.Random().randint(0, 2**32)
        self.started_at = time.time()
        self.saved: list[str] = []
        self.cache = LatentCache(self.bundle.vae_encode, self.bundle.vae_id, cfg.cache_latents,
                                 (cfg.latent_cache_dir or os.path.join(cfg.train_data_dir, ".latent_cache"))
                                 if cfg.cache_latents_to_disk else None)
        if state:
            self._load_state(cfg.resume, state)
        self.dist.broadcast_params(list(self.network.parameters()))
        if cfg.pretrained_model_name_or_path and "ss_new_sd_model_hash" not in self.bundle.base_model_info:
            self.log(f"hashing {cfg.pretrained_model_name_or_path} for the metadata")
        self.metadata = training_metadata(
            cfg, self.dataset, family=self.network.family, optimizer=optimizer_name, num_epochs=self.total_epochs,
            processes=self.dist.world,
            total_steps=self.total_steps, session_id=self.session_id, started_at=self.started_at, seed=self.seed,
            base_info=base_model_info(cfg, self.bundle.base_model_info))
        self.metadata.update(modelspec(cfg, self.network.family, self.started_at))
        self.log(f"{self.dataset.num_train_images} training images with repeats, {self.dataset.num_reg_images} "
                 f"regularisation, {len(self.dataset.validation)} validation; {len(self.network.loras)} modules; "
                 f"{self.steps_per_epoch} steps per epoch, {self.total_steps} steps, seed {self.seed}")
        self._caching_cancelled = False
        if cfg.cache_latents:
            self._fill_cache()

    def _fill_cache(self) -> None:
        d = self.dataset
        jobs = [(i, View()) for i in d.train_items() + d.reg_items() + d.validation]
        if self.cfg.flip_aug:
            jobs += [(i, View(flip=True)) for i in d.train_items() + d.reg_items()]

        def progress(done: int, total: int) -> bool:
            self._emit("caching", message=f"caching latents {done}/{total}")
            if self.cancelled:
                self._caching_cancelled = True
                return False
            return True

        self.cache.fill(jobs, self.cfg.vae_batch_size, progress)
        hits = self.cache.hits
        self.log(f"latents: {hits['encoded']} encoded, {hits['disk']} from the disk cache")

    def _train(self) -> TrainResult:
        cfg = self.cfg
        rate = None
        while self.step < self.total_steps and not self._stop_requested():
            epoch = self.step // self.steps_per_epoch + 1
            batches = self.dataset.epoch_batches(self.seed, epoch)
            for s in range(self.step % self.steps_per_epoch, self.steps_per_epoch):
                if self._stop_requested() or self.step >= self.total_steps:
                    break
                t0 = time.perf_counter()
                first = s * self.micro_per_step
                indices = list(range(first, min(first + self.micro_per_step, len(batches))))
                loss = self._optimizer_step(batches, epoch, indices)
                self.step += 1
                self.losses.append((self.step, loss))
                dt = time.perf_counter() - t0
                rate = 1 / dt if rate is None else 0.9 * rate + 0.1 / dt
                recent = [x for _, x in self.losses[-50:]]
                self._emit("training", epoch=epoch, loss=loss, avg_loss=sum(recent) / len(recent),
                           lr=self.scheduler.get_last_lr()[-1], it_per_s=rate,
                           eta_s=(self.total_steps - self.step) / rate)
                last = self.step >= self.total_steps
                if cfg.validate_every_n_steps and self.step % cfg.validate_every_n_steps == 0:
                    self._validate()
                if cfg.sample_every_n_steps and self.step % cfg.sample_every_n_steps == 0:
                    self._sample(epoch)
                if cfg.save_every_n_steps and self.step % cfg.save_every_n_steps == 0 and not last:
                    self._save(file_stem(cfg.output_name, step=self.step), self.step // self.steps_per_epoch)
            if self.step % self.steps_per_epoch == 0 and self.step // self.steps_per_epoch == epoch:
                self._end_of_epoch(epoch)
        if self.cancelled:
            stem = file_stem(cfg.output_name, step=self.step)
            out, state = self._save(stem, self.step // self.steps_per_epoch)
            self._emit("cancelled", message=f"cancelled at step {self.step}; saved {out}")
            return self._result(out, state, True)
        out, state = self._save(file_stem(cfg.output_name), self.total_epochs)
        self._emit("done", message=f"saved {out}")
        return self._result(out, state, False)

    def _end_of_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        if cfg.validate_every_n_epochs and epoch % cfg.validate_every_n_epochs == 0 and not cfg.validate_every_n_steps:
            self._validate()
        if cfg.sample_every_n_epochs and epoch % cfg.sample_every_n_epochs == 0:
            self._sample(epoch)
        if cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0 and self.step < self.total_steps:
            self._save(file_stem(cfg.output_name, epoch=epoch), epoch)

    def _result(self, out: str | None, state: str | None, cancelled: bool) -> TrainResult:
        return TrainResult(out, state, self.step, cancelled, list(self.saved), list(self.losses),
                           list(self.val_losses), list(self.warnings))

    # ---- one step ----------------------------------------------------------------------------------
    def _optimizer_step(self, batches: list[list[ImageItem]], epoch: int, indices: list[int]) -> float:
        """One optimizer step over the epoch's batches ``indices`` (this process's share of them); the loss
        is the mean over all of them, so the step does not depend on how they are split between processes."""
        self.network.train()
        total = 0.0
        for b in self.dist.my_share(indices):
            batch = batches[b]
            captions, views = self.dataset.batch_choices(batch, self.seed, epoch, b)
            latents = self.cache.get(batch, views).to(self.device)
            weights = torch.tensor([self.cfg.prior_loss_weight if i.is_reg else 1.0 for i in batch], device=self.device)
            gen = torch.Generator().manual_seed(batch_seed(self.seed, epoch, b))
            timesteps = torch.randint(0, self.noise.steps, (len(batch),), generator=gen)
            noise = self._noise_like(latents, gen)
            perturbed = None
            if self.cfg.ip_noise_gamma:
                perturbed = noise + self.cfg.ip_noise_gamma * torch.randn(latents.shape, generator=gen).to(self.device)
            loss = self._loss(latents, batch, captions, timesteps, noise, weights, train=True, input_noise=perturbed,
                              views=views)
            scaled = loss / len(indices)
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += float(loss.detach())
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.dist.sum_gradients(params)
        total = self.dist.sum(total)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(indices)

    def _noise_like(self, latents: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=gen)
        if self.cfg.noise_offset:
            noise = noise + self.cfg.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=gen)
        if self.cfg.multires_noise_iterations:
            noise = pyramid_noise(noise, gen, self.cfg.multires_noise_iterations, self.cfg.multires_noise_discount)
        return noise.to(self.device)

    def _loss(self, latents: torch.Tensor, items: list[ImageItem], captions: list[str], timesteps: torch.Tensor,
              noise: torch.Tensor, weights: torch.Tensor, train: bool,
              input_noise: torch.Tensor | None = None, views: list[View] | None = None) -> torch.Tensor:
        """The weighted mean loss of the UNet's prediction (ε or v) for these latents, noise and timesteps;
        ``input_noise`` (input perturbation) replaces the noise in the UNet's input only."""
        cfg = self.cfg
        tokens = _to_device(self.bundle.tokenize(captions), self.device)
        with autocast(self.device, cfg.mixed_precision):
            with torch.set_grad_enabled(train and self.train_te):
                cond = self.bundle.encode_text(tokens)
            extra = {}
            if isinstance(cond, tuple):
                cond, pooled = cond
                extra["y"] = sdxl_vector(pooled, _size_conditions(items, views)).to(self.unet_dtype)
            noisy = self.noise.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
            pred = self.bundle.unet(noisy.to(self.unet_dtype), timesteps.to(self.device), cond.to(self.unet_dtype),
                                    **extra)
        target = self.noise.velocity(latents, noise, timesteps) if cfg.v_parameterization else noise
        huber_c = (self.noise.huber_threshold(timesteps, cfg.huber_schedule, cfg.huber_c)
                   if cfg.loss_type in ("huber", "smooth_l1") else None)
        loss = elementwise_loss(pred.float(), target.float(), cfg.loss_type, huber_c).mean(dim=(1, 2, 3)) * weights
        snr_weight = self.noise.loss_weight(timesteps, cfg.min_snr_gamma, cfg.v_parameterization,
                                            cfg.debiased_estimation_loss)
        if snr_weight is not None:
            loss = loss * snr_weight.to(loss.device)
        return loss.mean()

    # ---- validation and samples --------------------------------------------------------------------
    def _validate(self) -> None:
        """Mean loss over the held-out images at fixed noise and timesteps, so values are comparable."""
        items = self.dataset.validation
        if not items:
            return
        if not self.dist.main:
            self.dist.barrier()
            return
        self._emit("validating", message=f"validation loss on {len(items)} images")
        self.network.eval()
        seed = self.cfg.validation_seed if self.cfg.validation_seed is not None else self.seed
        gen = torch.Generator().manual_seed(seed)
        t = torch.tensor(VALIDATION_TIMESTEPS)
        total = 0.0
        with torch.no_grad():
            for item in items:
                latent = self.cache.get([item], [View()]).to(self.device).expand(len(t), -1, -1, -1)
                noise = self._noise_like(latent, gen)
                ones = torch.ones(len(t), device=self.device)
                caption = with_affixes(item.caption, self.cfg)
                total += float(self._loss(latent, [item] * len(t), [caption] * len(t), t, noise, ones, train=False))
        value = total / len(items)
        self.val_losses.append((self.step, value))
        self.log(f"step {self.step}: validation loss {value:.5f}")
        warning = overfit_warning(self.val_losses, self.losses)
        if warning:
            self._warn(warning)
        self.dist.barrier()

    def _sample(self, epoch: int) -> None:
        """Sample images through the caller's ``sample_fn`` (the trainer has no sampler of its own)."""
        fn, path = self.bundle.sample_fn, self.cfg.sample_prompts
        if fn is None or not path or not self.dist.main:
            return
        prompts = read_prompts(path)
        self._emit("sampling", epoch=epoch, message=f"{len(prompts)} sample images")
        self.network.eval()
        with torch.no_grad():
            images = fn(prompts, self.step)
        folder = os.path.join(self.cfg.output_dir, "sample")
        os.makedirs(folder, exist_ok=True)
        for i, img in enumerate(images):
            img.save(os.path.join(folder, f"{self.cfg.output_name}_{self.step:06d}_{i:02d}.png"))

    # ---- saving and resuming ---------------------------------------------------------------------
    def _save(self, stem: str, epoch: int) -> tuple[str, str | None]:
        cfg = self.cfg
        self._emit("saving", message=f"saving {stem}")
        os.makedirs(cfg.output_dir, exist_ok=True)
        path = os.path.join(cfg.output_dir, stem + ".safetensors")
        state = os.path.join(cfg.output_dir, stem + "-state") if cfg.save_state else None
        if not self.dist.main:
            self.dist.barrier()
            return path, state
        metadata = dict(self.metadata, ss_training_finished_at=str(time.time()), ss_steps=str(self.step),
                        ss_epoch=str(epoch))
        write_network(path, self.network.kohya_state_dict(SAVE_DTYPES[cfg.save_precision]), metadata)
        self.saved.append(path)
        if state:
            self._write_state(state)
        write_loss_curve(os.path.join(cfg.output_dir, cfg.output_name + "-loss.png"), self.losses, self.val_losses,
                         f"{cfg.output_name}: step {self.step}/{self.total_steps}")
        self.log(f"saved {path}")
        self.dist.barrier()
        return path, state

    def _write_state(self, folder: str) -> None:
        """network + optimizer + scheduler + RNG states + counters; written to a temp folder that replaces
        ``folder`` only once complete (``train_state.json`` last), so a crash never leaves half a state."""
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file(self.network.kohya_state_dict(), os.path.join(tmp, "network.safetensors"))
        torch.save({
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }, os.path.join(tmp, "optimizer.pt"))
        info = {"version": STATE_VERSION, "step": self.step, "seed": self.seed, "session_id": self.session_id,
                "training_started_at": self.started_at, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "losses": self.losses, "val_losses": self.val_losses,
                "processes": self.dist.world,
                "config": self.cfg.to_dict()}
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

    @staticmethod
    def _read_state(folder: str) -> dict:
        path = os.path.join(folder, "train_state.json")
        if not os.path.isfile(path):
            raise LoraError(folder, "is not a training state (no train_state.json)",
                            "resume from a '<name>-...-state' folder written by a run with save_state")
        try:
            with open(path, encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, ValueError) as e:
            raise LoraError(path, f"unreadable training state ({e.__class__.__name__})",
                            "resume from another state") from None
        if info.get("version") != STATE_VERSION:
            raise LoraError(path, f"training state version {info.get('version')} is not {STATE_VERSION}",
                            "it was written by another version of this trainer")
        return info

    def _load_state(self, folder: str, info: dict) -> None:
        self.network.load_kohya_state_dict(read_state_dict(os.path.join(folder, "network.safetensors"))[0], folder)
        blob = torch.load(os.path.join(folder, "optimizer.pt"), map_location="cpu", weights_only=True)
        try:
            self.optimizer.load_state_dict(blob["optimizer"])
        except (ValueError, KeyError) as e:
            raise LoraError(folder, f"optimizer state does not fit ({e})", "resume with the same optimizer_type") from None
        self.scheduler.load_state_dict(blob["scheduler"])
        if self.scaler and blob["scaler"]:
            self.scaler.load_state_dict(blob["scaler"])
        torch.set_rng_state(blob["torch_rng"])
        if self.device.type == "cuda" and blob["cuda_rng"] is not None:
            torch.cuda.set_rng_state(blob["cuda_rng"], self.device)
        self.step = int(info["step"])
        self.losses = [tuple(x) for x in info["losses"]]
        self.val_losses = [tuple(x) for x in info["val_losses"]]
        self.session_id = int(info["session_id"])
        self.started_at = float(info["training_started_at"])
        if info.get("processes", 1) != self.dist.world:
            self._warn(f"the saved run used {info.get('processes', 1)} processes, this one {self.dist.world}: "
                       "steps now hold a different number of batches")
        elif info["steps_per_epoch"] != self.steps_per_epoch:
            self._warn(f"the dataset now gives {self.steps_per_epoch} steps per epoch, the saved run had "
                       f"{info['steps_per_epoch']}: batches will not match the interrupted run")
        if self.step >= self.total_steps:
            self._warn(f"the state is at step {self.step}, already at max_train_steps {self.total_steps}")
        self.log(f"resumed from {folder} at step {self.step}")

    # ---- reporting ---------------------------------------------------------------------------------
    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        self.log("warning: " + message)

    def _emit(self, phase: str, **kw) -> None:
        kw.setdefault("epoch", min(self.step // self.steps_per_epoch + 1, self.total_epochs))
        self._progress(Progress(phase, step=self.step, total_steps=self.total_steps, total_epochs=self.total_epochs, **kw))
