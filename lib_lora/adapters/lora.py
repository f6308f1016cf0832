"""LoRA / LoCon: ΔW = up · (mid ·) down · alpha/rank (kohya, LyCORIS, PEFT and diffusers files)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Adapter, Tensor


class LoRA(Adapter):
    kind = "lora"
    required = ("lora_up.weight", "lora_down.weight")
    optional = ("lora_mid.weight",)

    def __init__(self, key: str, w: dict[str, Tensor]):
        super().__init__(key, w)
        self.rank = w["lora_down.weight"].shape[0]

    def _factors(self, device: torch.device, dyn: int | None, dtype: torch.dtype = torch.float32):
        up = self.t("lora_up.weight", device, dtype)
        down = self.t("lora_down.weight", device, dtype)
        mid = self.t("lora_mid.weight", device, dtype) if "lora_mid.weight" in self.w else None
        up = up.reshape(up.shape[0], -1)
        if dyn:
            up, down = up[:, :dyn], down[:dyn]
            mid = mid[:dyn, :dyn] if mid is not None else None
        return up, down, mid

    def diff(self, orig: Tensor, dyn: int | None) -> Tensor:
        up, down, mid = self._factors(orig.device, dyn)
        if mid is not None:
            d = torch.einsum("n m k l, i n, m j -> i j k l", mid, up, down.reshape(down.shape[0], -1))
        else:
            d = up @ down.reshape(down.shape[0], -1)
        return d.reshape(orig.shape) * self.scale()

    def merge_into(self, buf: Tensor, orig: Tensor, multiplier: float, dyn: int | None) -> Tensor | None:
        if self.magnitude is not None or "lora_mid.weight" in self.w:
            return super().merge_into(buf, orig, multiplier, dyn)
        up, down, _ = self._factors(buf.device, dyn)
        buf.view(buf.shape[0], -1).addmm_(up, down.reshape(down.shape[0], -1), alpha=multiplier * self.scale())
        return None

    def bypass_add(self, out: Tensor, x: Tensor, module: torch.nn.Module, weight: Tensor, multiplier: float,
                   dyn: int | None) -> Tensor:
        """Linear layers: one fused ``addmm_`` of the rank-r intermediate into the output."""
        inplace = not (torch.is_grad_enabled() and out.requires_grad)
        if (self.magnitude is not None or isinstance(module, torch.nn.Conv2d) or not inplace
                or x.device.type == "cpu" and x.dtype != torch.float32 or not out.is_contiguous()):
            return super().bypass_add(out, x, module, weight, multiplier, dyn)
        up, down, _ = self._factors(x.device, dyn, x.dtype)
        h = F.linear(x, down.reshape(down.shape[0], -1))
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up.t(), alpha=multiplier * self.scale())
        return out

    def bypass(self, x: Tensor, module: torch.nn.Module, weight: Tensor, multiplier: float, dyn: int | None) -> Tensor:
        if self.magnitude is not None:
            return super().bypass(x, module, weight, multiplier, dyn)
        dtype = x.dtype
        ctype = torch.float32 if x.device.type == "cpu" else dtype
        x = x.to(ctype)
        up, down, mid = self._factors(x.device, dyn, ctype)
        s = multiplier * self.scale()
        if isinstance(module, torch.nn.Conv2d):
            r = down.shape[0]
            if down.dim() == 2:
                down = down.reshape(r, -1, 1, 1)
            if mid is not None:
                h = F.conv2d(x, down.reshape(r, -1, 1, 1))
                h = F.conv2d(h, mid, None, module.stride, module.padding, module.dilation)
            else:
                h = F.conv2d(x, down, None, module.stride, module.padding, module.dilation, module.groups)
            out = F.conv2d(h, up.reshape(up.shape[0], -1, 1, 1))
        else:
            out = F.linear(F.linear(x, down.reshape(down.shape[0], -1)) * s, up)
            return out.to(dtype)
        return (out * s).to(dtype)
