"""Full / diff: the file stores ΔW (and optionally Δb) directly."""
from __future__ import annotations

from .base import StoredChange


class Full(StoredChange):
    kind = "full"
    order = 5
    labels = {"full": "Full"}
    required = ("diff",)
    optional = ("diff_b",)
