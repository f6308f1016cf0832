"""Norm: changes of a GroupNorm/LayerNorm's weight (``w_norm``) and bias (``b_norm``)."""
from __future__ import annotations

from .base import StoredChange


class Norm(StoredChange):
    kind = "norm"
    order = 6
    labels = {"norm": "Norm"}
    required = ("w_norm",)
    optional = ("b_norm",)
