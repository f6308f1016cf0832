"""The WebUI's loaded checkpoint as the trainer's ModelBundle: its own modules, no second copy.

Everything here runs inside ``hold_model()``, i.e. with the WebUI's queue lock, so no generation, checkpoint
switch or VAE change can touch the model while a run uses it. The text encoder is the WebUI's wrapper
(``sd_hijack_clip``): its ``tokenize`` gives raw token ids, ``encode_with_transformers`` runs the CLIP modules
(with gradients, and the *CLIP skip* setting), so text-encoder layers train too; for SDXL both encoders of
the conditioner, their outputs side by side and the second one's pooled output, as sgm's conditioner does. Prompt emphasis and
textual-inversion embeddings are not applied to captions, as in kohya's trainer.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from modules import devices, lowvram, processing, sd_hijack, sd_vae, shared

from ..errors import LoraError
from ..train import ModelBundle, SamplePrompt, TrainConfig
from . import glue, job


@dataclass
class SampleOptions:
    width: int
    height: int
    steps: int
    seed: int
    cfg_scale: float = 7.0
    sampler_name: str = "Euler a"


@contextlib.contextmanager
def hold_model(task_id: str) -> Iterator[None]:
    """The WebUI's queue and job state for a whole run (its task ``task_id``); afterwards the
    prompt-conditioning cache is emptied (it may hold conds made with the network attached) and the new files
    are listed."""
    with job.webui_job(job.TRAIN_JOB, task_id), training_attention():
        try:
            yield
        finally:
            forget_conds()
            devices.torch_gc()
            glue.state().catalog.refresh()


@contextlib.contextmanager
def training_attention() -> Iterator[None]:
    """SDP attention for the run, the user's choice back afterwards: the split-attention variants the WebUI
    picks by default on CPU (and on CUDA without xformers) keep whole attention matrices for the backward
    pass, half the speed and 1.3× the memory of SDP in bench/train.py."""
    current = sd_hijack.current_optimizer
    sdp = next((o for o in sd_hijack.optimizers if o.name == "sdp"), None)
    if sdp is None or (current is not None and current.name in ("xformers", "sdp", "sdp-no-mem")):
        yield
        return
    sd_hijack.apply_optimizations(sdp.title())
    try:
        yield
    finally:
        sd_hijack.apply_optimizations()


def forget_conds() -> None:
    """The WebUI keeps the last prompt conditioning across jobs (*persistent cond cache*)."""
    processing.StableDiffusionProcessing.cached_c = [None, None]
    processing.StableDiffusionProcessing.cached_uc = [None, None]


def make_bundle(cfg: TrainConfig, samples: SampleOptions | None) -> ModelBundle:
    """The loaded model as a ModelBundle; also sets the config's base-model fields from it. Networks left
    merged by the last job are taken out first, so training starts from the checkpoint's own weights."""
    model = shared.sd_model
    if model is None:
        raise LoraError(None, "no checkpoint is loaded", "load an SD1.x, SD2.x or SDXL checkpoint")
    if not any(getattr(model, flag, False) for flag in ("is_sd1", "is_sd2", "is_sdxl")):
        raise LoraError(None, "training works on SD1.x, SD2.x and SDXL checkpoints; the loaded one is none of them",
                        "load an SD1.x, SD2.x or SDXL checkpoint")
    if lowvram.is_enabled(model):
        raise LoraError(None, "the WebUI runs with --medvram or --lowvram, which moves model parts between devices",
                        "restart the WebUI without them to train")
    glue.state().activator.patcher_for(model).apply([])
    info = model.sd_checkpoint_info
    sha256 = info.sha256 or (info.calculate_shorthash() and info.sha256)
    cfg.pretrained_model_name_or_path = info.filename
    cfg.v_parameterization = getattr(model, "parameterization", "eps") == "v"
    cfg.clip_skip = shared.opts.CLIP_stop_at_last_layers if getattr(model, "is_sd1", False) else None  # as encoded
    vae = next(model.first_stage_model.parameters())

    def vae_encode(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            posterior = model.encode_first_stage(pixels.to(vae.device, vae.dtype))
            return model.get_first_stage_encoding(posterior).float()

    chunks = (cfg.max_token_length or 75) // 75
    if getattr(model, "is_sdxl", False):
        encoders = list(model.conditioner.embedders[:2])

        def tokenize(captions: list[str]) -> list[torch.Tensor]:
            return [token_rows(e, captions, chunks) for e in encoders]

        def encode_text(tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            first, second = (encode_chunks(e, t) for e, t in zip(encoders, tokens))
            return torch.cat([first, second], dim=-1), second.pooled
    else:
        cond = model.cond_stage_model

        def tokenize(captions: list[str]) -> torch.Tensor:
            return token_rows(cond, captions, chunks)

        def encode_text(tokens: torch.Tensor) -> torch.Tensor:
            return encode_chunks(cond, tokens)

    return ModelBundle(
        model, vae_encode, tokenize, encode_text,
        vae_id=f"{sha256 or info.hash}:{sd_vae.get_loaded_vae_hash() or 'checkpoint VAE'}",
        sample_fn=sampler(samples, info.title) if samples else None,
        base_model_info={"ss_sd_model_name": os.path.basename(info.filename), "ss_sd_model_hash": info.hash,
                         "ss_new_sd_model_hash": sha256 or ""})


def token_rows(encoder, captions: list[str], chunks: int = 1) -> torch.Tensor:
    """Tokens [batch, chunks, 77] for one WebUI text-encoder wrapper: each 75-token piece of a caption between
    start and end tokens and padded, as the WebUI splits long prompts; as many pieces as the batch's longest
    caption needs, at most ``chunks`` (the rest of a caption is cut, as kohya does)."""
    n = encoder.chunk_length
    ids = [t[:n * chunks] for t in encoder.tokenize(captions)]
    used = max(1, max((len(t) + n - 1) // n for t in ids))
    pieces = [[t[k * n:(k + 1) * n] for k in range(used)] for t in ids]
    rows = [[[encoder.id_start] + p + [encoder.id_end] + [encoder.id_pad] * (n - len(p)) for p in caption]
            for caption in pieces]
    return torch.tensor(rows, dtype=torch.long)


def encode_chunks(encoder, tokens: torch.Tensor) -> torch.Tensor:
    """The wrapper's text-encoder output for [batch, chunks, 77] tokens, chunks side by side ([batch, 77·chunks,
    dim]) as the WebUI conditions on long prompts; SDXL's pooled output is the first chunk's, as there."""
    encoder.hijack.fixes = None  # no textual-inversion vectors for these tokens
    b, k, n = tokens.shape
    z = encoder.encode_with_transformers(tokens.reshape(b * k, n))
    pooled = getattr(z, "pooled", None)
    out = z.reshape(b, k * n, z.shape[-1])
    if pooled is not None:
        out.pooled = pooled.reshape(b, k, -1)[:, 0]
    return out


# kohya's --ss sampler names → the WebUI's
SAMPLERS = {"ddim": "DDIM", "pndm": "PLMS", "plms": "PLMS", "lms": "LMS", "k_lms": "LMS", "euler": "Euler",
            "k_euler": "Euler", "euler_a": "Euler a", "k_euler_a": "Euler a", "heun": "Heun", "k_heun": "Heun",
            "dpm_2": "DPM2", "k_dpm_2": "DPM2", "dpm_2_a": "DPM2 a", "k_dpm_2_a": "DPM2 a",
            "dpmsolver++": "DPM++ 2M", "dpmsingle": "DPM++ 2M", "dpmsolver": "DPM++ 2M"}


def sampler(options: SampleOptions, checkpoint: str) -> Callable[[list[SamplePrompt], int], list]:
    """Sample images through the WebUI's txt2img (no scripts), pinned to the checkpoint being trained so a
    checkpoint switch chosen meanwhile waits for the run. A prompt's own options (size, steps, CFG, seed,
    negative prompt, sampler) win over the tab's; the seed is the same at every step, so samples compare."""
    def one(sample: SamplePrompt):
        name = SAMPLERS.get((sample.sampler or "").lower(), sample.sampler) or options.sampler_name
        return processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model, prompt=sample.prompt, negative_prompt=sample.negative_prompt,
            seed=options.seed if sample.seed is None else sample.seed, steps=sample.steps or options.steps,
            width=sample.width or options.width, height=sample.height or options.height,
            cfg_scale=options.cfg_scale if sample.cfg_scale is None else sample.cfg_scale, sampler_name=name,
            n_iter=1, batch_size=1, do_not_save_samples=True, do_not_save_grid=True,
            override_settings={"sd_model_checkpoint": checkpoint})

    def sample(prompts: list[SamplePrompt], step: int) -> list:
        images = []
        for prompt in prompts:
            forget_conds()
            p = one(prompt)
            try:
                images += processing.process_images(p).images[:1]
            finally:
                p.close()
                forget_conds()
        return images
    return sample
