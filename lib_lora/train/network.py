"""Trainable LoRA / LoHa / LoKr modules hooked onto a loaded model, saved under kohya's key names.

The model is never modified: each trained layer gets a forward hook adding the module's extra output (open_clip's
``nn.MultiheadAttention`` gets the shared forward of ``lib_lora.mha`` instead, as its projections are not called as
modules), so the WebUI's loaded checkpoint can be trained and given back untouched. Which layers are trained follows kohya's
``networks.lora``: every Linear / 1x1 conv inside the UNet's transformer blocks and the text encoder's attention
and MLP blocks, plus (with ``conv_dim``) the ResBlocks' and down/upsamplers' layers. Every key name is
checked through the engine's own key mapping, so a saved file loads back onto exactly the trained layers.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LoraError
from ..keymap import FAMILY_NAMES, Target, split_key, target_for
from ..mha import mha_forward
from ..model_index import ModelIndex, checkpoint_name
from .config import TrainConfig

UNET_ATTN = ("SpatialTransformer", "Transformer2DModel")
UNET_CONV = ("ResBlock", "Downsample", "Upsample", "ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP", "ResidualAttentionBlock")


# ---- the trainable modules -----------------------------------------------------------------------
def _shape(org: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(out, in, kernel) of a Linear or Conv2d."""
    if isinstance(org, nn.Conv2d):
        return org.out_channels, org.in_channels, tuple(org.kernel_size)
    return org.out_features, org.in_features, ()


def _apply_weight(org: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(org, nn.Conv2d):
        return F.conv2d(x, w, None, org.stride, org.padding, org.dilation)
    return F.linear(x, w)


class LoRAModule(nn.Module):
    """kohya's LoRA/LoCon: up(down(x)) · alpha/rank; down is a conv with the layer's kernel, up a 1x1."""

    def __init__(self, org: nn.Module, dim: int, alpha: float, dropout: float | None):
        super().__init__()
        out_f, in_f, k = _shape(org)
        if k:
            self.lora_down = nn.Conv2d(in_f, dim, k, org.stride, org.padding, org.dilation, bias=False)
            self.lora_up = nn.Conv2d(dim, out_f, 1, 1, bias=False)
        else:
            self.lora_down = nn.Linear(in_f, dim, bias=False)
            self.lora_up = nn.Linear(dim, out_f, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = alpha / dim
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_down(x)
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout)
        return self.lora_up(h) * self.scale

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out + forward(x)`` with the scale and the sum in one in-place pass over the layer's output (safe:
        no layer kohya trains keeps its output for its own backward)."""
        h = self.lora_down(x)
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout)
        return out.add_(self.lora_up(h).to(out.dtype), alpha=self.scale)


class LoHaModule(nn.Module):
    """LyCORIS LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/rank, applied as an extra layer call with ΔW."""

    def __init__(self, org: nn.Module, dim: int, alpha: float, dropout: float | None):
        super().__init__()
        out_f, in_f, k = _shape(org)
        flat_in = in_f * math.prod(k)
        self.hada_w1_a = nn.Parameter(torch.empty(out_f, dim).normal_(std=0.1))
        self.hada_w1_b = nn.Parameter(torch.empty(dim, flat_in).normal_(std=1.0))
        self.hada_w2_a = nn.Parameter(torch.zeros(out_f, dim))
        self.hada_w2_b = nn.Parameter(torch.empty(dim, flat_in).normal_(std=1.0))
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = alpha / dim
        self.dropout = dropout
        self.wshape = (out_f, in_f, *k)
        self._org = [org]

    def delta(self) -> torch.Tensor:
        return ((self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)).reshape(self.wshape) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _apply_weight(self._org[0], x, self.delta())
        return F.dropout(out, self.dropout) if self.dropout and self.training else out


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of a dimension into m·n (m ≤ n), as square as ``factor`` allows."""
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


class LoKrModule(nn.Module):
    """LyCORIS LoKr: ΔW = w1 ⊗ w2, w2 low-rank (w2a·w2b, scaled alpha/rank) unless the rank is too big for it."""

    def __init__(self, org: nn.Module, dim: int, alpha: float, dropout: float | None, factor: int):
        super().__init__()
        out_f, in_f, k = _shape(org)
        out_m, out_n = factorization(out_f, factor)
        in_m, in_n = factorization(in_f, factor)
        self.lokr_w1 = nn.Parameter(torch.empty(out_m, in_m))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        self.decomposed = dim < max(out_n, in_n) / 2
        if self.decomposed:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_n, dim))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            self.lokr_w2_b = nn.Parameter(torch.zeros(dim, in_n * math.prod(k)))
            self.scale = alpha / dim
        else:
            self.lokr_w2 = nn.Parameter(torch.zeros(out_n, in_n, *k))
            self.scale = 1.0
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.dropout = dropout
        self.wshape = (out_f, in_f, *k)
        self._org = [org]

    def delta(self) -> torch.Tensor:
        w2 = self.lokr_w2_a @ self.lokr_w2_b if self.decomposed else self.lokr_w2
        w1 = self.lokr_w1.reshape(*self.lokr_w1.shape, *[1] * (w2.dim() - 2))
        return torch.kron(w1, w2).reshape(self.wshape) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _apply_weight(self._org[0], x, self.delta())
        return F.dropout(out, self.dropout) if self.dropout and self.training else out


# ---- the network ---------------------------------------------------------------------------------
class TrainNetwork(nn.Module):
    """All trainable modules of one run, keyed by kohya name; ``attach()`` hooks them onto the model."""

    def __init__(self, sd_model: nn.Module, cfg: TrainConfig):
        super().__init__()
        index = ModelIndex(sd_model)
        if index.family not in ("sd1", "sd2", "sdxl"):
            raise LoraError(None, f"training {FAMILY_NAMES.get(index.family, index.family)} models is not supported",
                            "load an SD1.x, SD2.x or SDXL checkpoint")
        self.family = index.family
        self.algo = cfg.network_algo
        self.loras = nn.ModuleDict()
        self.parts: dict[str, str] = {}
        self.skipped: list[str] = []
        self._targets: dict[str, tuple[nn.Module, str | None]] = {}
        self._handles: list = []
        self._mha: dict[nn.MultiheadAttention, dict[str, nn.Module]] = {}
        self._replaced: list[tuple[nn.Module, object]] = []
        for (full, sub), (org, part, path, dim, alpha) in _candidates(sd_model, index, cfg).items():
            key = index.kohya_name(Target(part, path, sub))
            if not _resolves_to(key, full, sub, index):
                self.skipped.append(f"{full}{'.' + sub if sub else ''}: kohya name {key} would not load back onto it")
                continue
            self.loras[key] = self._make(org.out_proj if sub else org, dim, alpha, cfg)
            self.parts[key] = part
            self._targets[key] = (org, sub)
            parent = index.parent_mha.get(full)
            if sub or parent:
                mha = org if sub else index.by_name[parent]
                self._mha.setdefault(mha, {})
                if sub:
                    self._mha[mha][sub] = self.loras[key]
        if not self.loras:
            raise LoraError(None, "the model has no layers to train", "check network_train_unet_only / _text_encoder_only")

    def _make(self, org: nn.Module, dim: int, alpha: float, cfg: TrainConfig) -> nn.Module:
        if self.algo == "loha":
            return LoHaModule(org, dim, alpha, cfg.network_dropout)
        if self.algo == "lokr":
            return LoKrModule(org, dim, alpha, cfg.network_dropout, cfg.lokr_factor)
        return LoRAModule(org, dim, alpha, cfg.network_dropout)

    def attach(self) -> None:
        """Hook every module onto its layer (idempotent)."""
        if self._handles or self._replaced:
            return
        for key, lora in self.loras.items():
            org, sub = self._targets[key]
            if not sub:
                self._handles.append(org.register_forward_hook(_hook(lora)))
        for mha, loras in self._mha.items():
            self._replaced.append((mha, mha.__dict__.get("forward")))
            mha.forward = functools.partial(mha_forward, mha, _mha_extra(loras))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for mha, previous in self._replaced:
            if previous is None:
                mha.__dict__.pop("forward", None)
            else:
                mha.forward = previous
        self._replaced.clear()

    def param_groups(self, te_lr: float, unet_lr: float) -> list[dict]:
        """Text encoder first, then UNet (kohya's order), each with its own learning rate."""
        groups = []
        for part, lr in (("te", te_lr), ("unet", unet_lr)):
            params = [p for k, m in self.loras.items() if (self.parts[k] == "unet") == (part == "unet")
                      for p in m.parameters()]
            if params:
                groups.append({"params": params, "lr": lr, "name": part})
        return groups

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for key, lora in self.loras.items():
            for name, t in lora.state_dict().items():
                out[f"{key}.{name}"] = t.detach().to("cpu", dtype or t.dtype).contiguous().clone()
        return out

    def load_kohya_state_dict(self, sd: dict[str, torch.Tensor], source: str, strict: bool = True) -> int:
        """Copy matching tensors in; with ``strict`` every tensor must exist on both sides with equal shapes."""
        mine = {f"{k}.{n}": t for k, m in self.loras.items() for n, t in m.state_dict().items()}
        problems = [f"{k}: shape {tuple(sd[k].shape)} but the network has {tuple(t.shape)}"
                    for k, t in mine.items() if k in sd and sd[k].shape != t.shape]
        if strict:
            problems += [f"{k}: missing" for k in mine if k not in sd]
            problems += [f"{k}: not in this network" for k in sd if k not in mine]
        if problems:
            raise LoraError(source, f"network weights do not fit ({len(problems)} problems, e.g. {problems[0]})",
                            "use the same network_algo, network_dim, conv_dim and trained parts")
        with torch.no_grad():
            for k, t in mine.items():
                if k in sd:
                    t.copy_(sd[k])
        return sum(k in sd for k in mine)


def _hook(lora: nn.Module):
    dtype = next(iter(lora.parameters())).dtype

    def hook(_module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if isinstance(lora, LoRAModule):
            return lora.add_to(out, args[0].to(dtype))
        return out + lora(args[0].to(dtype)).to(out.dtype)

    return hook


def _mha_extra(loras: dict[str, nn.Module]):
    """q/k/v outputs for ``mha_forward``; out_proj is an ordinary hooked Linear there, called as a module."""
    dtypes = {sub: next(iter(lora.parameters())).dtype for sub, lora in loras.items()}

    def extra(sub: str, x: torch.Tensor) -> torch.Tensor | None:
        lora = loras.get(sub)
        if lora is None:
            return None
        return lora(x.to(dtypes[sub])).to(x.dtype)

    return extra


def _candidates(sd_model: nn.Module, index: ModelIndex, cfg: TrainConfig) -> dict:
    """{(checkpoint name, q/k/v or None): (layer, part, path, rank, alpha)} of every layer kohya's networks
    would train; an ``nn.MultiheadAttention`` gives its q, k and v projections (and its out_proj as a Linear)."""
    by_name = {name: key for key, (name, _m) in index.modules.items()}
    found: dict[str, tuple] = {}
    for cname, container in sd_model.named_modules():
        cls = type(container).__name__
        if cls in UNET_ATTN or (cls in UNET_CONV and cfg.conv_dim is not None):
            want = "unet"
        elif cls in TE_BLOCKS:
            want = "te"
        else:
            continue
        if (want == "te" and cfg.network_train_unet_only) or (want == "unet" and cfg.network_train_text_encoder_only):
            continue
        for sub, layer in container.named_modules():
            if isinstance(layer, nn.MultiheadAttention) and want == "te":
                full = checkpoint_name(f"{cname}.{sub}")
                key = by_name.get(full)
                if key is not None:
                    for qkv in "qkv":
                        found[(full, qkv)] = (layer, key[0], key[1], cfg.network_dim, cfg.network_alpha)
                continue
            if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                continue
            if isinstance(layer, nn.Conv2d) and layer.groups != 1:
                continue
            full = checkpoint_name(f"{cname}.{sub}")
            key = by_name.get(full)
            if key is None or (key[0] == "unet") != (want == "unet"):
                continue
            big_conv = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
            if big_conv and cfg.conv_dim is None:
                continue
            dim, alpha = (cfg.conv_dim, cfg.effective_conv_alpha) if big_conv else (cfg.network_dim, cfg.network_alpha)
            found[(full, None)] = (layer, key[0], key[1], dim, alpha)
    return found


def _resolves_to(key: str, full: str, sub: str | None, index: ModelIndex) -> bool:
    split = split_key(key + ".alpha")
    if split is None:
        return False
    hit = index.resolve(target_for(split[0], split[1], index.family))
    return hit is not None and hit[0] == full and hit[2] == sub
