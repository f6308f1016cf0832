"""LoKr: ΔW = w1 ⊗ w2 · alpha/rank; each side full or factorised, w2 optionally Tucker (LyCORIS), and LyCORIS'
trainable LoKr."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import Adapter, Tensor, TrainableAdapter, cp_weight, low_rank


def weight_change(w1: Tensor, w2: Tensor, shape: tuple[int, ...], scale: float) -> Tensor:
    """ΔW = w1 ⊗ w2 · scale, shaped ``shape``; w1 [out_m, in_m] is widened to w2's kernel dimensions."""
    w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - 2))
    return torch.kron(w1, w2.contiguous()).reshape(shape) * scale


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS' split of a dimension into m·n (m ≤ n), as square as ``factor`` allows."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LoKrTrainable(TrainableAdapter):
    """LyCORIS' LoKr: w1 full (kaiming), w2 low-rank w2a·w2b (kaiming, 0; scaled alpha/rank) unless the rank is
    too big for it, then w2 full (0, scale 1)."""

    def __init__(self, layer: nn.Module, dim: int, alpha: float, dropout: float | None, lokr_factor: int = -1):
        super().__init__(layer, alpha, dropout)
        out_m, out_n = factorization(self.out_features, lokr_factor)
        in_m, in_n = factorization(self.in_features, lokr_factor)
        self.lokr_w1 = nn.Parameter(torch.empty(out_m, in_m))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        self.decomposed = dim < max(out_n, in_n) / 2
        if self.decomposed:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_n, dim))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            self.lokr_w2_b = nn.Parameter(torch.zeros(dim, in_n * math.prod(self.kernel)))
            self.scale = alpha / dim
        else:
            self.lokr_w2 = nn.Parameter(torch.zeros(out_n, in_n, *self.kernel))
            self.scale = 1.0

    def weight_change(self) -> Tensor:
        w2 = self.lokr_w2_a @ self.lokr_w2_b if self.decomposed else self.lokr_w2
        return weight_change(self.lokr_w1, w2, self.weight_shape, self.scale)


class LoKr(Adapter):
    kind = "lokr"
    order = 2
    labels = {"lokr": "LoKr"}
    optional = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    trainable = LoKrTrainable
    train_options = {"lokr_factor": "factor"}

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

    def weight_change(self, orig: Tensor, dyn: int | None) -> Tensor:
        dev = orig.device
        w1 = self.optional_factor("lokr_w1", dev)
        if w1 is None:
            w1 = self.factor("lokr_w1_a", dev) @ self.factor("lokr_w1_b", dev)
        w2 = self.optional_factor("lokr_w2", dev)
        if w2 is None and "lokr_t2" in self.w:
            w2 = cp_weight(self.factor("lokr_t2", dev), self.factor("lokr_w2_a", dev), self.factor("lokr_w2_b", dev))
        elif w2 is None:
            w2 = low_rank(self.factor("lokr_w2_a", dev), self.factor("lokr_w2_b", dev))
        return weight_change(w1, w2, orig.shape, self.scale())
