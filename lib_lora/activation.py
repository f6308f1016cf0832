"""From prompt requests to a patched model: resolution, defaults, advice and infotext hashes.

The WebUI glue hands in what it parsed and the loaded model; everything decided here is testable
without the WebUI.
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from .block_presets import BlockPresets
from .blocks import Random
from .catalog import Catalog
from .errors import LoraError
from .hashes import short_hash
from .keymap import family_mismatch
from .network import Network
from .patcher import ApplyResult, Patcher, Use
from .prompt import Request
from .sidecar import preferred_weight

log = logging.getLogger("sd-webui-lora")


@dataclass
class Settings:
    mode: str = "auto"                 # auto | merge | bypass
    prefer_alias: bool = True
    warn_base_model: bool = True
    trigger_words: str = "warn"        # warn | add | ignore
    weight_limit: float = 1.0
    presets: BlockPresets = field(default_factory=BlockPresets)

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
    embeddings: dict[str, tuple[Network, str]] = field(default_factory=dict)  # bundled: name → (network, its name in the prompt)
    result: ApplyResult | None = None


class Activator:
    """Owns the Patcher of the model currently loaded and re-targets when the model changes."""

    def __init__(self, catalog: Catalog, make_patcher: Callable[[torch.nn.Module], Patcher] = Patcher):
        self.catalog = catalog
        self.make_patcher = make_patcher
        self.patcher: Patcher | None = None

    def patcher_for(self, model: torch.nn.Module) -> Patcher:
        if self.patcher is None or self.patcher.model is not model:
            if self.patcher is not None:
                self.patcher.restore()
            self.patcher = self.make_patcher(model)
        return self.patcher

    def forget_model(self) -> None:
        """The WebUI loaded new weights into the model: drop hooks, keep no stale backups."""
        if self.patcher is not None:
            self.patcher.forget()
        self.patcher = None

    def build(self, requests: list[Request], family: str | None, prompt: str, settings: Settings,
              rng: Random = random) -> Report:
        """``rng`` draws LBW's random block weights (``R``/``U``); the global one by default, as LBW does."""
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
            reason = family_mismatch(net.base_model, family)
            if reason:
                msg = f"{req.name}: {reason}"
                if settings.warn_base_model:
                    rep.errors.append(msg)
                else:
                    log.info(msg)
                continue
            user, problem = self.catalog.user_metadata(entry)
            if problem:
                rep.warnings.append(problem)
            preferred = preferred_weight(user) or 1.0
            te = req.te if req.te is not None else preferred
            unet = req.unet if req.unet is not None else te
            start, stop = req.start, req.stop
            if settings.mode == "merge" and (start is not None or stop is not None):
                rep.warnings.append(f"{req.name}: start=/stop= need the bypass or auto apply mode; applied for every step")
                start = stop = None
            try:
                blocks = settings.presets.block_weights(req.lbw, req.lbwe, req.x, family, rng)
                use = Use(net, te=te, unet=unet, dyn=req.dyn, blocks=blocks, start=start, stop=stop)
            except ValueError as e:
                rep.errors.append(f"{req.name}: {e}")
                continue
            if blocks is not None:
                log.info("%s: block weights %s%s", req.name, blocks.spec, f", elements {req.lbwe}" if req.lbwe else "")
            rep.uses.append(use)
            rep.in_use.add(entry.relpath)
            for emb in net.embeddings:
                if emb in rep.embeddings:
                    rep.warnings.append(f"{req.name}: its embedding {emb} is not used; "
                                        f"{rep.embeddings[emb][1]} brings one of that name")
                else:
                    rep.embeddings[emb] = (net, req.name)
            rep.hashes[req.name.replace(":", "").replace(",", "")] = short_hash(self.catalog.ensure_hash(entry))
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
        patcher.set_step(None)
        rep.result = patcher.apply(rep.uses, mode=settings.patch_mode)
        rep.errors.extend(rep.result.errors)
        self.catalog.trim(keep=rep.in_use)
        for msg in rep.errors:
            log.warning(msg)
        for msg in rep.warnings:
            log.info(msg)
        return rep

