"""The registry of adapter kinds. Each kind is one module beside this one, the only place that knows it; adding
a kind is adding its module. Everything else (file loading, key parsing, cards, the trainer's choices) asks here."""
from __future__ import annotations

import importlib
import pkgutil
from collections import Counter
from collections.abc import Iterable

import torch

from .base import Adapter, TrainableAdapter, UnusableModule


def _discover() -> tuple[type[Adapter], ...]:
    """The Adapter subclass with a ``kind`` of every module in this package, by ``Adapter.order``."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    found, todo = [], [Adapter]
    while todo:
        for cls in todo.pop().__subclasses__():
            todo.append(cls)
            if cls.kind:
                found.append(cls)
    return tuple(sorted(found, key=lambda cls: (cls.order, cls.kind)))


# Tried in this order against each file module's tensors; listed in this order wherever kinds are offered.
ADAPTER_CLASSES = _discover()
# network_algo → the kind, for kinds that can be trained.
TRAINABLE_KINDS: dict[str, type[Adapter]] = {cls.kind: cls for cls in ADAPTER_CLASSES if cls.trainable is not None}
_BY_SHOWN_KIND = {kind: cls for cls in ADAPTER_CLASSES for kind in cls.labels}


def make_adapter(key: str, w: dict[str, torch.Tensor]) -> Adapter:
    """The adapter of the first kind that accepts one file module's tensors; UnusableModule saying why when
    none can use them."""
    for name, t in w.items():
        if t.is_floating_point() and t.numel() == 0 and name not in ("alpha", "scale"):
            raise UnusableModule(f"tensor {name} is empty")
    for cls in ADAPTER_CLASSES:
        if cls.accepts(w):
            problem = cls.check(w)
            if problem:
                raise UnusableModule(problem)
            return cls(key, w)
    raise UnusableModule(f"no adapter kind uses tensors {sorted(w)}")


def tensor_names() -> set[str]:
    """Every per-module tensor name some kind reads."""
    return set().union(*(cls.tensor_names() for cls in ADAPTER_CLASSES))


def kind_label(kind: str, dora: bool = False) -> str:
    """What people call a kind a card shows (``Adapter.shown_kind``), e.g. "LoCon", "LoHa+DoRA"."""
    cls = _BY_SHOWN_KIND.get(kind)
    return cls.label(kind, dora) if cls else kind


def train_labels() -> dict[str, str]:
    """The trainable kinds by what people call them (a kind's variants included) → network_algo."""
    return {label: cls.kind for cls in TRAINABLE_KINDS.values() for label in cls.labels.values()}


def count_shown_kinds(adapters: Iterable[Adapter]) -> dict[str, int]:
    """How many modules of each shown kind; a file mixing one kind's variants is counted as its last
    variant (LoRA modules beside LoCon ones make a LoCon file)."""
    counts = Counter(a.shown_kind() for a in adapters)
    for cls in ADAPTER_CLASSES:
        present = [k for k in cls.labels if k in counts]
        if len(present) > 1:
            counts[present[-1]] += sum(counts.pop(k) for k in present[:-1])
    return dict(counts)


__all__ = ["ADAPTER_CLASSES", "TRAINABLE_KINDS", "Adapter", "TrainableAdapter", "UnusableModule", "count_shown_kinds",
           "kind_label", "make_adapter", "tensor_names", "train_labels"]
