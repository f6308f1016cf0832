"""From prompt requests to a patched model: resolution, defaults, advice and infotext hashes.

The WebUI glue hands in what it parsed and the loaded model; everything decided here is testable
without the WebUI.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch

from .catalog import Catalog
from .errors import LoraError
from .keymap import family_mismatch
from .patcher import ApplyResult, Patcher, Use
from .prompt import Request

log = logging.getLogger("sd-webui-lora")


@dataclass
class Settings:
    mode: str = "auto"                 # auto | merge | bypass
    prefer_alias: bool = True
    warn_base_model: bool = True
    trigger_words: str = "warn"        # warn | add | ignore
    weight_limit: float = 1.0

    @property
    def patch_mode(self) -> str:
        """The Patcher mode for networks without a schedule."""
        return "bypass" if self.mode == "bypass" else "merge"


@dataclass
class Report:
    uses: list[Use] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)
    add_to_prompt: list[str] = field(default_factory=list)
    in_use: set[str] = field(default_factory=set)
    result: ApplyResult | None = None


class Activator:
    """Owns the Patcher of the model currently loaded and re-targets when the model changes."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.patcher: Patcher | None = None

    def patcher_for(self, model: torch.nn.Module) -> Patcher:
        if self.patcher is None or self.patcher.model is not model:
            if self.patcher is not None:
                self.patcher.restore()
            self.patcher = Patcher(model)
        return self.patcher

    def forget_model(self) -> None:
        """The WebUI loaded new weights into the model: drop hooks, keep no stale backups."""
        if self.patcher is not None:
            self.patcher.forget()
        self.patcher = None

    def build(self, requests: list[Request], family: str | None, prompt: str, settings: Settings) -> Report:
        rep = Report()
        for req in requests:
            entry, warning = self.catalog.resolve(req.name, settings.prefer_alias)
            if warning:
                (rep.warnings if entry else rep.errors).append(warning)
            if entry is None:
                if not warning:
                    rep.errors.append(f"Lora not found: {req.name}")
                continue
            try:
                net = self.catalog.load(entry)
            except LoraError as e:
                rep.errors.append(f"{req.name}: {e.message}")
                continue
            msg = family_mismatch(req.name, net.base_model, family)
            if msg:
                if settings.warn_base_model:
                    rep.errors.append(msg)
                else:
                    log.info(msg)
                continue
            user, problem = self.catalog.user_metadata(entry)
            if problem:
                rep.warnings.append(problem)
            preferred = _float(user.get("preferred weight")) or 1.0
            te = req.te if req.te is not None else preferred
            unet = req.unet if req.unet is not None else te
            start, stop = req.start, req.stop
            if settings.mode == "merge" and (start is not None or stop is not None):
                rep.warnings.append(f"{req.name}: start=/stop= need the bypass or auto apply mode; applied for every step")
                start = stop = None
            try:
                use = Use(net, te=te, unet=unet, dyn=req.dyn, blocks=req.lbw, start=start, stop=stop,
                          mode="bypass" if settings.mode == "bypass" or start is not None or stop is not None else "merge")
            except ValueError as e:
                rep.errors.append(f"{req.name}: {e}")
                continue
            rep.uses.append(use)
            rep.in_use.add(entry.relpath)
            rep.hashes[req.name.replace(":", "").replace(",", "")] = self.catalog.ensure_hash(entry)[:12]
            if max(abs(te), abs(unet)) > settings.weight_limit:
                rep.warnings.append(f"{req.name}: weight {max(abs(te), abs(unet)):g} is above {settings.weight_limit:g}; "
                                    "weights above 1 may give broken images")
            self._advise_triggers(req.name, user, prompt, settings, rep)
        return rep

    def _advise_triggers(self, name: str, user: dict, prompt: str, settings: Settings, rep: Report) -> None:
        words = [w.strip() for w in str(user.get("activation text") or "").split(",") if w.strip()]
        if not words or settings.trigger_words == "ignore":
            return
        low = prompt.lower()
        if any(re.search(r"(?<!\w)" + re.escape(w.lower()) + r"(?!\w)", low) for w in words):
            return
        if settings.trigger_words == "add":
            rep.add_to_prompt.append(", ".join(words))
        else:
            rep.warnings.append(f"{name}: none of its trigger words ({', '.join(words)}) is in the prompt")

    def apply(self, model: torch.nn.Module, rep: Report, settings: Settings) -> Report:
        patcher = self.patcher_for(model)
        patcher.step = None
        rep.result = patcher.apply(rep.uses, mode=settings.patch_mode)
        rep.errors.extend(rep.result.errors)
        self.catalog.trim(keep=rep.in_use)
        for msg in rep.errors:
            log.warning(msg)
        for msg in rep.warnings:
            log.info(msg)
        return rep


def _float(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if v == v and v != 0 else None
