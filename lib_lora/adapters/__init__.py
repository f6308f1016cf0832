"""Adapter kinds, tried in this order against each file module's tensors."""
from __future__ import annotations

from .base import Adapter
from .full import Full
from .glora import GLoRA
from .ia3 import IA3
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .norm import Norm
from .oft import OFT

KINDS: tuple[type[Adapter], ...] = (LoRA, LoHa, LoKr, GLoRA, OFT, Full, Norm, IA3)


def make_adapter(key: str, w: dict) -> Adapter | None:
    for kind in KINDS:
        if kind.accepts(w):
            return kind(key, w)
    return None


__all__ = ["Adapter", "KINDS", "make_adapter"]
