"""LoKr: ΔW = w1 ⊗ w2 · alpha/rank; each side full or factorised, w2 optionally Tucker (LyCORIS)."""
from __future__ import annotations

import torch

from .base import Adapter, Tensor, cp_weight


class LoKr(Adapter):
    kind = "lokr"
    optional = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def __init__(self, key: str, w: dict[str, Tensor]):
        super().__init__(key, w)
        for name in ("lokr_w2_b", "lokr_w1_b"):
            if name in w:
                self.rank = w[name].shape[0]
                break

    @classmethod
    def accepts(cls, w: dict[str, Tensor]) -> bool:
        has1 = "lokr_w1" in w or ("lokr_w1_a" in w and "lokr_w1_b" in w)
        has2 = "lokr_w2" in w or ("lokr_w2_a" in w and "lokr_w2_b" in w)
        return has1 and has2

    def diff(self, orig: Tensor, dyn: int | None) -> Tensor:
        dev = orig.device
        w1 = self.t("lokr_w1", dev) if "lokr_w1" in self.w else self.t("lokr_w1_a", dev) @ self.t("lokr_w1_b", dev)
        if "lokr_w2" in self.w:
            w2 = self.t("lokr_w2", dev)
        elif "lokr_t2" in self.w:
            w2 = cp_weight(self.t("lokr_t2", dev), self.t("lokr_w2_a", dev), self.t("lokr_w2_b", dev))
        else:
            w2 = self.t("lokr_w2_a", dev) @ self.t("lokr_w2_b", dev)
        if w2.dim() == 4:
            w1 = w1.reshape(*w1.shape[:2], 1, 1)
        return torch.kron(w1, w2.contiguous()).reshape(orig.shape) * self.scale()
