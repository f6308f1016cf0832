"""A network file turned into adapters keyed by model target, independent of any loaded model."""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .adapters import Adapter, UnusableModule, make_adapter
from .errors import LoraError
from .keymap import Target, detect_family, scale_shift_swapped, split_key, target_for
from .safetensors_io import Limits, all_finite, read_state_dict

BUNDLE_PREFIX = "bundle_emb."


@dataclass(frozen=True)
class BundledEmbedding:
    """A textual-inversion embedding carried in a network file (kohya's ``bundle_emb.NAME.…`` keys): ``vectors``
    is ``{"*": [n, dim]}`` for one text encoder, ``{"clip_l": …, "clip_g": …}`` for SDXL/SD3's two."""

    name: str
    vectors: dict[str, torch.Tensor]

    @property
    def shape(self) -> int:
        """The width the WebUI compares with its text encoders' (CLIP-L + CLIP-G summed)."""
        return sum(int(t.shape[-1]) for t in self.vectors.values())


@dataclass
class KeyLayout:
    """A file's keys in modules: each key split into (part, module, param) by its style, the keys of each
    (part, module) by param, and the prefix naming the module in messages (from its first key)."""

    split: dict[str, tuple[str, str, str]]
    modules: dict[tuple[str, str], dict[str, str]]
    prefixes: dict[tuple[str, str], str]
    unknown: list[str]

    @classmethod
    def of(cls, keys: Iterable[str]) -> KeyLayout:
        layout = cls({}, {}, {}, [])
        for key in keys:
            s = split_key(key)
            if s is None:
                layout.unknown.append(key)
                continue
            layout.split[key] = s
            part, module, param = s
            layout.modules.setdefault((part, module), {})[param] = key
            layout.prefixes.setdefault((part, module), key[: len(key) - len(param) - 1] if key.endswith(param) else key)
        return layout


@dataclass
class Network:
    name: str
    path: str
    format: str
    base_model: str | None
    metadata: dict[str, str]
    modules: dict[Target, Adapter]
    unmatched: dict[str, str] = field(default_factory=dict)
    embeddings: dict[str, BundledEmbedding] = field(default_factory=dict)
    mtime: float = 0.0
    size: int = 0

    @property
    def kind_counts(self) -> dict[str, int]:
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
        if t.is_floating_point() and t.numel() and not all_finite(t):
            raise LoraError(path, f"tensor {key!r} contains NaN or infinite values",
                            "the file is broken (a failed training run?); do not use it")
    unmatched: dict[str, str] = {}
    embeddings = bundled_embeddings(tensors, unmatched)
    layout = KeyLayout.of(k for k in tensors if not k.startswith(BUNDLE_PREFIX))
    unmatched.update(dict.fromkeys(layout.unknown, "unknown key style"))
    if not layout.split and not embeddings:
        sample = ", ".join(list(tensors)[:3])
        raise LoraError(path, f"no LoRA keys recognised (keys like {sample})",
                        "this is not a LoRA/LyCORIS file, or a format this extension does not know")
    family = detect_family(layout.split, {k: tuple(tensors[k].shape) for k in layout.split}, metadata) if layout.split else None
    modules: dict[Target, Adapter] = {}
    swapped: list[Target] = []
    for (part, module), keys in layout.modules.items():
        file_key = layout.prefixes[(part, module)]
        w = {param: tensors[key] for param, key in keys.items()}
        try:
            adapter = make_adapter(file_key, w)
        except UnusableModule as e:
            unmatched[file_key] = str(e)
            continue
        for extra in sorted(set(w) - adapter.tensor_names()):
            unmatched[f"{file_key}.{extra}"] = f"tensor not used by {adapter.kind}"
        target = target_for(part, module, family)
        if target in modules:
            unmatched[file_key] = f"second entry for {target}"
            continue
        modules[target] = adapter
        if scale_shift_swapped(part, module, family):
            swapped.append(target)
    _apply_peft_config(modules, metadata, {t: a.key for t, a in modules.items()})
    for target in swapped:
        modules[target] = HalvesSwapped(modules[target])
    if not modules and not embeddings:
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
        embeddings=embeddings,
        mtime=stat.st_mtime if stat else 0.0,
        size=stat.st_size if stat else 0,
    )


# Where diffusers' lora_adapter_metadata keeps each part's LoraConfig (SD3 pipelines: "transformer.").
PEFT_PREFIXES = {"unet": ("unet", "transformer"), "te": ("text_encoder",), "te2": ("text_encoder_2",),
                 "te3": ("text_encoder_3",)}


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
        prefix = next((p for p in PEFT_PREFIXES[target.part] if f"{p}.lora_alpha" in config), None)
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


class HalvesSwapped(Adapter):
    """An adapter whose output rows come in the other order of two halves than the model's (see
    ``keymap.scale_shift_swapped``): it sees the weight swapped, and its delta is swapped back. Weights that are not
    two halves of [2·n, n] (SD3's six-part modulations) are left to the adapter as they are."""

    def __init__(self, inner: Adapter):
        super().__init__(inner.key, inner.w)
        self.inner = inner
        self.kind, self.rank, self.alpha = inner.kind, inner.rank, inner.alpha

    def delta(self, orig: torch.Tensor, multiplier: float, dyn: int | None = None):
        if orig.dim() != 2 or orig.shape[0] != 2 * orig.shape[1]:
            return self.inner.delta(orig, multiplier, dyn)
        d, b = self.inner.delta(_swap_halves(orig), multiplier, dyn)
        return _swap_halves(d), (_swap_halves(b) if b is not None else None)

    def needs_original(self) -> bool:
        return self.inner.needs_original()

    def shown_kind(self) -> str:
        return self.inner.shown_kind()

    def drop_cache(self) -> None:
        self.inner.drop_cache()


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first])


def bundled_embeddings(tensors: dict[str, torch.Tensor], unmatched: dict[str, str]) -> dict[str, BundledEmbedding]:
    """kohya's bundled embeddings: ``bundle_emb.NAME.string_to_param.*`` (one text encoder) or
    ``bundle_emb.NAME.clip_l`` / ``.clip_g`` (two), parsed as the WebUI's built-in Lora parses them."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith(BUNDLE_PREFIX):
            name, _, vec = key[len(BUNDLE_PREFIX):].partition(".")
            found.setdefault(name, {})["*" if vec.startswith("string_to_param.") else vec] = t
    out = {}
    for name, vectors in found.items():
        reason = _check_embedding(name, vectors)
        if reason:
            unmatched[f"{BUNDLE_PREFIX}{name}"] = reason
        else:
            out[name] = BundledEmbedding(name, {k: t if t.dim() == 2 else t.unsqueeze(0) for k, t in vectors.items()})
    return out


def _check_embedding(name: str, vectors: dict[str, torch.Tensor]) -> str | None:
    if not name:
        return "a bundled embedding without a name"
    if set(vectors) not in ({"*"}, {"clip_l", "clip_g"}):
        return f"bundled embedding with tensors {sorted(vectors)} (wants string_to_param.*, or clip_l and clip_g)"
    if any(not t.is_floating_point() or t.dim() not in (1, 2) or t.numel() == 0 for t in vectors.values()):
        return "bundled embedding vectors must be non-empty [vectors, width] float tensors"
    if len({1 if t.dim() == 1 else t.shape[0] for t in vectors.values()}) != 1:
        return "bundled embedding's clip_l and clip_g hold different numbers of vectors"
    return None


def _format(tensors: dict, metadata: dict[str, str], modules: dict[Target, Adapter]) -> str:
    if any(k.startswith(("unet.", "text_encoder", "base_model.", "transformer.")) for k in tensors):
        return "peft" if any(".lora_A." in k or "lora_magnitude_vector" in k for k in tensors) else "diffusers"
    if any(k.startswith(("model.diffusion_model.", "diffusion_model.", "cond_stage_model.", "conditioner.")) for k in tensors):
        return "checkpoint"
    kinds = {a.kind for a in modules.values()}
    if "lycoris" in metadata.get("ss_network_module", "") or kinds - {"lora"} or any(k.endswith("dora_scale") for k in tensors):
        return "lycoris"
    return "kohya"
