"""kohya's ``ss_*`` training metadata, the ``modelspec.*`` keys and the ``sshs_*`` hashes, written as kohya does.

kohya (train_network.py, ``save_weights``) stringifies every value with ``str()`` (so ``None``, ``True`` and
tuples appear as Python writes them), and computes ``sshs_model_hash`` / ``sshs_legacy_hash`` over the bytes
``safetensors.torch.save(tensors, <only the ss_* keys>)`` would produce: the first is the sha256 of the
tensor data (so it equals the WebUI's addnet hash of the final file), the second reads 64 KiB at 1 MiB of
that ss_*-only file (so for files under 1 MiB it is the sha256 of nothing).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import struct

import torch
from safetensors.torch import save as st_save

from .. import hashes
from ..sidecar import atomic_write_bytes
from .config import TrainConfig
from .dataset import Dataset


def base_model_version(family: str, v_parameterization: bool) -> str:
    """kohya's ``get_model_version_str_for_sd1_sd2``, and ``sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0``."""
    if family == "sdxl":
        return "sdxl_base_v1-0"
    return ("sd_v2" if family == "sd2" else "sd_v1") + ("_v" if v_parameterization else "")


def base_model_info(cfg: TrainConfig, given: dict[str, str]) -> dict[str, str]:
    """``ss_sd_model_name`` and the checkpoint's legacy and sha256 hashes (hashed only when not given)."""
    info: dict[str, str] = {}
    path = cfg.pretrained_model_name_or_path
    if path:
        info["ss_sd_model_name"] = os.path.basename(path) if os.path.isfile(path) else path
        if os.path.isfile(path) and not {"ss_sd_model_hash", "ss_new_sd_model_hash"} <= set(given):
            info["ss_sd_model_hash"] = hashes.legacy_hash(path)
            info["ss_new_sd_model_hash"] = hashes.sha256(path)
    info.update(given)
    return info


def training_metadata(cfg: TrainConfig, data: Dataset, *, family: str, optimizer: str, num_epochs: int,
                      total_steps: int, session_id: int, started_at: float, seed: int,
                      base_info: dict[str, str], processes: int = 1) -> dict[str, str]:
    """The ss_* keys train_network.py writes for a single dreambooth-style dataset, in its value formats;
    features this trainer lacks get kohya's values for "off"."""
    w, h = cfg.resolution_wh()
    md = {
        "ss_session_id": session_id,
        "ss_training_started_at": started_at,
        "ss_output_name": cfg.output_name,
        "ss_learning_rate": cfg.learning_rate,
        "ss_text_encoder_lr": cfg.text_encoder_lr,
        "ss_unet_lr": cfg.unet_lr,
        "ss_num_train_images": data.num_train_images,
        "ss_num_validation_images": len(data.validation),
        "ss_num_reg_images": data.num_reg_images,
        "ss_num_batches_per_epoch": data.batches_per_epoch(),
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_max_train_steps": total_steps,
        "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_network_module": cfg.network_module,
        "ss_network_dim": cfg.network_dim,
        "ss_network_alpha": cfg.network_alpha,
        "ss_network_dropout": cfg.network_dropout,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_full_fp16": False,
        "ss_v2": family == "sd2",
        "ss_base_model_version": base_model_version(family, cfg.v_parameterization),
        "ss_clip_skip": None,
        "ss_max_token_length": cfg.max_token_length,
        "ss_cache_latents": cfg.cache_latents,
        "ss_seed": seed,
        "ss_lowram": False,
        "ss_noise_offset": cfg.noise_offset,
        "ss_multires_noise_iterations": cfg.multires_noise_iterations,
        "ss_multires_noise_discount": cfg.multires_noise_discount,
        "ss_adaptive_noise_scale": None,
        "ss_zero_terminal_snr": cfg.zero_terminal_snr,
        "ss_training_comment": cfg.training_comment,
        "ss_optimizer": optimizer,
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_caption_dropout_rate": cfg.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": cfg.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": cfg.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": None,
        "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_min_snr_gamma": cfg.min_snr_gamma,
        "ss_scale_weight_norms": None,
        "ss_ip_noise_gamma": cfg.ip_noise_gamma,
        "ss_debiased_estimation": cfg.debiased_estimation_loss,
        "ss_noise_offset_random_strength": False,
        "ss_ip_noise_gamma_random_strength": False,
        "ss_loss_type": cfg.loss_type,
        "ss_huber_schedule": cfg.huber_schedule,
        "ss_huber_c": cfg.huber_c,
        "ss_fp8_base": False,
        "ss_fp8_base_unet": False,
        "ss_validation_seed": cfg.validation_seed,
        "ss_validation_split": cfg.validation_split,
        "ss_max_validation_steps": None,
        "ss_validate_every_n_epochs": cfg.validate_every_n_epochs,
        "ss_validate_every_n_steps": cfg.validate_every_n_steps,
        "ss_batch_size_per_device": cfg.train_batch_size,
        "ss_total_batch_size": cfg.train_batch_size * cfg.gradient_accumulation_steps * processes,
        "ss_resolution": (w, h),
        "ss_color_aug": cfg.color_aug,
        "ss_flip_aug": cfg.flip_aug,
        "ss_random_crop": cfg.random_crop,
        "ss_shuffle_caption": cfg.shuffle_caption,
        "ss_enable_bucket": cfg.enable_bucket,
        "ss_bucket_no_upscale": cfg.bucket_no_upscale,
        "ss_min_bucket_reso": cfg.min_bucket_reso,
        "ss_max_bucket_reso": cfg.max_bucket_reso,
        "ss_keep_tokens": cfg.keep_tokens,
        "ss_dataset_dirs": json.dumps(data.dirs_info(reg=False)),
        "ss_reg_dataset_dirs": json.dumps(data.dirs_info(reg=True)),
        "ss_tag_frequency": json.dumps(data.tag_frequency()),
        "ss_bucket_info": json.dumps(data.bucket_info()),
    }
    if cfg.network_args():
        md["ss_network_args"] = json.dumps(cfg.network_args())
    md.update(base_info)
    return {k: str(v) for k, v in md.items()}


def modelspec(cfg: TrainConfig, family: str, started_at: float) -> dict[str, str]:
    """The Stability ModelSpec keys kohya adds to a LoRA (``sai_model_spec.build_metadata``)."""
    if family == "sdxl":
        arch = "stable-diffusion-xl-v1-base"
    elif family == "sd2":
        arch = "stable-diffusion-v2-768-v" if cfg.v_parameterization else "stable-diffusion-v2-512"
    else:
        arch = "stable-diffusion-v1"
    w, h = cfg.resolution_wh()
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": cfg.output_name,
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(started_at)).isoformat(),
        "modelspec.prediction_type": "v" if cfg.v_parameterization else "epsilon",
    }


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) exactly as kohya's ``precalculate_safetensors_hashes``."""
    data = st_save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    (n,) = struct.unpack("<Q", data[:8])
    model_hash = hashlib.sha256(data[8 + n:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def write_network(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The network file with ss_* + modelspec.* + sshs_* metadata, written atomically."""
    model_hash, legacy_hash = kohya_hashes(tensors, metadata)
    full = dict(metadata, sshs_model_hash=model_hash, sshs_legacy_hash=legacy_hash)
    atomic_write_bytes(path, st_save(tensors, full))
