"""Running the tiny test models the way the WebUI runs them."""
from __future__ import annotations

import torch

import models


def unet_out(m: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    unet = m.model.diffusion_model
    g = torch.Generator().manual_seed(seed)
    ctx_dim = unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 5, ctx_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10]), ctx)


def te_out(m: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    tokens = models.random_tokens(seed=seed)
    wrapped = m.cond_stage_model.wrapped
    with torch.no_grad():
        if hasattr(wrapped, "transformer"):
            return wrapped.transformer(tokens).last_hidden_state
        return models.encode_text(wrapped.model, tokens)


def state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits (fp8 through a byte view: torch 2.1 cannot compare it)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.itemsize == 1 and a.is_floating_point():
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def same_state(m: torch.nn.Module, ref: dict[str, torch.Tensor]) -> bool:
    now = m.state_dict()
    return now.keys() == ref.keys() and all(same_bits(now[k], ref[k]) for k in ref)
