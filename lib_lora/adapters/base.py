"""What every adapter kind shares: scaling, DoRA, the multiplier, merge and bypass entry points.

Each kind (one small module beside this one) only says which tensors it needs and how its weight
delta is built from them, as a pure function of its factors and the original weight.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


class Adapter:
    """One file module's factors for one model weight; immutable after loading."""

    kind: ClassVar[str] = ""
    required: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[tuple[str, ...]] = ()
    uses_alpha: ClassVar[bool] = True
    common: ClassVar[tuple[str, ...]] = ("alpha", "scale", "dora_scale", "lora_magnitude_vector")

    def __init__(self, key: str, w: dict[str, Tensor]):
        self.key = key
        self.w = w
        self.alpha = float(w["alpha"].float().reshape(-1)[0]) if "alpha" in w and w["alpha"].numel() else None
        self.rank: int | None = None
        self.magnitude = w.get("dora_scale", w.get("lora_magnitude_vector"))
        self._cache: dict[tuple, Tensor] = {}

    @classmethod
    def accepts(cls, w: dict[str, Tensor]) -> bool:
        return all(k in w for k in cls.required)

    @classmethod
    def known(cls) -> set[str]:
        return set(cls.required) | set(cls.optional) | set(cls.common)

    def scale(self) -> float:
        if "scale" in self.w:
            return float(self.w["scale"].float().reshape(-1)[0])
        if self.uses_alpha and self.alpha is not None and self.rank:
            return self.alpha / self.rank
        return 1.0

    def t(self, name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        """A factor on the compute device in fp32 (fp16 GEMMs do not exist on every CPU torch)."""
        key = (name, device, dtype)
        hit = self._cache.get(key)
        if hit is None:
            hit = self.w[name].to(device=device, dtype=dtype)
            if device.type != "meta":
                self._cache[key] = hit
        return hit

    def drop_cache(self) -> None:
        self._cache.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.w.values())

    # --- the math ----------------------------------------------------------------------------
    def diff(self, orig: Tensor, dyn: int | None) -> Tensor:
        """Weight delta at multiplier 1, alpha scaling included; fp32, shaped like ``orig``."""
        raise NotImplementedError

    def bias_diff(self, device: torch.device) -> Tensor | None:
        return None

    def linear(self) -> bool:
        """Whether the delta at multiplier m is m times the delta at 1."""
        return self.magnitude is None

    def delta(self, orig: Tensor, multiplier: float, dyn: int | None = None) -> tuple[Tensor, Tensor | None]:
        d = self.diff(orig, dyn)
        if self.magnitude is not None:
            name = self._magnitude_name()
            d = dora_delta(orig, d, self.t(name, orig.device), per_row=name == "lora_magnitude_vector")
        b = self.bias_diff(orig.device)
        return d * multiplier, (b * multiplier if b is not None else None)

    def _magnitude_name(self) -> str:
        return "dora_scale" if "dora_scale" in self.w else "lora_magnitude_vector"

    def merge_into(self, buf: Tensor, orig: Tensor, multiplier: float, dyn: int | None) -> Tensor | None:
        """Add the delta to ``buf`` (fp32, shaped like the weight); return the bias delta."""
        d, b = self.delta(orig, multiplier, dyn)
        buf.add_(d)
        return b

    def bypass_add(self, out: Tensor, x: Tensor, module: torch.nn.Module, weight: Tensor, multiplier: float,
                   dyn: int | None) -> Tensor:
        """``out`` plus this adapter's extra output; in place when autograd does not need ``out``."""
        extra = self.bypass(x, module, weight, multiplier, dyn)
        return out.add_(extra) if not (torch.is_grad_enabled() and out.requires_grad) else out + extra

    def bypass(self, x: Tensor, module: torch.nn.Module, weight: Tensor, multiplier: float, dyn: int | None) -> Tensor:
        """The extra output of ``module`` for input ``x``; generic path through the delta weight."""
        orig = weight.detach().to(torch.float32)
        d, b = self.delta(orig, multiplier, dyn)
        return functional_op(module, x, d, b)


def functional_op(module: torch.nn.Module, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``module``'s operation with weight ``w`` and bias ``b``: linear in both, so it gives the extra output."""
    dtype = x.dtype
    if x.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    w = w.to(x.dtype)
    b = b.to(x.dtype) if b is not None else None
    if isinstance(module, torch.nn.Conv2d):
        out = F.conv2d(x, w, b, module.stride, module.padding, module.dilation, module.groups)
    elif isinstance(module, torch.nn.LayerNorm):
        out = F.layer_norm(x, module.normalized_shape, w, b if b is not None else torch.zeros_like(w), module.eps)
    elif isinstance(module, torch.nn.GroupNorm):
        out = F.group_norm(x, module.num_groups, w, b if b is not None else torch.zeros_like(w), module.eps)
    else:
        out = F.linear(x, w.reshape(w.shape[0], -1), b)
    return out.to(dtype)


def dora_delta(orig: Tensor, d: Tensor, magnitude: Tensor, per_row: bool = False) -> Tensor:
    """DoRA: rescale the merged weight to the stored magnitude, per output row (kohya/LyCORIS
    ``dora_scale`` of shape [out, 1, …], PEFT ``lora_magnitude_vector``) or per input column
    (LyCORIS with ``wd_on_out=False``, shape [1, in, …]); PEFT's vector is always per output row, whatever
    its shape (convs store it as [1, out, 1, 1]). Returns the change from ``orig``."""
    merged = orig + d
    eps = torch.finfo(merged.dtype).eps
    if per_row or magnitude.dim() == 1 or (magnitude.shape[0] == merged.shape[0] and magnitude.shape[1] == 1):
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(merged.shape[0], *[1] * (merged.dim() - 1))
    else:
        norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
                .reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1))
    return merged * (magnitude.reshape(norm.shape) / (norm + eps)) - orig


def cp_weight(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """Rebuild a Tucker (CP) factorised conv weight: core ``t`` [r, r, k, k], ``wa`` [r, out], ``wb`` [r, in]."""
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)
