"""Optimizers and learning-rate schedules by kohya's names.

Optional packages (bitsandbytes for the 8-bit ones, prodigyopt for Prodigy) are imported only when chosen;
Lion is implemented here, so it needs nothing. Schedules are ``LambdaLR`` factors like diffusers'
``get_scheduler``, so their state is plain numbers and resumes exactly.
"""
from __future__ import annotations

import ast
import importlib
import math
from typing import Callable

import torch

from ..errors import LoraError
from .config import TrainConfig


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): sign of an interpolated momentum, decoupled weight decay."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid Lion settings lr={lr} betas={betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * beta1 + p.grad * (1 - beta1)), alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def parse_args(items: list[str]) -> dict:
    """kohya's ``optimizer_args``: 'key=value' with Python-literal values ('betas=0.9,0.99' is a tuple)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LoraError(None, f"optimizer_args entry {item!r} is not key=value", "e.g. weight_decay=0.01")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def _optional(module: str, attr: str, package: str, name: str):
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError:
        raise LoraError(None, f"optimizer {name} needs the {package} package, which is not installed",
                        f"pip install {package} into this Python, or use AdamW or Lion") from None


def build_optimizer(cfg: TrainConfig, groups: list[dict]) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer and its description as kohya writes it to ``ss_optimizer`` ('module.Class(args)')."""
    given = parse_args(cfg.optimizer_args)
    kwargs = dict(given)
    lr, name = cfg.learning_rate, cfg.optimizer_type
    if name == "AdamW":
        cls = torch.optim.AdamW
    elif name == "Lion":
        cls = Lion
    elif name == "AdamW8bit":
        cls = _optional("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", name)
    elif name == "Lion8bit":
        cls = _optional("bitsandbytes.optim", "Lion8bit", "bitsandbytes", name)
    elif name == "Prodigy":
        cls = _optional("prodigyopt", "Prodigy", "prodigyopt", name)
    elif name == "Adafactor":
        try:
            from transformers.optimization import Adafactor as cls
            for key in ("scale_parameter", "relative_step", "warmup_init"):
                kwargs.setdefault(key, False)
        except ImportError:
            cls = torch.optim.Adafactor
    else:
        raise LoraError(None, f"unknown optimizer {name!r}", "see --optimizer_type")
    try:
        opt = cls(groups, lr=lr, **kwargs)
    except TypeError as e:
        raise LoraError(None, f"optimizer {name} refused optimizer_args {cfg.optimizer_args}: {e}",
                        "check the argument names") from None
    args = ",".join(f"{k}={v}" for k, v in given.items())
    return opt, f"{cls.__module__}.{cls.__name__}" + (f"({args})" if args else "")


def schedule(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor at each optimizer step (diffusers' definitions)."""
    name, warmup = cfg.lr_scheduler, cfg.lr_warmup_steps
    cycles, power = cfg.lr_scheduler_num_cycles, cfg.lr_scheduler_power
    end = 1e-7 / cfg.learning_rate  # diffusers' polynomial lr_end, as a factor

    def factor(step: int) -> float:
        if name == "constant":
            return 1.0
        if step < warmup:
            return step / max(1, warmup)
        if name == "constant_with_warmup":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if name == "linear":
            return max(0.0, 1.0 - progress)
        if name == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if name == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))
        return (1.0 - end) * (1.0 - progress) ** power + end  # polynomial

    return factor


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(cfg, total_steps))


def max_norm_(modules, max_norm: float) -> int:
    """kohya's ``scale_weight_norms`` (``apply_max_norm_regularization``) on LoRA modules: a module whose
    ΔW = up·down·scale has a Frobenius norm above ``max_norm`` gets up and down scaled by √(max_norm/norm).
    Returns how many were scaled."""
    scaled = 0
    with torch.no_grad():
        for m in modules:
            up, down = getattr(m, "lora_up", None), getattr(m, "lora_down", None)
            if up is None or down is None:
                continue
            delta = up.weight.reshape(up.weight.shape[0], -1) @ down.weight.reshape(down.weight.shape[0], -1) * m.scale
            norm = delta.norm().clamp(min=max_norm / 2)
            ratio = float(torch.clamp(norm, max=max_norm) / norm)
            if ratio != 1:
                scaled += 1
                up.weight.mul_(ratio ** 0.5)
                down.weight.mul_(ratio ** 0.5)
    return scaled
