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
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import LoraError
from ..forward_swap import ForwardSwap
from .samples import SamplePrompt

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
    ``sample_fn(prompts: list[SamplePrompt], step) -> images`` optionally renders sample images with the network
    active (each prompt with kohya's per-line options: size, steps, CFG scale, seed, negative prompt).
    ``base_model_info`` overrides metadata about the base checkpoint (``ss_sd_model_name``, ``ss_sd_model_hash``,
    ``ss_new_sd_model_hash``), e.g. from hashes the WebUI already knows.
    """

    sd_model: nn.Module
    vae_encode: Callable[[Tensor], Tensor]
    tokenize: Callable[[list[str]], Tensor]
    encode_text: Callable[[Tensor], Tensor]
    vae_id: str
    sample_fn: Callable[[list[SamplePrompt], int], list] | None = None
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
    """SD's DDPM training schedule: scaled_linear betas 0.00085..0.012 over 1000 steps (diffusers' float32 maths).

    ``zero_terminal_snr`` rescales it so the last timestep is pure noise (Lin et al. 2023, kohya's
    ``fix_noise_scheduler_betas_for_zero_terminal_snr``); that last ᾱ is then 2⁻²⁴ rather than 0, as in
    diffusers' schedulers, so SNR-based weights stay finite.
    """

    def __init__(self, steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 zero_terminal_snr: bool = False):
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float32) ** 2
        self.steps = steps
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if zero_terminal_snr:
            root = self.alphas_cumprod.sqrt()
            first, last = root[0].clone(), root[-1].clone()
            self.alphas_cumprod = ((root - last) * first / (first - last)) ** 2
            self.alphas_cumprod[-1] = 2.0 ** -24

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

    def loss_weight(self, t: Tensor, min_snr_gamma: float | None, v_prediction: bool, debiased: bool = False,
                    v_like_noise: bool = False, v_pred_like: float | None = None) -> Tensor | None:
        """kohya's ``post_process_loss`` as one weight per sample: ``apply_snr_weight`` min(SNR, γ)/SNR (ε) or
        min(SNR, γ)/(SNR+1) (v); ``scale_v_prediction_loss_like_noise_prediction`` s = SNR/(SNR+1);
        ``add_v_prediction_like_loss`` 1 + v_pred_like/s; ``apply_debiased_estimation`` 1/√SNR (ε) or 1/(SNR+1)
        (v); SNR capped at 1000 where kohya caps it."""
        factors = []
        snr = self.snr(t)
        capped = torch.clamp(snr, max=1000.0)
        if min_snr_gamma:
            clipped = torch.clamp(snr, max=min_snr_gamma)
            factors.append(clipped / (snr + 1.0) if v_prediction else clipped / snr)
        scale = capped / (capped + 1.0)
        if v_like_noise:
            factors.append(scale)
        if v_pred_like:
            factors.append(1.0 + v_pred_like / scale)
        if debiased:
            factors.append(1.0 / (capped + 1.0) if v_prediction else 1.0 / capped.sqrt())
        if not factors:
            return None
        weight = factors[0]
        for f in factors[1:]:
            weight = weight * f
        return weight

    def huber_threshold(self, t: Tensor, schedule: str, c: float, scale: float = 1.0) -> Tensor:
        """kohya's ``get_huber_threshold_if_needed``: constant c, exponential decay from 1 to c over the
        timesteps (both times ``huber_scale``), or (1 − c)/(1 + σ)² + c with σ = √((1 − ᾱ)/ᾱ) (``snr``)."""
        if schedule == "constant":
            return torch.full(t.shape, c * scale)
        if schedule == "exponential":
            return torch.exp(math.log(c) / self.steps * t.float()) * scale
        ac = self.alphas_cumprod[t.cpu()]
        sigma = ((1.0 - ac) / ac).sqrt()
        return (1.0 - c) / (1.0 + sigma) ** 2 + c


def elementwise_loss(pred: Tensor, target: Tensor, loss_type: str, huber_c: Tensor | None) -> Tensor:
    """kohya's ``conditional_loss`` without reduction: l2, l1, pseudo-Huber 2c(√(d² + c²) − c), or smooth_l1
    2(√(d² + c²) − c), with one c per sample."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    c = huber_c.to(pred.device, pred.dtype).reshape(-1, *[1] * (pred.dim() - 1))
    root = torch.sqrt((pred - target) ** 2 + c ** 2) - c
    return 2 * c * root if loss_type == "huber" else 2 * root


def pyramid_noise(noise: Tensor, gen: torch.Generator, iterations: int, discount: float) -> Tensor:
    """kohya's ``pyramid_noise_like`` (multi-resolution noise), drawn from ``gen``: noise at scales shrinking
    by a random factor in [2, 4) per level, upsampled, weighted discount^level, then normalised to unit std."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=gen)) * 2 + 2
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        coarse = torch.randn((b, c, hn, wn), generator=gen)
        out += F.interpolate(coarse, size=(h, w), mode="bilinear") * discount ** i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


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
    swaps = []
    if enabled:
        for block in blocks:
            original = block.forward

            def forward(*args, _original=original, **kwargs):
                if not torch.is_grad_enabled():
                    return _original(*args, **kwargs)
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)

            swaps.append(ForwardSwap(block, forward))
    try:
        yield
    finally:
        for m, name, value in flags:
            setattr(m, name, value)
        for swap in swaps:
            swap.remove()


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
