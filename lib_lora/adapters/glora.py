"""GLoRA: ΔW = (W·a1·a2 + b1·b2) · alpha/rank (LyCORIS)."""
from __future__ import annotations

import torch

from .base import Adapter, Tensor


class GLoRA(Adapter):
    kind = "glora"
    order = 3
    reads_weight = True
    labels = {"glora": "GLoRA"}
    required = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")
    optional = ("bm.weight",)

    def __init__(self, key: str, w: dict[str, Tensor]):
        super().__init__(key, w)
        self.rank = w["a2.weight"].shape[0]

    def weight_change(self, orig: Tensor, dyn: int | None) -> Tensor:
        dev = orig.device
        a1, a2 = self.factor("a1.weight", dev), self.factor("a2.weight", dev)
        b1, b2 = self.factor("b1.weight", dev), self.factor("b2.weight", dev)
        if "bm.weight" in self.w:
            wb = torch.einsum("n m k l, i n, m j -> i j k l", self.factor("bm.weight", dev),
                              b1.reshape(b1.shape[0], -1), b2.reshape(b2.shape[0], -1))
        else:
            wb = b1.reshape(b1.shape[0], -1) @ b2.reshape(b2.shape[0], -1)
        wa1, wa2 = a1.reshape(a1.shape[0], -1), a2.reshape(a2.shape[0], -1)
        if orig.dim() > 2:
            wa = torch.einsum("o i ..., i j -> o j ...", orig, wa1)
            wa = torch.einsum("o i ..., i j -> o j ...", wa, wa2)
        else:
            wa = orig @ wa1 @ wa2
        return (wb.reshape(orig.shape) + wa) * self.scale()
