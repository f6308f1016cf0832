"""``nn.MultiheadAttention``'s forward with extra outputs added to its q/k/v and out projections.

open_clip's text encoders (SD2, SDXL's second encoder) use ``nn.MultiheadAttention``, whose forward reads
``in_proj_weight`` and ``out_proj.weight`` directly, so forward hooks on those projections never run. Both the
bypass patcher and the trainer replace the forward of such a module with this one.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

Extra = Callable[[str, torch.Tensor], Optional[torch.Tensor]]
"""``extra(sub, x)``: what to add to projection ``sub`` ("q", "k", "v" or "out") for its input ``x``, or None."""


def mha_forward(mha: torch.nn.MultiheadAttention, extra: Extra, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
    """Same arguments and results as ``nn.MultiheadAttention.forward`` (self-attention layouts open_clip uses)."""
    if mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    e = mha.embed_dim
    proj = []
    for i, (sub, x) in enumerate(zip("qkv", (query, key, value))):
        bias = None if mha.in_proj_bias is None else mha.in_proj_bias[i * e:(i + 1) * e]
        y = F.linear(x, mha.in_proj_weight[i * e:(i + 1) * e], bias)
        add = extra(sub, x)
        proj.append(y if add is None else y + add)
    q, k, v = proj
    tgt, bsz, _ = q.shape
    h, d = mha.num_heads, e // mha.num_heads
    q, k, v = (t.reshape(t.shape[0], bsz * h, d).transpose(0, 1).reshape(bsz, h, t.shape[0], d) for t in (q, k, v))
    mask = _additive_mask(attn_mask, key_padding_mask, bsz, h, tgt, k.shape[2], q.dtype, is_causal)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    if mask is not None:
        scores = scores + mask
    attn = scores.softmax(-1)
    if mha.training and mha.dropout > 0:
        attn = F.dropout(attn, mha.dropout)
    o = (attn @ v).permute(2, 0, 1, 3).reshape(tgt, bsz, e)
    out = mha.out_proj(o)
    add = extra("out", o)
    if add is not None:
        out = out + add
    if mha.batch_first:
        out = out.transpose(0, 1)
    weights = None
    if need_weights:
        weights = attn.mean(1) if average_attn_weights else attn
    return out, weights


def _additive_mask(attn_mask, key_padding_mask, bsz, heads, tgt, src, dtype, is_causal):
    mask = None
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(tgt, src, dtype=torch.bool).triu(1)
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        m = m.to(dtype)
        mask = m.reshape(bsz, heads, tgt, src) if m.dim() == 3 else m
    if key_padding_mask is not None:
        k = key_padding_mask
        if k.dtype == torch.bool:
            k = torch.zeros(k.shape, dtype=dtype, device=k.device).masked_fill(k, float("-inf"))
        k = k.to(dtype).reshape(bsz, 1, 1, src)
        mask = k if mask is None else mask + k
    return mask
