"""Patching a loaded model with any number of networks, and restoring it bit-exactly.

merge: each touched weight becomes backup + Σ multiplier·Δ (summed in fp32, written once); only
modules whose set of contributions changed since the last apply are rewritten.
bypass: a forward hook adds Σ multiplier·adapter(x) to the module's output, computed from the
adapter's own factors; nothing in the module's parameters changes.
Each touched layer has one ``PatchedLayer`` record: its backup, what it carries, and its hook.
Any exception while writing restores every touched tensor from its backup before it propagates.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from .adapters import Adapter
from .blocks import BlockWeights
from .devices import WORK_DTYPE, BackupPlace, restore_into
from .forward_swap import ForwardSwap
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
            m *= self.blocks.multiplier(target.part, target.path, target.sub)
        return m

    def scheduled(self) -> bool:
        return self.start is not None or self.stop is not None

    def mode_for(self, default: str) -> str:
        """This network's apply mode: its own, else bypass when scheduled (a merge cannot switch per step),
        else the stack's."""
        return self.mode or ("bypass" if self.scheduled() else default)

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


@dataclass(eq=False)
class PatchedLayer:
    """Everything the patcher did to one layer: the original parameters it will put back (merge), the
    contributions the layer carries in each mode, and the hook or replaced forward of its bypass."""

    name: str
    module: torch.nn.Module
    backup: dict[str, torch.Tensor] = field(default_factory=dict)
    merged: tuple = ()
    bypassed: tuple = ()
    handle: object | None = None  # a forward-hook handle or a ForwardSwap; both have remove()

    def original(self, pname: str, device: torch.device) -> torch.Tensor:
        """A parameter as it was before any merge, on ``device`` (a bypass needs it beside its input)."""
        t = self.backup.get(pname)
        return getattr(self.module, pname) if t is None else t.to(device, non_blocking=t.is_pinned())

    def backup_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.backup.values())


@dataclass
class Plan:
    """The contributions each layer should carry, by mode, and why everything else was left out."""

    merge: dict[str, list[Contribution]] = field(default_factory=dict)
    bypass: dict[str, list[Contribution]] = field(default_factory=dict)
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    result: ApplyResult = field(default_factory=ApplyResult)


class Patcher:
    """Applies stacks of networks to one model; keeps the only backups of what it touched.

    ``backups`` says where merge backups live (CPU memory for weights on a GPU, by default).
    ``precise_weight(module, pname)`` may give a higher-precision copy of a weight stored in a lossy dtype
    (the WebUI's fp16 cache of its fp8 weights): merges are then computed from it rather than from the
    stored weight, so stacking and changing weights never compounds the storage's rounding.
    """

    def __init__(self, model: torch.nn.Module, backups: BackupPlace = BackupPlace(),
                 precise_weight: Callable[[torch.nn.Module, str], torch.Tensor | None] | None = None):
        self.model = model
        self.index = ModelIndex(model)
        self.backups = backups
        self.precise_weight = precise_weight
        self.layers: dict[str, PatchedLayer] = {}
        self._step: int | None = None
        self._total_steps: int | None = None
        self._fits: weakref.WeakKeyDictionary[Adapter, dict[tuple, str | None]] = weakref.WeakKeyDictionary()

    @property
    def family(self) -> str | None:
        return self.index.family

    @property
    def step(self) -> int | None:
        return self._step

    @property
    def total_steps(self) -> int | None:
        return self._total_steps

    def set_step(self, step: int | None, total: int | None = None) -> None:
        """The sampling step scheduled networks are checked against (None: outside sampling, all run)."""
        self._step, self._total_steps = step, total

    def backup_bytes(self) -> int:
        return sum(layer.backup_bytes() for layer in self.layers.values())

    # ---- planning ---------------------------------------------------------------------------
    def plan(self, uses: list[Use], mode: str = "merge") -> Plan:
        """Which contributions go to which layer, in which mode; reasons for everything left out."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        plan = Plan()
        res = plan.result
        matched: dict[str, None] = {}
        for use in uses:
            net = use.network
            reason = family_mismatch(net.base_model, self.index.family)
            if reason:
                res.errors.append(f"{net.name}: {reason}")
                for adapter in net.modules.values():
                    res.skipped[adapter.key] = reason
                continue
            res.skipped.update(net.unmatched)
            use_mode = use.mode_for(mode)
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
                plan.modules[home] = module
                (plan.bypass if use_mode == "bypass" else plan.merge).setdefault(home, []).append(
                    Contribution(adapter, sub, m, use.dyn, use))
                matched[name] = None
        res.matched = list(matched)
        return plan

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
        """Make the model carry exactly these networks; unchanged layers are not touched."""
        plan = self.plan(uses, mode)
        res = plan.result
        try:
            with torch.no_grad():
                for name in list(self.layers) + [n for n in {**plan.merge, **plan.bypass} if n not in self.layers]:
                    layer = self.layers.get(name) or PatchedLayer(name, plan.modules[name])
                    merge = tuple(c.signature() for c in plan.merge.get(name, ()))
                    bypass = tuple(c.signature() for c in plan.bypass.get(name, ()))
                    if layer.merged == merge and layer.bypassed == bypass:
                        continue
                    self.layers[name] = layer
                    if layer.merged != merge:
                        if merge:
                            self._write(layer, plan.merge[name])
                        else:
                            self._restore_layer(layer)
                        layer.merged = merge
                    if layer.bypassed != bypass:
                        self._unhook(layer)
                        if bypass:
                            self._hook(layer, plan.bypass[name])
                        layer.bypassed = bypass
                    if not layer.merged and not layer.bypassed:
                        del self.layers[name]
                    res.written.append(name)
        except BaseException:
            self.restore()
            raise
        return res

    def _write(self, layer: PatchedLayer, contribs: list[Contribution]) -> None:
        """Weight = original + Σ deltas, summed in fp32 on the weight's device and written once."""
        module = layer.module
        fresh = not layer.backup
        if fresh:
            layer.backup = {pname: self.backups.backup(p) for pname, p in module.named_parameters(recurse=False)}
        wname = "in_proj_weight" if isinstance(module, torch.nn.MultiheadAttention) else "weight"
        bname = "in_proj_bias" if wname == "in_proj_weight" else "bias"
        weight = getattr(module, wname).detach()
        if weight.dtype == WORK_DTYPE and weight.is_contiguous():
            buf = weight
            if not fresh:
                restore_into(buf, layer.backup[wname])
        else:
            buf = self._merge_basis(layer, wname, weight, copy=True)
        # Most kinds read only the weight's shape: the work buffer stands in, and the layer costs one buffer.
        needs_orig = any(c.adapter.needs_original() for c in contribs)
        orig = self._merge_basis(layer, wname, weight) if needs_orig else buf
        bias_buf = None
        for c in contribs:
            sl = qkv_slice(c.sub, orig.shape[0] // 3) if c.sub else slice(None)
            db = c.adapter.merge_into(buf[sl], orig[sl], c.multiplier, c.dyn)
            if db is not None:
                if bias_buf is None:
                    bias_buf = self._merge_basis(layer, bname, weight, copy=True)
                bias_buf[sl] += db.reshape(bias_buf[sl].shape)
            c.adapter.drop_cache()
        if buf is not weight:
            weight.copy_(buf)
        if bias_buf is not None:
            getattr(module, bname).detach().copy_(bias_buf)
        elif layer.backup.get(bname) is not None:
            restore_into(getattr(module, bname), layer.backup[bname])

    def _merge_basis(self, layer: PatchedLayer, pname: str, weight: torch.Tensor, copy: bool = False) -> torch.Tensor:
        """The original parameter in fp32 on the weight's device (the precise copy when the caller has one);
        ``copy``: a tensor of its own, to be written into."""
        precise = self.precise_weight(layer.module, pname) if self.precise_weight else None
        source = precise if precise is not None else layer.backup[pname]
        return source.to(device=weight.device, dtype=WORK_DTYPE, non_blocking=source.is_pinned(), copy=copy)

    def _restore_layer(self, layer: PatchedLayer) -> None:
        for pname, t in layer.backup.items():
            restore_into(getattr(layer.module, pname), t)
        layer.backup = {}

    # ---- bypass -----------------------------------------------------------------------------
    def _hook(self, layer: PatchedLayer, contribs: list[Contribution]) -> None:
        module = layer.module
        patcher = self
        if isinstance(module, torch.nn.MultiheadAttention):
            def forward(*args, **kwargs):
                return _mha_bypass_forward(module, layer, contribs, patcher, *args, **kwargs)

            layer.handle = ForwardSwap(module, forward)
            return

        needs_orig = any(c.adapter.needs_original() for c in contribs)

        def hook(mod, args, out):
            x = args[0]
            weight = layer.original("weight", x.device) if needs_orig else mod.weight
            for c in contribs:
                if not c.use.active_at(patcher.step, patcher.total_steps):
                    continue
                if c.sub:  # a third of a fused qkv Linear (SD3): its outputs are that third of the features
                    sl = qkv_slice(c.sub, weight.shape[0] // 3)
                    out[..., sl] = c.adapter.bypass_add(out[..., sl], x, mod, weight[sl], c.multiplier, c.dyn)
                else:
                    out = c.adapter.bypass_add(out, x, mod, weight, c.multiplier, c.dyn)
            return out

        layer.handle = module.register_forward_hook(hook)

    def _unhook(self, layer: PatchedLayer) -> None:
        if layer.handle is not None:
            layer.handle.remove()
            layer.handle = None

    # ---- restoring --------------------------------------------------------------------------
    def forget(self) -> None:
        """Drop hooks and backups without writing: the model's weights were replaced from outside."""
        for layer in self.layers.values():
            self._unhook(layer)
        self.layers.clear()

    def restore(self) -> None:
        """Every touched tensor back to its original bits; every hook removed."""
        with torch.no_grad():
            for layer in self.layers.values():
                self._unhook(layer)
                self._restore_layer(layer)
        self.layers.clear()


def _weight_shape(module: torch.nn.Module, sub: str | None) -> tuple[int, ...] | None:
    if isinstance(module, torch.nn.MultiheadAttention):
        if sub in ("q", "k", "v"):
            w = module.in_proj_weight
            return None if w is None else (w.shape[0] // 3, w.shape[1])
        return tuple(module.out_proj.weight.shape)
    w = getattr(module, "weight", None)
    if w is None:
        return None
    return (w.shape[0] // 3, *w.shape[1:]) if sub in ("q", "k", "v") else tuple(w.shape)


def _has_bias(module: torch.nn.Module, sub: str | None) -> bool:
    if isinstance(module, torch.nn.MultiheadAttention):
        return (module.in_proj_bias if sub in ("q", "k", "v") else module.out_proj.bias) is not None
    return getattr(module, "bias", None) is not None


def _mha_bypass_forward(mha: torch.nn.MultiheadAttention, layer: PatchedLayer, contribs: list[Contribution],
                        patcher: Patcher, *args, **kwargs):
    """nn.MultiheadAttention's forward with each active adapter's extra q/k/v/out projections added."""
    e = mha.embed_dim
    active = [c for c in contribs if c.use.active_at(patcher.step, patcher.total_steps)]
    w_in, w_out = mha.in_proj_weight, mha.out_proj.weight
    if any(c.adapter.needs_original() for c in active):
        out_layer = patcher.layers.get(layer.name + ".out_proj")
        w_in = layer.original("in_proj_weight", w_in.device)
        w_out = out_layer.original("weight", w_out.device) if out_layer else w_out
    weights = {sub: w_in[i * e:(i + 1) * e] for i, sub in enumerate("qkv")}
    weights["out"] = w_out

    def extra(sub: str, x: torch.Tensor) -> torch.Tensor | None:
        add = None
        for c in active:
            if c.sub == sub:
                y = c.adapter.bypass(x, _LINEAR, weights[sub], c.multiplier, c.dyn)
                add = y if add is None else add + y
        return add

    return mha_forward(mha, extra, *args, **kwargs)


_LINEAR = torch.nn.Linear(1, 1, bias=False)
