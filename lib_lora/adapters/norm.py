"""Norm: deltas for a GroupNorm/LayerNorm's weight (``w_norm``) and bias (``b_norm``)."""
from __future__ import annotations

import torch

from .base import Adapter, Tensor


class Norm(Adapter):
    kind = "norm"
    required = ("w_norm",)
    optional = ("b_norm",)
    uses_alpha = False

    def diff(self, orig: Tensor, dyn: int | None) -> Tensor:
        return self.t("w_norm", orig.device).reshape(orig.shape)

    def bias_diff(self, device: torch.device) -> Tensor | None:
        return self.t("b_norm", device) if "b_norm" in self.w else None
