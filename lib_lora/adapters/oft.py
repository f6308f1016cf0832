"""OFT and BOFT: the weight rotated by an orthogonal matrix built from skew-symmetric blocks
(Cayley transform), ΔW = R·W − W; kohya ``oft_blocks``, LyCORIS ``oft_blocks`` (+``rescale``), BOFT's
butterfly stages (4-D ``oft_blocks``), and old LyCORIS ``oft_diag`` (R stored directly)."""
from __future__ import annotations

import torch

from .base import Adapter, Tensor


def cayley(blocks: Tensor, constraint: float) -> Tensor:
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        q = q * torch.clamp(constraint / (torch.norm(q) + 1e-8), max=1.0)
    return (eye + q) @ (eye - q).inverse()


class OFT(Adapter):
    kind = "oft"
    order = 4
    reads_weight = True
    labels = {"oft": "OFT", "boft": "BOFT"}
    rank_is_block_size = True
    optional = ("oft_blocks", "oft_diag", "rescale")
    uses_alpha = False

    @classmethod
    def accepts(cls, w: dict[str, Tensor]) -> bool:
        return "oft_blocks" in w or "oft_diag" in w

    def __init__(self, key: str, w: dict[str, Tensor]):
        super().__init__(key, w)
        blocks = w.get("oft_blocks", w.get("oft_diag"))
        self.kind = "boft" if blocks.dim() == 4 else "oft"
        self.rank = blocks.shape[-1]

    def _rotations(self, orig: Tensor) -> Tensor:
        if "oft_diag" in self.w:
            return self.factor("oft_diag", orig.device)
        constraint = (self.alpha or 0.0) * orig.shape[0]
        return cayley(self.factor("oft_blocks", orig.device), constraint)

    def weight_change(self, orig: Tensor, dyn: int | None) -> Tensor:
        return self._boft(orig, 1.0) if self.kind == "boft" else self._oft(orig)

    def delta(self, orig: Tensor, multiplier: float, dyn: int | None = None) -> tuple[Tensor, Tensor | None]:
        if self.kind == "boft" and self.magnitude is None:
            return self._boft(orig, multiplier), None
        return super().delta(orig, multiplier, dyn)

    def _oft(self, orig: Tensor) -> Tensor:
        r = self._rotations(orig)
        eye = torch.eye(r.shape[-1], device=r.device, dtype=r.dtype)
        k, n = r.shape[0], r.shape[1]
        blocks = orig.reshape(k, n, *orig.shape[1:])
        d = torch.einsum("k n m, k n ... -> k m ...", r - eye, blocks).reshape(orig.shape)
        return self._rescale(d, orig)

    def _boft(self, orig: Tensor, scale: float) -> Tensor:
        r = self._rotations(orig)
        m, _num, b, _ = r.shape
        eye = torch.eye(b, device=r.device, dtype=r.dtype)
        half = b // 2
        inp = orig
        for i in range(m):
            bi = r[i] if scale == 1 else r[i] * scale + (1 - scale) * eye
            k = 2 ** i * half
            inp = inp.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
            inp = torch.einsum("b i j, b j ... -> b i ...", bi, inp)
            inp = inp.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
        if "rescale" in self.w:
            inp = inp * self.factor("rescale", orig.device).reshape(-1, *[1] * (orig.dim() - 1))
        return inp - orig

    def _rescale(self, d: Tensor, orig: Tensor) -> Tensor:
        if "rescale" not in self.w:
            return d
        s = self.factor("rescale", orig.device).reshape(-1, *[1] * (orig.dim() - 1))
        return s * d + (s - 1) * orig
