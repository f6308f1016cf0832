"""Full / diff: the file stores ΔW (and optionally Δb) directly."""
from __future__ import annotations

import torch

from .base import Adapter, Tensor


class Full(Adapter):
    kind = "full"
    required = ("diff",)
    optional = ("diff_b",)
    uses_alpha = False

    def diff(self, orig: Tensor, dyn: int | None) -> Tensor:
        return self.t("diff", orig.device).reshape(orig.shape)

    def bias_diff(self, device: torch.device) -> Tensor | None:
        return self.t("diff_b", device) if "diff_b" in self.w else None
