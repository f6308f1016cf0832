"""LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/rank, each factor optionally Tucker-decomposed (LyCORIS)."""
from __future__ import annotations

from .base import Adapter, Tensor, cp_weight


class LoHa(Adapter):
    kind = "loha"
    required = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    optional = ("hada_t1", "hada_t2")

    def __init__(self, key: str, w: dict[str, Tensor]):
        super().__init__(key, w)
        self.rank = w["hada_w1_b"].shape[0]

    def _half(self, n: int, orig: Tensor) -> Tensor:
        a, b = self.t(f"hada_w{n}_a", orig.device), self.t(f"hada_w{n}_b", orig.device)
        if f"hada_t{n}" in self.w:
            return cp_weight(self.t(f"hada_t{n}", orig.device), a, b)
        return (a @ b.reshape(b.shape[0], -1)).reshape(orig.shape)

    def diff(self, orig: Tensor, dyn: int | None) -> Tensor:
        return (self._half(1, orig) * self._half(2, orig)).reshape(orig.shape) * self.scale()
