"""What every adapter kind shares: scaling, DoRA, the multiplier, merge and bypass entry points, and the base of
the kinds' trainable forms.

Each kind (one small module beside this one) says which tensors it reads, what shapes they must have, how its
weight change is built from them (a pure function, used by inference and by the trainable form alike) and, if
it can be trained, its trainable form. Vocabulary: a kind's *weight change* is ΔW at multiplier 1, alpha scaling
included; a *delta* is the change at a given multiplier, DoRA included.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


class UnusableModule(ValueError):
    """A file module whose tensors no kind can use; the message says why."""


class Adapter:
    """One file module's factors for one model weight; immutable after loading."""

    kind: ClassVar[str] = ""
    order: ClassVar[int] = 0  # place among the kinds: tried on a file module, and listed, in this order
    labels: ClassVar[dict[str, str]] = {}  # kind (and variants a card tells apart) → what people call it
    required: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[tuple[str, ...]] = ()
    uses_alpha: ClassVar[bool] = True
    rank_is_block_size: ClassVar[bool] = False  # OFT: ``rank`` is its block size, not a rank a card shows
    reads_weight: ClassVar[bool] = False  # the weight change depends on the original weight's values, not just its shape
    common: ClassVar[tuple[str, ...]] = ("alpha", "scale", "dora_scale", "lora_magnitude_vector")
    trainable: ClassVar[type[TrainableAdapter] | None] = None
    # TrainConfig options the trainable form takes → their key in kohya's network_args
    train_options: ClassVar[dict[str, str]] = {}

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
    def check(cls, w: dict[str, Tensor]) -> str | None:
        """Why these tensors, accepted by this kind, cannot work together (None when their shapes fit)."""
        return None

    @classmethod
    def tensor_names(cls) -> set[str]:
        return set(cls.required) | set(cls.optional) | set(cls.common)

    @classmethod
    def label(cls, kind: str, dora: bool = False) -> str:
        return cls.labels[kind] + ("+DoRA" if dora else "")

    def needs_original(self) -> bool:
        """Whether the delta reads the original weight's values (a merge then keeps an unmodified copy beside its
        work buffer); DoRA always does."""
        return self.reads_weight or self.magnitude is not None

    def shown_kind(self) -> str:
        """The kind a card counts this module as (one of ``labels``)."""
        return self.kind

    def scale(self) -> float:
        if "scale" in self.w:
            return float(self.w["scale"].float().reshape(-1)[0])
        if self.uses_alpha and self.alpha is not None and self.rank:
            return self.alpha / self.rank
        return 1.0

    def factor(self, name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        """A stored tensor on the compute device in fp32 (fp16 GEMMs do not exist on every CPU torch), cached."""
        key = (name, device, dtype)
        hit = self._cache.get(key)
        if hit is None:
            hit = self.w[name].to(device=device, dtype=dtype)
            if device.type != "meta":
                self._cache[key] = hit
        return hit

    def optional_factor(self, name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor | None:
        return self.factor(name, device, dtype) if name in self.w else None

    def drop_cache(self) -> None:
        self._cache.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.w.values())

    # --- the math ----------------------------------------------------------------------------
    def weight_change(self, orig: Tensor, dyn: int | None) -> Tensor:
        """ΔW at multiplier 1, alpha scaling included; fp32, shaped like ``orig``."""
        raise NotImplementedError

    def bias_change(self, device: torch.device) -> Tensor | None:
        return None

    def delta(self, orig: Tensor, multiplier: float, dyn: int | None = None) -> tuple[Tensor, Tensor | None]:
        """(weight delta, bias delta) at ``multiplier``, DoRA applied."""
        d = self.weight_change(orig, dyn)
        if self.magnitude is not None:
            name = "dora_scale" if "dora_scale" in self.w else "lora_magnitude_vector"
            d = dora_delta(orig, d, self.factor(name, orig.device), per_row=name == "lora_magnitude_vector")
        b = self.bias_change(orig.device)
        return d * multiplier, (b * multiplier if b is not None else None)

    def merge_into(self, buf: Tensor, orig: Tensor, multiplier: float, dyn: int | None) -> Tensor | None:
        """Add the delta to ``buf`` (fp32, shaped like the weight); return the bias delta."""
        d, b = self.delta(orig, multiplier, dyn)
        buf.add_(d)
        return b

    def bypass_add(self, out: Tensor, x: Tensor, module: nn.Module, weight: Tensor, multiplier: float,
                   dyn: int | None) -> Tensor:
        """``out`` plus this adapter's extra output; in place when autograd does not need ``out``."""
        extra = self.bypass(x, module, weight, multiplier, dyn)
        return out.add_(extra) if not (torch.is_grad_enabled() and out.requires_grad) else out + extra

    def bypass(self, x: Tensor, module: nn.Module, weight: Tensor, multiplier: float, dyn: int | None) -> Tensor:
        """The extra output of ``module`` for input ``x``; generic path through the delta weight."""
        dtype = x.dtype
        if x.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        d, b = self.delta(weight.detach().to(torch.float32), multiplier, dyn)
        return layer_op(module, x, d.to(x.dtype), b.to(x.dtype) if b is not None else None).to(dtype)


class StoredChange(Adapter):
    """A kind whose file holds ΔW itself (``required[0]``) and optionally Δb (``optional[0]``)."""

    uses_alpha = False

    def weight_change(self, orig: Tensor, dyn: int | None) -> Tensor:
        return self.factor(self.required[0], orig.device).reshape(orig.shape)

    def bias_change(self, device: torch.device) -> Tensor | None:
        return self.optional_factor(self.optional[0], device)


class TrainableAdapter(nn.Module):
    """A kind's trainable form for one layer: its factors as parameters, initialised as kohya / LyCORIS do and
    named as the kind's file tensors (``state_dict()`` is the file module), plus the ``alpha`` buffer.
    Unless a kind overrides ``forward``, the layer's extra output is the layer's operation with the kind's
    weight change, the same pure function inference merges."""

    def __init__(self, layer: nn.Module, alpha: float, dropout: float | None):
        super().__init__()
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.dropout = dropout
        self.out_features, self.in_features, self.kernel = layer_shape(layer)
        self._layer = [layer]  # a list, so the layer is neither a submodule nor in the state dict

    @property
    def layer(self) -> nn.Module:
        return self._layer[0]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel)

    def weight_change(self) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        out = layer_op(self.layer, x, self.weight_change())
        return F.dropout(out, self.dropout) if self.dropout and self.training else out

    def add_to(self, out: Tensor, x: Tensor) -> Tensor:
        """The hooked layer's output ``out`` plus this module's extra output for its input ``x``."""
        return out + self(x).to(out.dtype)


def layer_shape(layer: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(out, in, kernel) of a Linear or Conv2d."""
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels, layer.in_channels, tuple(layer.kernel_size)
    return layer.out_features, layer.in_features, ()


def layer_op(module: nn.Module, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``module``'s operation with weight ``w`` and bias ``b``: linear in both, so it gives the extra output."""
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, w, b, module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, w, b if b is not None else torch.zeros_like(w), module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, w, b if b is not None else torch.zeros_like(w), module.eps)
    return F.linear(x, w.reshape(w.shape[0], -1), b)


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


def low_rank(a: Tensor, b: Tensor) -> Tensor:
    """``a`` [out, r] times ``b`` [r, in, *kernel], shaped [out, in, *kernel] (``b`` may come flattened)."""
    return (a @ b.reshape(b.shape[0], -1)).reshape(a.shape[0], *b.shape[1:])


def cp_weight(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """Rebuild a Tucker (CP) factorised conv weight: core ``t`` [r, r, k, k], ``wa`` [r, out], ``wb`` [r, in]."""
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)
