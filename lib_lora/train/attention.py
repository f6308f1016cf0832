"""The one place that decides the attention of the UNet a run trains: kohya's ``--sdpa``, ``--xformers`` and
``--mem_eff_attn`` (``TrainConfig.attention``), applied to ldm's / sgm's cross-attention modules for the run.

Each module gets an instance ``forward`` that calls its own ``to_q`` / ``to_k`` / ``to_v`` / ``to_out`` as modules,
so the trainer's hooks on those layers still see every call; the class's forward (the WebUI's choice, when
the WebUI's model is trained) is given back afterwards.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import LoraError
from ..forward_swap import ForwardSwap

ATTENTION_CLASSES = ("CrossAttention", "MemoryEfficientCrossAttention")
QUERY_CHUNK = 1024  # mem_eff_attn: queries per chunk


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H·D] → [B, H, L, D]."""
    b, n, inner = t.shape
    return t.view(b, n, heads, inner // heads).transpose(1, 2)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    weights = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return weights.softmax(dim=-1) @ v


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention over query chunks, each recomputed in backward, so no full attention matrix is kept
    (kohya's ``--mem_eff_attn`` in plain torch)."""
    if q.shape[-2] <= QUERY_CHUNK:
        return _chunk(q, k, v)
    parts = [checkpoint(_chunk, q[..., i:i + QUERY_CHUNK, :], k, v, use_reentrant=False) if torch.is_grad_enabled()
             else _chunk(q[..., i:i + QUERY_CHUNK, :], k, v) for i in range(0, q.shape[-2], QUERY_CHUNK)]
    return torch.cat(parts, dim=-2)


def xformers_kernel() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    try:
        ops = importlib.import_module("xformers.ops")
    except ImportError:
        raise LoraError(None, "xformers is not installed in this Python", "pip install xformers, or use --sdpa") from None

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = ops.memory_efficient_attention(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                                             v.transpose(1, 2).contiguous())
        return out.transpose(1, 2)

    return kernel


def kernel_for(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "sdpa":
        return sdpa
    if name == "mem_eff_attn":
        return chunked
    if name == "xformers":
        return xformers_kernel()
    raise LoraError(None, f"unknown attention {name!r}", "use sdpa, xformers or mem_eff_attn")


def attention_forward(module: nn.Module, kernel: Callable, x: torch.Tensor, context: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None, **_unused) -> torch.Tensor:
    """ldm / sgm ``CrossAttention.forward`` with the chosen kernel (the masks SD never passes are refused)."""
    if mask is not None:
        raise LoraError(None, "an attention mask reached the UNet's cross-attention", "train without --sdpa/--xformers")
    context = x if context is None else context
    q, k, v = (_heads(layer(t), module.heads) for layer, t in ((module.to_q, x), (module.to_k, context),
                                                                (module.to_v, context)))
    out = kernel(q, k.to(q.dtype), v.to(q.dtype))
    b, h, n, d = out.shape
    return module.to_out(out.transpose(1, 2).reshape(b, n, h * d))


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in ATTENTION_CLASSES
            and all(hasattr(m, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads"))]


@contextlib.contextmanager
def using_attention(unet: nn.Module, name: str | None) -> Iterator[int]:
    """The UNet's cross-attention through ``name`` (sdpa, xformers, mem_eff_attn) for the block; None leaves it
    as it is. Yields how many modules were switched."""
    if name is None:
        yield 0
        return
    kernel = kernel_for(name)
    modules = attention_modules(unet)
    swaps = [ForwardSwap(m, functools.partial(attention_forward, m, kernel)) for m in modules]
    try:
        yield len(modules)
    finally:
        for swap in swaps:
            swap.remove()
