"""LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/rank, each factor optionally Tucker-decomposed (LyCORIS), and
LyCORIS' trainable LoHa."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import Adapter, Tensor, TrainableAdapter, cp_weight, low_rank


def weight_change(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, shape: tuple[int, ...], scale: float,
                  t1: Tensor | None = None, t2: Tensor | None = None) -> Tensor:
    """ΔW = (w1a·w1b) ⊙ (w2a·w2b) · scale, shaped ``shape``; a Tucker core ``t`` rebuilds its half instead."""
    def half(a: Tensor, b: Tensor, t: Tensor | None) -> Tensor:
        return cp_weight(t, a, b) if t is not None else low_rank(a, b).reshape(shape)

    return (half(w1a, w1b, t1) * half(w2a, w2b, t2)).reshape(shape) * scale


class LoHaTrainable(TrainableAdapter):
    """LyCORIS' LoHa initialisation: w1a ~ N(0, 0.1), w1b and w2b ~ N(0, 1), w2a = 0 (ΔW starts at 0)."""

    def __init__(self, layer: nn.Module, dim: int, alpha: float, dropout: float | None):
        super().__init__(layer, alpha, dropout)
        flat_in = self.in_features * math.prod(self.kernel)
        self.hada_w1_a = nn.Parameter(torch.empty(self.out_features, dim).normal_(std=0.1))
        self.hada_w1_b = nn.Parameter(torch.empty(dim, flat_in).normal_(std=1.0))
        self.hada_w2_a = nn.Parameter(torch.zeros(self.out_features, dim))
        self.hada_w2_b = nn.Parameter(torch.empty(dim, flat_in).normal_(std=1.0))
        self.scale = alpha / dim

    def weight_change(self) -> Tensor:
        return weight_change(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.weight_shape,
                             self.scale)


class LoHa(Adapter):
    kind = "loha"
    order = 1
    labels = {"loha": "LoHa"}
    required = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    optional = ("hada_t1", "hada_t2")
    trainable = LoHaTrainable

    def __init__(self, key: str, w: dict[str, Tensor]):
        super().__init__(key, w)
        self.rank = w["hada_w1_b"].shape[0]

    @classmethod
    def check(cls, w: dict[str, Tensor]) -> str | None:
        a, b = w["hada_w1_a"], w["hada_w1_b"]
        if "hada_t1" not in w and a.dim() == 2 and a.shape[1] != b.shape[0]:
            return f"rank mismatch: hada_w1_a has {a.shape[1]}, hada_w1_b has {b.shape[0]}"
        return None

    def weight_change(self, orig: Tensor, dyn: int | None) -> Tensor:
        f = [self.factor(n, orig.device) for n in self.required]
        t1, t2 = (self.optional_factor(n, orig.device) for n in self.optional)
        return weight_change(*f, orig.shape, self.scale(), t1, t2)
