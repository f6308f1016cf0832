"""Patching a loaded model with any number of networks, and restoring it bit-exactly.

merge: each touched weight becomes backup + Σ multiplier·Δ (summed in fp32, written once); only
modules whose set of contributions changed since the last apply are rewritten.
bypass: a forward hook adds Σ multiplier·adapter(x) to the module's output, computed from the
adapter's own factors; nothing in the module's parameters changes.
Any exception while writing restores every touched tensor from its backup before it propagates.
"""
from __future__ import annotations

import math
import types
import weakref
from dataclasses import dataclass, field

import torch

from .adapters import Adapter
from .blocks import BlockWeights
from .keymap import Target, family_mismatch
from .mha import mha_forward
from .model_index import ModelIndex, qkv_slice
from .network import Network
from .prompt import resolve_step

MODES = ("merge", "bypass")


@dataclass(eq=False)
class Use:
    """One network in a stack, with its multipliers."""

    network: Network
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None
    blocks: BlockWeights | str | list[float] | None = None
    start: float | None = None
    stop: float | None = None
    mode: str | None = None

    def __post_init__(self):
        for name in ("te", "unet"):
            v = float(getattr(self, name))
            if not math.isfinite(v):
                raise ValueError(f"{self.network.name}: {name} multiplier must be a finite number, not {v}")
            setattr(self, name, v)
        if self.dyn is not None and (int(self.dyn) != self.dyn or self.dyn < 1):
            raise ValueError(f"{self.network.name}: dyn must be a positive whole number, not {self.dyn}")
        if self.blocks is not None and not isinstance(self.blocks, BlockWeights):
            self.blocks = BlockWeights(self.blocks)
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")

    def multiplier(self, target: Target) -> float:
        m = self.unet if target.part == "unet" else self.te
        if self.blocks is not None:
            m *= self.blocks.multiplier(target.part, target.path)
        return m

    def scheduled(self) -> bool:
        return self.start is not None or self.stop is not None

    def active_at(self, step: int | None, total: int | None = None) -> bool:
        """Whether a scheduled network is on at this sampling step (values below 1 are fractions of ``total``)."""
        if step is None:
            return True
        start, stop = resolve_step(self.start, total or 0), resolve_step(self.stop, total or 0)
        return (start is None or step >= start) and (stop is None or step < stop)


@dataclass
class ApplyResult:
    matched: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Contribution:
    adapter: Adapter
    sub: str | None
    multiplier: float
    dyn: int | None
    use: Use

    def signature(self) -> tuple:
        """Holds the adapter itself (compared by identity), so a freed adapter's id is never mistaken for a new one."""
        return (self.adapter, self.sub, self.multiplier, self.dyn, self.use.start, self.use.stop)


class Patcher:
    """Applies stacks of networks to one model; keeps the only backups of what it touched."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.index = ModelIndex(model)
        self.step: int | None = None
        self.total_steps: int | None = None
        self._backups: dict[str, dict[str, torch.Tensor]] = {}
        self._modules: dict[str, torch.nn.Module] = {}
        self._merged: dict[str, tuple] = {}
        self._bypassed: dict[str, tuple] = {}
        self._hooks: dict[str, object] = {}
        self._fits: weakref.WeakKeyDictionary[Adapter, dict[tuple, str | None]] = weakref.WeakKeyDictionary()

    @property
    def family(self) -> str | None:
        return self.index.family

    def backup_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self._backups.values() for t in b.values())

    # ---- planning ---------------------------------------------------------------------------
    def plan(self, uses: list[Use], mode: str = "merge") -> tuple[dict[str, list[Contribution]], dict[str, list[Contribution]], ApplyResult]:
        """Which contributions go to which module, in which mode; reasons for everything left out."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        res = ApplyResult()
        merge: dict[str, list[Contribution]] = {}
        bypass: dict[str, list[Contribution]] = {}
        matched: dict[str, None] = {}
        for use in uses:
            net = use.network
            msg = family_mismatch(net.name, net.base_model, self.index.family)
            if msg:
                res.errors.append(msg)
                for adapter in net.modules.values():
                    res.skipped[adapter.key] = msg
                continue
            res.skipped.update(net.unmatched)
            use_mode = use.mode or ("bypass" if use.scheduled() else mode)
            for target, adapter in net.modules.items():
                m = use.multiplier(target)
                if m == 0:
                    continue
                hit = self.index.resolve(target)
                if hit is None:
                    res.skipped[adapter.key] = f"no module for {target} in the loaded model"
                    continue
                name, module, sub = hit
                reason = self._fit(adapter, module, sub, use.dyn)
                if reason:
                    res.skipped[adapter.key] = reason
                    continue
                home = name
                if use_mode == "bypass" and name in self.index.parent_mha:
                    home, sub = self.index.parent_mha[name], "out"
                    module = self.index.by_name[home]
                self._modules[home] = module
                (bypass if use_mode == "bypass" else merge).setdefault(home, []).append(
                    Contribution(adapter, sub, m, use.dyn, use))
                matched[name] = None
        res.matched = list(matched)
        return merge, bypass, res

    def _fit(self, adapter: Adapter, module: torch.nn.Module, sub: str | None, dyn: int | None) -> str | None:
        """Why the adapter cannot patch this weight, checked on meta tensors (no data touched)."""
        shape = _weight_shape(module, sub)
        key = (shape, dyn, _has_bias(module, sub))
        known = self._fits.setdefault(adapter, {})
        if key in known:
            return known[key]
        reason = None
        if shape is None:
            reason = f"{type(module).__name__} has no weight to patch"
        else:
            try:
                d, b = adapter.delta(torch.empty(shape, device="meta"), 1.0, dyn)
                if tuple(d.shape) != shape:
                    reason = f"delta shape {tuple(d.shape)} does not fit weight {shape}"
                elif b is not None and not _has_bias(module, sub):
                    reason = "the file has a bias delta but the module has no bias"
            except NotImplementedError:
                reason = None
            except (RuntimeError, ValueError, IndexError, TypeError) as e:
                reason = f"factors do not fit weight {shape}: {str(e).splitlines()[0][:160]}"
        known[key] = reason
        return reason

    # ---- applying ---------------------------------------------------------------------------
    def apply(self, uses: list[Use], mode: str = "merge") -> ApplyResult:
        """Make the model carry exactly these networks; unchanged modules are not touched."""
        merge, bypass, res = self.plan(uses, mode)
        try:
            with torch.no_grad():
                for name in list(self._merged) + [n for n in merge if n not in self._merged]:
                    want = tuple(c.signature() for c in merge.get(name, ()))
                    if self._merged.get(name, ()) == want:
                        continue
                    if want:
                        self._write(name, merge[name], fresh=name not in self._merged)
                        self._merged[name] = want
                        for c in merge[name]:
                            c.adapter.drop_cache()
                    else:
                        self._restore_module(name)
                        del self._merged[name]
                        self._drop_backup_if_unused(name)
                    res.written.append(name)
                for name in list(self._bypassed) + [n for n in bypass if n not in self._bypassed]:
                    want = tuple(c.signature() for c in bypass.get(name, ()))
                    if self._bypassed.get(name, ()) == want:
                        continue
                    self._unhook(name)
                    if want:
                        self._hook(name, bypass[name])
                        self._bypassed[name] = want
                    res.written.append(name)
        except BaseException:
            self.restore()
            raise
        return res

    def _write(self, name: str, contribs: list[Contribution], fresh: bool = False) -> None:
        """Weight = backup + Σ deltas; ``fresh`` says the weight still equals its backup (no copy needed)."""
        module = self._modules[name]
        backup = self._backups.get(name)
        if backup is None:
            backup = {pname: p.detach().clone() for pname, p in module.named_parameters(recurse=False)}
            self._backups[name] = backup
        wname = "in_proj_weight" if isinstance(module, torch.nn.MultiheadAttention) else "weight"
        bname = "in_proj_bias" if wname == "in_proj_weight" else "bias"
        weight = getattr(module, wname).detach()
        orig = backup[wname].to(device=weight.device, dtype=torch.float32)
        buf = weight if weight.dtype == torch.float32 and weight.is_contiguous() else orig.clone()
        if buf is weight and not fresh:
            buf.copy_(backup[wname])
        bias_buf = None
        for c in contribs:
            sl = qkv_slice(c.sub, orig.shape[0] // 3) if c.sub else slice(None)
            db = c.adapter.merge_into(buf[sl], orig[sl], c.multiplier, c.dyn)
            if db is not None:
                if bias_buf is None:
                    bias_buf = backup[bname].to(device=weight.device, dtype=torch.float32).clone()
                bias_buf[sl] += db.reshape(bias_buf[sl].shape)
        if buf is not weight:
            weight.copy_(buf)
        if bias_buf is not None:
            getattr(module, bname).detach().copy_(bias_buf)
        elif bname in backup and backup[bname] is not None:
            getattr(module, bname).detach().copy_(backup[bname])

    def _restore_module(self, name: str) -> None:
        module = self._modules[name]
        for pname, t in self._backups.get(name, {}).items():
            getattr(module, pname).detach().copy_(t)

    def _drop_backup_if_unused(self, name: str) -> None:
        if name not in self._merged:
            self._backups.pop(name, None)

    # ---- bypass -----------------------------------------------------------------------------
    def _hook(self, name: str, contribs: list[Contribution]) -> None:
        module = self._modules[name]
        patcher = self
        if isinstance(module, torch.nn.MultiheadAttention):
            previous = module.__dict__.get("forward")

            def forward(self_, *args, **kwargs):
                return _mha_bypass_forward(self_, name, contribs, patcher, *args, **kwargs)

            module.forward = types.MethodType(forward, module)
            self._hooks[name] = ("forward", previous)
            return

        def hook(mod, args, out):
            x = args[0]
            weight = patcher._original(name, "weight", mod)
            for c in contribs:
                if c.use.active_at(patcher.step, patcher.total_steps):
                    out = c.adapter.bypass_add(out, x, mod, weight, c.multiplier, c.dyn)
            return out

        self._hooks[name] = ("hook", module.register_forward_hook(hook))

    def _original(self, name: str, pname: str, module: torch.nn.Module) -> torch.Tensor:
        backup = self._backups.get(name)
        return backup[pname] if backup and pname in backup else getattr(module, pname)

    def _unhook(self, name: str) -> None:
        entry = self._hooks.pop(name, None)
        self._bypassed.pop(name, None)
        if entry is None:
            return
        kind, payload = entry
        module = self._modules[name]
        if kind == "hook":
            payload.remove()
        elif payload is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = payload

    # ---- restoring --------------------------------------------------------------------------
    def forget(self) -> None:
        """Drop hooks and backups without writing: the model's weights were replaced from outside."""
        for name in list(self._hooks):
            self._unhook(name)
        self._backups.clear()
        self._merged.clear()
        self._bypassed.clear()

    def restore(self) -> None:
        """Every touched tensor back to its original bits; every hook removed."""
        with torch.no_grad():
            for name in list(self._hooks):
                self._unhook(name)
            for name in list(self._backups):
                self._restore_module(name)
        self._backups.clear()
        self._merged.clear()
        self._bypassed.clear()


def _weight_shape(module: torch.nn.Module, sub: str | None) -> tuple[int, ...] | None:
    if isinstance(module, torch.nn.MultiheadAttention):
        if sub in ("q", "k", "v"):
            w = module.in_proj_weight
            return None if w is None else (w.shape[0] // 3, w.shape[1])
        return tuple(module.out_proj.weight.shape)
    w = getattr(module, "weight", None)
    return None if w is None else tuple(w.shape)


def _has_bias(module: torch.nn.Module, sub: str | None) -> bool:
    if isinstance(module, torch.nn.MultiheadAttention):
        return (module.in_proj_bias if sub in ("q", "k", "v") else module.out_proj.bias) is not None
    return getattr(module, "bias", None) is not None


def _mha_bypass_forward(mha: torch.nn.MultiheadAttention, name: str, contribs: list[Contribution], patcher: Patcher,
                        *args, **kwargs):
    """nn.MultiheadAttention's forward with each active adapter's extra q/k/v/out projections added."""
    e = mha.embed_dim
    w_in = patcher._original(name, "in_proj_weight", mha)
    weights = {sub: w_in[i * e:(i + 1) * e] for i, sub in enumerate("qkv")}
    weights["out"] = patcher._original(name + ".out_proj", "weight", mha.out_proj)
    active = [c for c in contribs if c.use.active_at(patcher.step, patcher.total_steps)]

    def extra(sub: str, x: torch.Tensor) -> torch.Tensor | None:
        add = None
        for c in active:
            if c.sub == sub:
                y = c.adapter.bypass(x, _LINEAR, weights[sub], c.multiplier, c.dyn)
                add = y if add is None else add + y
        return add

    return mha_forward(mha, extra, *args, **kwargs)


_LINEAR = torch.nn.Linear(1, 1, bias=False)
