"""A network file turned into adapters keyed by model target, independent of any loaded model."""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from .adapters import Adapter, make_adapter
from .errors import LoraError
from .keymap import Target, detect_family, split_key, target_for
from .safetensors_io import Limits, read_state_dict


@dataclass
class Network:
    name: str
    path: str
    format: str
    base_model: str | None
    metadata: dict[str, str]
    modules: dict[Target, Adapter]
    unmatched: dict[str, str] = field(default_factory=dict)
    mtime: float = 0.0
    size: int = 0

    @property
    def kinds(self) -> dict[str, int]:
        return dict(Counter(a.kind for a in self.modules.values()))

    @property
    def rank(self) -> int | None:
        ranks = Counter(a.rank for a in self.modules.values() if a.rank)
        return ranks.most_common(1)[0][0] if ranks else None

    @property
    def alpha(self) -> float | None:
        alphas = Counter(a.alpha for a in self.modules.values() if a.alpha is not None)
        return alphas.most_common(1)[0][0] if alphas else None

    def nbytes(self) -> int:
        return sum(a.nbytes() for a in self.modules.values())


def load(path: str, name: str | None = None, limits: Limits = Limits()) -> Network:
    """Read, validate and decode a network file; raise LoraError with one clear message if unusable."""
    tensors, metadata = read_state_dict(path, limits)
    if not tensors:
        raise LoraError(path, "holds no tensors", "this is not a network file")
    return from_state_dict(tensors, metadata, path=path, name=name)


def from_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                    path: str = "<memory>", name: str | None = None) -> Network:
    metadata = dict(metadata or {})
    for key, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise LoraError(path, f"tensor {key!r} contains NaN or infinite values",
                            "the file is broken (a failed training run?); do not use it")
    split, unmatched = {}, {}
    for key in tensors:
        s = split_key(key)
        if s is None:
            unmatched[key] = "unknown key style"
        else:
            split[key] = s
    if not split:
        sample = ", ".join(list(tensors)[:3])
        raise LoraError(path, f"no LoRA keys recognised (keys like {sample})",
                        "this is not a LoRA/LyCORIS file, or a format this extension does not know")
    family = detect_family(split, {k: tuple(tensors[k].shape) for k in split}, metadata)
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    prefixes: dict[tuple[str, str], str] = {}
    for key, (part, module, param) in split.items():
        groups.setdefault((part, module), {})[param] = tensors[key]
        prefixes.setdefault((part, module), key[: len(key) - len(param) - 1] if key.endswith(param) else key)
    modules: dict[Target, Adapter] = {}
    for (part, module), w in groups.items():
        file_key = prefixes[(part, module)]
        reason = _check_group(w)
        adapter = make_adapter(file_key, w) if reason is None else None
        if adapter is None:
            unmatched[file_key] = reason or f"no adapter kind uses tensors {sorted(w)}"
            continue
        for extra in sorted(set(w) - adapter.known()):
            unmatched[f"{file_key}.{extra}"] = f"tensor not used by {adapter.kind}"
        target = target_for(part, module, family)
        if target in modules:
            unmatched[file_key] = f"second entry for {target}"
            continue
        modules[target] = adapter
    _apply_peft_config(modules, metadata, {t: a.key for t, a in modules.items()})
    if not modules:
        raise LoraError(path, "no usable network modules (" + "; ".join(f"{k}: {v}" for k, v in list(unmatched.items())[:3]) + ")",
                        "the file is damaged or of an unsupported kind")
    stat = os.stat(path) if os.path.exists(path) else None
    return Network(
        name=name or os.path.splitext(os.path.basename(path))[0],
        path=path,
        format=_format(tensors, metadata, modules),
        base_model=family,
        metadata=metadata,
        modules=modules,
        unmatched=unmatched,
        mtime=stat.st_mtime if stat else 0.0,
        size=stat.st_size if stat else 0,
    )


PEFT_PREFIXES = {"unet": "unet", "te": "text_encoder", "te2": "text_encoder_2"}


def _apply_peft_config(modules: dict[Target, Adapter], metadata: dict[str, str], keys: dict[Target, str]) -> None:
    """diffusers keeps PEFT's ``lora_alpha`` (and ``alpha_pattern``, ``use_rslora``) in the header's
    ``lora_adapter_metadata`` instead of per-module alpha tensors."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return
    try:
        config = json.loads(raw)
    except ValueError:
        return
    if not isinstance(config, dict):
        return
    for target, adapter in modules.items():
        prefix = PEFT_PREFIXES[target.part]
        alpha = config.get(f"{prefix}.lora_alpha")
        if adapter.alpha is not None or alpha is None or not adapter.rank:
            continue
        for pattern, value in (config.get(f"{prefix}.alpha_pattern") or {}).items():
            if keys[target].endswith(pattern) or re.search(pattern, keys[target]):
                alpha = value
                break
        try:
            alpha = float(alpha)
        except (TypeError, ValueError):
            continue
        if config.get(f"{prefix}.use_rslora"):
            alpha *= math.sqrt(adapter.rank)
        adapter.alpha = alpha


def _check_group(w: dict[str, torch.Tensor]) -> str | None:
    """Internal consistency of one module's factors (shapes the adapters rely on)."""
    for k, t in w.items():
        if t.is_floating_point() and t.numel() == 0 and k not in ("alpha", "scale"):
            return f"tensor {k} is empty"
    up, down = w.get("lora_up.weight"), w.get("lora_down.weight")
    if up is not None and down is not None:
        if up.dim() < 2 or down.dim() < 2:
            return f"lora_up/lora_down must be matrices, got {tuple(up.shape)} and {tuple(down.shape)}"
        if up.shape[1] != down.shape[0]:
            return f"rank mismatch: lora_up has {up.shape[1]}, lora_down has {down.shape[0]}"
    if ("hada_w1_a" in w and "hada_w1_b" in w and "hada_t1" not in w and w["hada_w1_a"].dim() == 2
            and w["hada_w1_a"].shape[1] != w["hada_w1_b"].shape[0]):
        return f"rank mismatch: hada_w1_a has {w['hada_w1_a'].shape[1]}, hada_w1_b has {w['hada_w1_b'].shape[0]}"
    return None


def _format(tensors: dict, metadata: dict[str, str], modules: dict[Target, Adapter]) -> str:
    if any(k.startswith(("unet.", "text_encoder", "base_model.", "transformer.unet")) for k in tensors):
        return "peft" if any(".lora_A." in k or "lora_magnitude_vector" in k for k in tensors) else "diffusers"
    if any(k.startswith(("model.diffusion_model.", "diffusion_model.", "cond_stage_model.", "conditioner.")) for k in tensors):
        return "checkpoint"
    kinds = {a.kind for a in modules.values()}
    if "lycoris" in metadata.get("ss_network_module", "") or kinds - {"lora"} or any(k.endswith("dora_scale") for k in tensors):
        return "lycoris"
    return "kohya"
