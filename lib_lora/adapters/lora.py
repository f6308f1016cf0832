"""LoRA / LoCon: ΔW = up · (mid ·) down · alpha/rank (kohya, LyCORIS, PEFT and diffusers files), and kohya's
trainable LoRA/LoCon (``networks.lora``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Adapter, Tensor, TrainableAdapter, layer_shape, low_rank

UP, DOWN, MID = "lora_up.weight", "lora_down.weight", "lora_mid.weight"


def weight_change(up: Tensor, down: Tensor, mid: Tensor | None, shape: torch.Size, scale: float) -> Tensor:
    """ΔW = up · (mid ·) down · scale, shaped ``shape``; ``mid`` is a Tucker core [r, r, k, k]."""
    if mid is not None:
        d = torch.einsum("n m k l, i n, m j -> i j k l", mid, up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1))
    else:
        d = low_rank(up.reshape(up.shape[0], -1), down)
    return d.reshape(shape) * scale


def rank_path(x: Tensor, layer: nn.Module, up: Tensor, down: Tensor, mid: Tensor | None = None,
              dropout: float | None = None) -> Tensor:
    """up((mid)(down(x))) without the scale: down carries the layer's kernel, stride and padding (or ``mid``
    does, for a Tucker core), up is a 1x1; ``dropout`` acts on the rank dimension (kohya's)."""
    if isinstance(layer, nn.Conv2d):
        r = down.shape[0]
        if mid is not None:
            h = F.conv2d(F.conv2d(x, down.reshape(r, -1, 1, 1)), mid, None, layer.stride, layer.padding, layer.dilation)
        else:
            down = down.reshape(r, -1, 1, 1) if down.dim() == 2 else down
            h = F.conv2d(x, down, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    else:
        h = F.linear(x, down.reshape(down.shape[0], -1))
    if dropout:
        h = F.dropout(h, dropout)
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(h, up.reshape(up.shape[0], -1, 1, 1))
    return F.linear(h, up.reshape(up.shape[0], -1))


def file_tensors(up: Tensor, down: Tensor, alpha: Tensor) -> dict[str, Tensor]:
    """One kohya LoRA module's tensors by name."""
    return {UP: up, DOWN: down, "alpha": alpha}


def is_locon(down: Tensor) -> bool:
    """A down factor with a kernel above 1x1 (a LoCon module)."""
    return down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)


class LoRATrainable(TrainableAdapter):
    """kohya's LoRA/LoCon: up(down(x)) · alpha/rank; down is a conv with the layer's kernel, up a 1x1."""

    def __init__(self, layer: nn.Module, dim: int, alpha: float, dropout: float | None):
        super().__init__(layer, alpha, dropout)
        out_f, in_f, k = layer_shape(layer)
        if k:
            self.lora_down = nn.Conv2d(in_f, dim, k, layer.stride, layer.padding, layer.dilation, bias=False)
            self.lora_up = nn.Conv2d(dim, out_f, 1, 1, bias=False)
        else:
            self.lora_down = nn.Linear(in_f, dim, bias=False)
            self.lora_up = nn.Linear(dim, out_f, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.scale = alpha / dim

    def _unscaled(self, x: Tensor) -> Tensor:
        return rank_path(x, self.layer, self.lora_up.weight, self.lora_down.weight,
                         dropout=self.dropout if self.training else None)

    def forward(self, x: Tensor) -> Tensor:
        return self._unscaled(x) * self.scale

    def add_to(self, out: Tensor, x: Tensor) -> Tensor:
        """``out + forward(x)`` with the scale and the sum in one in-place pass over the layer's output (safe:
        no layer kohya trains keeps its output for its own backward)."""
        return out.add_(self._unscaled(x).to(out.dtype), alpha=self.scale)


class LoRA(Adapter):
    kind = "lora"
    order = 0
    labels = {"lora": "LoRA", "locon": "LoCon"}
    required = (UP, DOWN)
    optional = (MID,)
    trainable = LoRATrainable

    def __init__(self, key: str, w: dict[str, Tensor]):
        super().__init__(key, w)
        self.rank = w[DOWN].shape[0]

    @classmethod
    def check(cls, w: dict[str, Tensor]) -> str | None:
        up, down = w[UP], w[DOWN]
        if up.dim() < 2 or down.dim() < 2:
            return f"lora_up/lora_down must be matrices, got {tuple(up.shape)} and {tuple(down.shape)}"
        if up.shape[1] != down.shape[0]:
            return f"rank mismatch: lora_up has {up.shape[1]}, lora_down has {down.shape[0]}"
        return None

    @classmethod
    def label(cls, kind: str, dora: bool = False) -> str:
        return "DoRA" if dora else cls.labels[kind]

    def shown_kind(self) -> str:
        return "locon" if is_locon(self.w[DOWN]) else "lora"

    def _factors(self, device: torch.device, dyn: int | None, dtype: torch.dtype = torch.float32):
        up = self.factor(UP, device, dtype)
        down = self.factor(DOWN, device, dtype)
        mid = self.optional_factor(MID, device, dtype)
        up = up.reshape(up.shape[0], -1)
        if dyn:
            up, down = up[:, :dyn], down[:dyn]
            mid = mid[:dyn, :dyn] if mid is not None else None
        return up, down, mid

    def weight_change(self, orig: Tensor, dyn: int | None) -> Tensor:
        return weight_change(*self._factors(orig.device, dyn), orig.shape, self.scale())

    def merge_into(self, buf: Tensor, orig: Tensor, multiplier: float, dyn: int | None) -> Tensor | None:
        if self.magnitude is not None or MID in self.w:
            return super().merge_into(buf, orig, multiplier, dyn)
        up, down, _ = self._factors(buf.device, dyn)
        buf.view(buf.shape[0], -1).addmm_(up, down.reshape(down.shape[0], -1), alpha=multiplier * self.scale())
        return None

    def bypass_add(self, out: Tensor, x: Tensor, module: nn.Module, weight: Tensor, multiplier: float,
                   dyn: int | None) -> Tensor:
        """Linear layers: one fused ``addmm_`` of the rank-r intermediate into the output."""
        inplace = not (torch.is_grad_enabled() and out.requires_grad)
        if (self.magnitude is not None or isinstance(module, nn.Conv2d) or not inplace
                or x.device.type == "cpu" and x.dtype != torch.float32 or not out.is_contiguous()
                or out.dtype != x.dtype):  # autocast: the layer computed in another dtype than its input
            return super().bypass_add(out, x, module, weight, multiplier, dyn)
        up, down, _ = self._factors(x.device, dyn, x.dtype)
        h = F.linear(x, down.reshape(down.shape[0], -1))
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up.t(), alpha=multiplier * self.scale())
        return out

    def bypass(self, x: Tensor, module: nn.Module, weight: Tensor, multiplier: float, dyn: int | None) -> Tensor:
        if self.magnitude is not None:
            return super().bypass(x, module, weight, multiplier, dyn)
        dtype = x.dtype
        ctype = torch.float32 if x.device.type == "cpu" else dtype
        up, down, mid = self._factors(x.device, dyn, ctype)
        return (rank_path(x.to(ctype), module, up, down, mid) * (multiplier * self.scale())).to(dtype)
