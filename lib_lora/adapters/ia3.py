"""IA3: the weight scaled per output (or, with ``on_input``, per input) channel: ΔW = W ⊙ w."""
from __future__ import annotations

from .base import Adapter, Tensor


class IA3(Adapter):
    kind = "ia3"
    order = 7  # its lone "weight" is the loosest match: tried last
    reads_weight = True
    labels = {"ia3": "IA3"}
    required = ("weight",)
    optional = ("on_input",)
    uses_alpha = False

    @classmethod
    def accepts(cls, w: dict[str, Tensor]) -> bool:
        t = w.get("weight")
        return t is not None and t.dim() >= 1 and sum(d != 1 for d in t.shape) <= 1

    def weight_change(self, orig: Tensor, dyn: int | None) -> Tensor:
        w = self.factor("weight", orig.device).reshape(-1)
        on_input = "on_input" in self.w and bool(self.w["on_input"].reshape(-1)[0])
        shape = [1] * orig.dim()
        shape[1 if on_input else 0] = -1
        return orig * w.reshape(shape)
