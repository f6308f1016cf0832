"""The Trainer: a kohya-style LoRA training loop over a caller-supplied model, resumable and cancellable.

A run is reproducible from its seed: the network's initialisation, batch order, caption choices, flips,
noise and timesteps all come from seeded generators, and the saved state holds every generator that runs
on (noise, torch's RNG for dropout), so a resumed run continues exactly where the saved one stopped. The
process-wide torch RNG is forked, so the WebUI's own random state is left as it was.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..errors import LoraError
from ..network import load as load_network
from ..patcher import Patcher, Use
from ..safetensors_io import read_state_dict
from .attention import using_attention
from .cache import LatentCache
from .config import TrainConfig
from .dataset import Dataset, ImageItem, View, with_affixes
from .distributed import Distributed
from .logs import RunLog
from .metadata import base_model_info, implementation_version, training_metadata
from .model import (ModelBundle, NoiseSchedule, checkpoint_blocks, elementwise_loss, frozen, gradient_checkpointing,
                    pyramid_noise, sdxl_vector)
from .optim import build_optimizer, build_scheduler, max_norm_
from .samples import read_prompts
from .saving import file_stem, load_state, prune, read_state, save
from .trainable import TrainNetwork

log = logging.getLogger("sd-webui-lora")

VALIDATION_TIMESTEPS = (10, 350, 500, 650, 990)  # kohya's fixed validation timesteps
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


@dataclass
class Plan:
    """The run's shape in optimizer steps: batches per step (accumulation × processes), steps per epoch, total
    steps and epochs, and how often to save by epoch."""

    micro_per_step: int
    steps_per_epoch: int
    total_steps: int
    total_epochs: int
    save_every_n_epochs: int | None


def plan_steps(cfg: TrainConfig, dataset: Dataset, processes: int) -> Plan:
    micro = cfg.gradient_accumulation_steps * processes
    per_epoch = math.ceil(dataset.batches_per_epoch() / micro)
    total = cfg.max_train_epochs * per_epoch if cfg.max_train_epochs else cfg.max_train_steps
    epochs = math.ceil(total / per_epoch)
    every = cfg.save_every_n_epochs
    if cfg.save_n_epoch_ratio:
        every = math.floor(epochs / cfg.save_n_epoch_ratio) or 1  # kohya: about that many epoch files in all
    return Plan(micro, per_epoch, total, epochs, every)


class Trainer:
    """One training run: ``run(progress_callback)`` trains and saves; ``cancel()`` (from any thread) stops it
    at the next step boundary, saving a loadable network and a resumable state. ``dist`` places the run in a
    multi-process launch (see ``distributed``); only its first process logs, reports and writes files.

    A run goes options → data and plan → network → optimiser → loop, each a method below; saving and resuming
    are in ``saving``."""

    def __init__(self, config: TrainConfig, bundle: ModelBundle, log_fn: Callable[[str], None] | None = None,
                 dist: Distributed | None = None):
        config.validate()
        self.cfg = config
        self.bundle = bundle
        self.dist = dist or Distributed()
        self.log = (log_fn or log.info) if self.dist.main else (lambda m: None)
        self.warnings: list[str] = []
        self.dataset: Dataset | None = None
        self.plan: Plan | None = None
        self.network: TrainNetwork | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_name = ""
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.scaler = None
        self.cache: LatentCache | None = None
        self.noise = NoiseSchedule(zero_terminal_snr=config.zero_terminal_snr)
        self.run_log: RunLog | None = None
        self.device = torch.device("cpu")
        self.unet_dtype = torch.float32
        self.seed = 0
        self.step = 0
        self.train_te = False
        self.losses: list[tuple[int, float]] = []
        self.val_losses: list[tuple[int, float]] = []
        self.saved: list[str] = []
        self.metadata: dict[str, str] = {}
        self.version = ""
        self.session_id = random.Random().randint(0, 2**32)
        self.started_at = time.time()
        self._progress: Callable[[Progress], None] = lambda p: None
        self._caching_cancelled = False
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
        cfg = self.cfg
        unet = self.bundle.unet
        param = next(unet.parameters())
        self.device, self.unet_dtype = param.device, param.dtype
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), frozen(self.bundle.sd_model), \
                using_attention(unet, cfg.attention) as switched, self._base_weights():
            if switched:
                self.log(f"attention: {cfg.attention} in {switched} UNet attention modules")
            state = read_state(cfg.resume) if cfg.resume else None
            self._seed(state)
            self._data()
            self._network()
            self._optimiser()
            if state:
                load_state(self, cfg.resume, state)
            self.dist.broadcast_params(list(self.network.parameters()))
            self._describe()
            if cfg.cache_latents:
                self._fill_cache()
            if self.dist.any(self._caching_cancelled):
                self.emit("cancelled", message="cancelled while caching latents; nothing was trained")
                return self._result(None, None, True)
            self.run_log = RunLog(cfg, self.log) if self.dist.main else None
            self.network.attach()
            try:
                with gradient_checkpointing(checkpoint_blocks(self.bundle), cfg.gradient_checkpointing):
                    return self._train()
            finally:
                self.network.detach()
                if self.run_log:
                    self.run_log.close()

    def _seed(self, state: dict | None) -> None:
        cfg = self.cfg
        seed = state["seed"] if state else (cfg.seed if cfg.seed is not None else random.randint(0, 2**31 - 1))
        self.seed = self.dist.broadcast_int(seed)
        if state and cfg.seed is not None and cfg.seed != self.seed:
            self.warn(f"resuming with the saved seed {self.seed}, not seed={cfg.seed}")
        torch.manual_seed(self.seed)

    def _data(self) -> None:
        """The images (folders, in_json or kohya's dataset TOML), the plan of steps, the latent cache."""
        cfg = self.cfg
        self.dataset = Dataset(cfg, self.seed)
        for w in self.dataset.warnings:
            self.warn(w)
        for n in self.dataset.notes:
            self.log("note: " + n)
        for s in self.dataset.subsets + self.dataset.reg_subsets:
            if (s.random_crop or s.color_aug) and (cfg.cache_latents or cfg.cache_latents_to_disk):
                raise LoraError(s.path, "random_crop / color_aug need cache_latents and cache_latents_to_disk off",
                                "a cached latent is one fixed view")
        self.plan = plan_steps(cfg, self.dataset, self.dist.world)
        self.cache = LatentCache(self.bundle.vae_encode, self.bundle.vae_id, cfg.cache_latents,
                                 (cfg.latent_cache_dir or os.path.join(cfg.train_data_dir or cfg.output_dir,
                                                                       ".latent_cache"))
                                 if cfg.cache_latents_to_disk else None)

    def _network(self) -> None:
        """The trainable modules on the model (from network_weights when given)."""
        cfg = self.cfg
        if cfg.dim_from_weights:
            if not cfg.network_weights:
                raise LoraError(None, "dim_from_weights needs network_weights", "give the network file to start from")
            source = load_network(cfg.network_weights)
            cfg.network_dim, cfg.network_alpha = int(source.rank), float(source.alpha)
            self.log(f"network_dim {cfg.network_dim}, network_alpha {cfg.network_alpha} from {cfg.network_weights}")
        self.network = TrainNetwork(self.bundle.sd_model, cfg).to(self.device)
        for s in self.network.skipped:
            self.warn(s)
        if self.network.family == "sdxl" and max(cfg.resolution_wh()) < 1024:
            self.warn(f"SDXL was trained at 1024x1024; resolution {cfg.resolution} gives a network that is "
                      "weaker at SDXL's sizes (use 1024, max_bucket_reso 2048)")
        if self.network.family == "sdxl" and cfg.clip_skip is not None:
            self.warn("clip_skip does nothing on SDXL (its text encoders use fixed layers, as in kohya's trainer)")
        if cfg.network_weights:
            tensors, _ = read_state_dict(cfg.network_weights)
            n = self.network.load_kohya_state_dict(tensors, cfg.network_weights, strict=False)
            if not n:
                raise LoraError(cfg.network_weights, "no tensor matches this network's kohya key names",
                                "start from a file trained for this model family with the same network_algo")
            self.log(f"started from {n} tensors of {cfg.network_weights}")
        if cfg.scale_weight_norms and cfg.network_algo != "lora":
            self.warn("scale_weight_norms works on LoRA modules only; it is off for this network")
        self.train_te = any(p != "unet" for p in self.network.parts.values())

    def _optimiser(self) -> None:
        cfg = self.cfg
        groups = self.network.param_groups(cfg.text_encoder_lr or cfg.learning_rate, cfg.unet_lr or cfg.learning_rate)
        self.optimizer, self.optimizer_name = build_optimizer(cfg, groups)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.plan.total_steps)
        self.scaler = grad_scaler() if cfg.mixed_precision == "fp16" and self.device.type == "cuda" else None
        if cfg.lr_scheduler == "constant" and cfg.lr_warmup_steps:
            self.warn("lr_scheduler constant ignores lr_warmup_steps; use constant_with_warmup")
        if cfg.zero_terminal_snr and not cfg.v_parameterization:
            self.warn("zero_terminal_snr with ε-prediction: the last timestep's target cannot be predicted; "
                      "it is meant for v_parameterization")

    @contextlib.contextmanager
    def _base_weights(self) -> Iterator[None]:
        """kohya's ``base_weights``: networks merged into the model for the run, taken out afterwards."""
        cfg = self.cfg
        if not cfg.base_weights:
            yield
            return
        patcher = Patcher(self.bundle.sd_model)
        uses = [Use(load_network(p), te=m, unet=m) for p, m in zip(cfg.base_weights, cfg.base_weight_multipliers())]
        result = patcher.apply(uses, mode="merge")
        if result.errors or result.skipped:
            patcher.restore()
            problem = (result.errors or result.skipped)[0]
            raise LoraError(None, f"base_weights could not be merged: {problem}", "use networks of this model family")
        self.log(f"merged {len(uses)} base_weights networks for the run")
        try:
            yield
        finally:
            patcher.restore()

    def _describe(self) -> None:
        cfg, d, plan = self.cfg, self.dataset, self.plan
        if cfg.pretrained_model_name_or_path and "ss_new_sd_model_hash" not in self.bundle.base_model_info:
            self.log(f"hashing {cfg.pretrained_model_name_or_path} for the metadata")
        self.version = implementation_version()
        self.metadata = training_metadata(
            cfg, d, family=self.network.family, optimizer=self.optimizer_name, num_epochs=plan.total_epochs,
            processes=self.dist.world, total_steps=plan.total_steps, session_id=self.session_id,
            started_at=self.started_at, seed=self.seed, base_info=base_model_info(cfg, self.bundle.base_model_info))
        self.log(f"{d.num_train_images} training images with repeats, {d.num_reg_images} regularisation, "
                 f"{len(d.validation)} validation; {len(self.network.loras)} modules; {plan.steps_per_epoch} steps "
                 f"per epoch, {plan.total_steps} steps, seed {self.seed}")

    def _fill_cache(self) -> None:
        d = self.dataset
        jobs = [(i, View()) for i in d.train_items() + d.reg_items() + d.validation]
        jobs += [(i, View(flip=True)) for i in d.train_items() + d.reg_items() if i.subset and i.subset.flip_aug]

        def progress(done: int, total: int) -> bool:
            self.emit("caching", message=f"caching latents {done}/{total}")
            if self.cancelled:
                self._caching_cancelled = True
                return False
            return True

        self.cache.fill(jobs, self.cfg.vae_batch_size, progress)
        hits = self.cache.hits
        self.log(f"latents: {hits['encoded']} encoded, {hits['disk']} from the disk cache")

    # ---- the loop -------------------------------------------------------------------------------------
    def _train(self) -> TrainResult:
        cfg, plan = self.cfg, self.plan
        rate = None
        if cfg.sample_at_first and self.step == 0:
            self._sample(0)
        while self.step < plan.total_steps and not self._stop_requested():
            epoch = self.step // plan.steps_per_epoch + 1
            batches = self.dataset.epoch_batches(self.seed, epoch)
            for s in range(self.step % plan.steps_per_epoch, plan.steps_per_epoch):
                if self._stop_requested() or self.step >= plan.total_steps:
                    break
                t0 = time.perf_counter()
                first = s * plan.micro_per_step
                indices = list(range(first, min(first + plan.micro_per_step, len(batches))))
                loss = self._optimizer_step(batches, epoch, indices)
                self.step += 1
                self.losses.append((self.step, loss))
                dt = time.perf_counter() - t0
                rate = 1 / dt if rate is None else 0.9 * rate + 0.1 / dt
                recent = [x for _, x in self.losses[-50:]]
                lrs = self.scheduler.get_last_lr()
                self.emit("training", epoch=epoch, loss=loss, avg_loss=sum(recent) / len(recent), lr=lrs[-1],
                          it_per_s=rate, eta_s=(plan.total_steps - self.step) / rate)
                self._log_step(loss, sum(recent) / len(recent), lrs)
                last = self.step >= plan.total_steps
                if cfg.validate_every_n_steps and self.step % cfg.validate_every_n_steps == 0:
                    self._validate()
                if cfg.sample_every_n_steps and self.step % cfg.sample_every_n_steps == 0:
                    self._sample(epoch)
                if cfg.save_every_n_steps and self.step % cfg.save_every_n_steps == 0 and not last:
                    save(self, file_stem(cfg.output_name, step=self.step), self.step // plan.steps_per_epoch)
                    prune(self, step=self.step)
            if self.step % plan.steps_per_epoch == 0 and self.step // plan.steps_per_epoch == epoch:
                self._end_of_epoch(epoch)
        if self.cancelled:
            out, state = save(self, file_stem(cfg.output_name, step=self.step), self.step // plan.steps_per_epoch)
            self.emit("cancelled", message=f"cancelled at step {self.step}; saved {out}")
            return self._result(out, state, True)
        out, state = save(self, file_stem(cfg.output_name), plan.total_epochs)
        self.emit("done", message=f"saved {out}")
        return self._result(out, state, False)

    def _end_of_epoch(self, epoch: int) -> None:
        cfg, plan = self.cfg, self.plan
        epoch_losses = [x for s, x in self.losses if (epoch - 1) * plan.steps_per_epoch < s <= epoch * plan.steps_per_epoch]
        if self.run_log and epoch_losses:
            self.run_log.scalars({"loss/epoch_average": sum(epoch_losses) / len(epoch_losses)}, epoch)
        if epoch % (cfg.validate_every_n_epochs or 1) == 0 and not cfg.validate_every_n_steps:
            self._validate()
        if cfg.sample_every_n_epochs and epoch % cfg.sample_every_n_epochs == 0:
            self._sample(epoch)
        if plan.save_every_n_epochs and epoch % plan.save_every_n_epochs == 0 and self.step < plan.total_steps:
            save(self, file_stem(cfg.output_name, epoch=epoch), epoch)
            prune(self, epoch=epoch)

    def _log_step(self, loss: float, average: float, lrs: list[float]) -> None:
        """kohya's step scalars: current and average loss, each group's learning rate."""
        if not self.run_log:
            return
        values = {"loss/current": loss, "loss/average": average}
        for group, lr in zip(self.optimizer.param_groups, lrs):
            values["lr/textencoder" if group.get("name") == "te" else "lr/unet"] = lr
        self.run_log.scalars(values, self.step)

    def _result(self, out: str | None, state: str | None, cancelled: bool) -> TrainResult:
        return TrainResult(out, state, self.step, cancelled, list(self.saved), list(self.losses),
                           list(self.val_losses), list(self.warnings))

    # ---- one step ----------------------------------------------------------------------------------
    def _optimizer_step(self, batches: list[list[ImageItem]], epoch: int, indices: list[int]) -> float:
        """One optimizer step over the epoch's batches ``indices`` (this process's share of them); the loss
        is the mean over all of them, so the step does not depend on how they are split between processes."""
        cfg = self.cfg
        self.network.train()
        total = 0.0
        for b in self.dist.my_share(indices):
            batch = batches[b]
            captions, views = self.dataset.batch_choices(batch, self.seed, epoch, b, self.step, self.plan.total_steps)
            latents = self.cache.get(batch, views).to(self.device)
            weights = torch.tensor([cfg.prior_loss_weight if i.is_reg else 1.0 for i in batch], device=self.device)
            gen = torch.Generator().manual_seed(batch_seed(self.seed, epoch, b))
            low, high = cfg.min_timestep or 0, self.noise.steps if cfg.max_timestep is None else cfg.max_timestep
            timesteps = torch.randint(low, high, (len(batch),), generator=gen)
            noise = self._noise_like(latents, gen)
            perturbed = None
            if cfg.ip_noise_gamma:
                strength = cfg.ip_noise_gamma * (float(torch.rand((), generator=gen))
                                                 if cfg.ip_noise_gamma_random_strength else 1.0)
                perturbed = noise + strength * torch.randn(latents.shape, generator=gen).to(self.device)
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
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.scale_weight_norms and cfg.network_algo == "lora":
            max_norm_(self.network.loras.values(), cfg.scale_weight_norms)
        return total / len(indices)

    def _noise_like(self, latents: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """kohya's noise: offset noise (random strength, adaptive to the latents' mean), then pyramid noise."""
        cfg = self.cfg
        noise = torch.randn(latents.shape, generator=gen)
        if cfg.noise_offset:
            offset = cfg.noise_offset * (float(torch.rand((), generator=gen)) if cfg.noise_offset_random_strength else 1.0)
            if cfg.adaptive_noise_scale is not None:
                mean = latents.detach().float().cpu().mean(dim=(2, 3), keepdim=True).abs()
                offset = torch.clamp(offset + cfg.adaptive_noise_scale * mean, min=0.0)
            noise = noise + offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=gen)
        if cfg.multires_noise_iterations:
            noise = pyramid_noise(noise, gen, cfg.multires_noise_iterations, cfg.multires_noise_discount)
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
        huber_c = (self.noise.huber_threshold(timesteps, cfg.huber_schedule, cfg.huber_c, cfg.huber_scale)
                   if cfg.loss_type in ("huber", "smooth_l1") else None)
        loss = elementwise_loss(pred.float(), target.float(), cfg.loss_type, huber_c).mean(dim=(1, 2, 3)) * weights
        snr_weight = self.noise.loss_weight(timesteps, cfg.min_snr_gamma, cfg.v_parameterization,
                                            cfg.debiased_estimation_loss, cfg.scale_v_pred_loss_like_noise_pred,
                                            cfg.v_pred_like_loss)
        if snr_weight is not None:
            loss = loss * snr_weight.to(loss.device)
        return loss.mean()

    # ---- validation and samples --------------------------------------------------------------------
    def _validate(self) -> None:
        """Mean loss over the held-out images at fixed noise and timesteps, so values are comparable."""
        items = self.dataset.validation[:self.cfg.max_validation_steps]
        if not items:
            return
        if not self.dist.main:
            self.dist.barrier()
            return
        self.emit("validating", message=f"validation loss on {len(items)} images")
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
                caption = with_affixes(item.caption, item.subset or self.cfg)
                total += float(self._loss(latent, [item] * len(t), [caption] * len(t), t, noise, ones, train=False))
        value = total / len(items)
        self.val_losses.append((self.step, value))
        self.log(f"step {self.step}: validation loss {value:.5f}")
        if self.run_log:
            self.run_log.scalars({"loss/validation/step_current": value}, self.step)
        warning = overfit_warning(self.val_losses, self.losses)
        if warning:
            self.warn(warning)
        self.dist.barrier()

    def _sample(self, epoch: int) -> None:
        """Sample images through the caller's ``sample_fn`` (the trainer has no sampler of its own)."""
        fn, path = self.bundle.sample_fn, self.cfg.sample_prompts
        if fn is None or not path or not self.dist.main:
            return
        prompts = read_prompts(path)
        for p in prompts:
            p.sampler = p.sampler or self.cfg.sample_sampler
        self.emit("sampling", epoch=epoch, message=f"{len(prompts)} sample images")
        self.network.eval()
        with torch.no_grad():
            images = fn(prompts, self.step)
        folder = os.path.join(self.cfg.output_dir, "sample")
        os.makedirs(folder, exist_ok=True)
        for i, img in enumerate(images):
            img.save(os.path.join(folder, f"{self.cfg.output_name}_{self.step:06d}_{i:02d}.png"))
        if self.run_log:
            self.run_log.images(images, [p.prompt for p in prompts], self.step)

    # ---- reporting ---------------------------------------------------------------------------------
    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.log("warning: " + message)

    def emit(self, phase: str, **kw) -> None:
        plan = self.plan
        if plan is None:
            self._progress(Progress(phase, step=self.step, **kw))
            return
        kw.setdefault("epoch", min(self.step // plan.steps_per_epoch + 1, plan.total_epochs))
        self._progress(Progress(phase, step=self.step, total_steps=plan.total_steps, total_epochs=plan.total_epochs, **kw))
