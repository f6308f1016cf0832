"""What the trainer needs from a loaded model, and the diffusion maths around it.

The caller hands over a WebUI-style container plus three callables, so the WebUI can share its loaded
checkpoint and tests can use tiny models: the trainer never loads weights itself.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import LoraError

Tensor = torch.Tensor


@dataclass
class ModelBundle:
    """``sd_model``: ``.model.diffusion_model(x, t, context[, y])`` and the text encoders under
    ``.cond_stage_model`` (SD1/SD2) or ``.conditioner`` (SDXL).

    ``vae_encode(pixels [B,3,H,W] in [-1,1]) -> latents [B,4,H/8,W/8]`` already multiplied by the VAE scale
    factor (what the UNet is trained on); ``tokenize(captions) -> tokens`` (any value ``encode_text`` takes);
    ``encode_text(tokens) -> context``, or for SDXL ``(context, pooled)`` with the second encoder's pooled
    output (the trainer adds the size conditioning), must run the text encoder modules inside ``sd_model``
    (so text-encoder layers can be trained).
    ``vae_id`` names the VAE for the latent cache key (e.g. the checkpoint's sha256 and the VAE file name).
    ``sample_fn(prompts, step) -> images`` optionally renders sample images with the network active.
    ``base_model_info`` overrides metadata about the base checkpoint (``ss_sd_model_name``, ``ss_sd_model_hash``,
    ``ss_new_sd_model_hash``), e.g. from hashes the WebUI already knows.
    """

    sd_model: nn.Module
    vae_encode: Callable[[Tensor], Tensor]
    tokenize: Callable[[list[str]], Tensor]
    encode_text: Callable[[Tensor], Tensor]
    vae_id: str
    sample_fn: Callable[[list[str], int], list] | None = None
    base_model_info: dict[str, str] = field(default_factory=dict)

    @property
    def unet(self) -> nn.Module:
        try:
            return self.sd_model.model.diffusion_model
        except AttributeError:
            raise LoraError(None, "the model has no .model.diffusion_model", "pass a WebUI-style sd_model") from None

    @property
    def text_encoder(self) -> nn.Module:
        te = getattr(self.sd_model, "conditioner", None) or getattr(self.sd_model, "cond_stage_model", None)
        if te is None:
            raise LoraError(None, "the model has no .cond_stage_model or .conditioner", "pass a WebUI-style sd_model")
        return te


SIZE_EMBED_DIM = 256  # sgm's ConcatTimestepEmbedderND outdim in SDXL's config


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """sgm's / ldm's sinusoidal embedding: [cos | sin] of t times geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sdxl_vector(pooled: Tensor, sizes: Tensor) -> Tensor:
    """SDXL's ``y``: the pooled text embedding, then the embeddings of original size (h, w), crop top-left
    (top, left) and target size (h, w), as sgm's conditioner concatenates them (``sizes``: [B, 6])."""
    emb = timestep_embedding(sizes.reshape(-1).to(pooled.device), SIZE_EMBED_DIM).reshape(sizes.shape[0], -1)
    return torch.cat([pooled, emb.to(pooled.dtype)], dim=1)


class NoiseSchedule:
    """SD's DDPM training schedule: scaled_linear betas 0.00085..0.012 over 1000 steps (diffusers' float32 maths)."""

    def __init__(self, steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float32) ** 2
        self.steps = steps
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    def _coef(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        ac = self.alphas_cumprod.to(like.device)[t.to(like.device)].to(like.dtype)
        shape = (-1,) + (1,) * (like.dim() - 1)
        return ac.sqrt().reshape(shape), (1.0 - ac).sqrt().reshape(shape)

    def add_noise(self, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a, s = self._coef(t, latents)
        return a * latents + s * noise

    def velocity(self, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a, s = self._coef(t, latents)
        return a * noise - s * latents

    def snr(self, t: Tensor) -> Tensor:
        ac = self.alphas_cumprod[t.cpu()]
        return ac / (1.0 - ac)

    def loss_weight(self, t: Tensor, min_snr_gamma: float | None, v_prediction: bool) -> Tensor | None:
        """kohya's ``apply_snr_weight``: min(SNR, γ)/SNR (ε-prediction) or min(SNR, γ)/(SNR+1) (v-prediction)."""
        if not min_snr_gamma:
            return None
        snr = self.snr(t)
        clipped = torch.clamp(snr, max=min_snr_gamma)
        return clipped / (snr + 1.0) if v_prediction else clipped / snr


def checkpoint_blocks(bundle: ModelBundle) -> list[nn.Module]:
    """The blocks whose activations gradient checkpointing recomputes: UNet blocks and text-encoder layers."""
    unet = bundle.unet
    blocks = [b for name in ("input_blocks", "output_blocks") for b in getattr(unet, name, [])]
    if hasattr(unet, "middle_block"):
        blocks.append(unet.middle_block)
    for name, module in bundle.text_encoder.named_modules():
        if name.endswith(("encoder.layers", "transformer.resblocks")) and isinstance(module, nn.ModuleList):
            blocks += list(module)
    return blocks


@contextlib.contextmanager
def gradient_checkpointing(blocks: list[nn.Module], enabled: bool) -> Iterator[None]:
    """Turn ldm's own checkpointing off and, when ``enabled``, run each block under non-reentrant
    ``torch.utils.checkpoint`` instead; everything is given back afterwards.

    ldm's ``CheckpointFunction`` (on whenever the config says ``use_checkpoint: True``, as SD's do) returns
    gradients only for a block's own parameters, so the hooked network's parameters would get none.
    """
    flags = [(m, name, getattr(m, name)) for b in blocks for m in b.modules()
             for name in ("checkpoint", "use_checkpoint") if isinstance(getattr(m, name, None), bool)]
    for m, name, _ in flags:
        setattr(m, name, False)
    previous = [block.__dict__.get("forward") for block in blocks]
    if enabled:
        for block in blocks:
            original = block.forward

            def forward(*args, _original=original, **kwargs):
                if not torch.is_grad_enabled():
                    return _original(*args, **kwargs)
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)

            block.forward = forward
    try:
        yield
    finally:
        for m, name, value in flags:
            setattr(m, name, value)
        for block, prev in zip(blocks, previous):
            if prev is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = prev


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No gradients for the base model while training; its ``requires_grad`` flags and mode restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    model.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.train(mode)
