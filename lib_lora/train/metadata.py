"""kohya's ``ss_*`` training metadata, the ``modelspec.*`` keys and the ``sshs_*`` hashes, written as kohya does.

kohya (train_network.py, ``save_weights``) stringifies every value with ``str()`` (so ``None``, ``True`` and
tuples appear as Python writes them), and computes ``sshs_model_hash`` / ``sshs_legacy_hash`` over the bytes
``safetensors.torch.save(tensors, <only the ss_* keys>)`` would produce: the first is the sha256 of the
tensor data (so it equals the WebUI's addnet hash of the final file), the second reads 64 KiB at 1 MiB of
that ss_*-only file (so for files under 1 MiB it is the sha256 of nothing).
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
import mimetypes
import os
import struct
import subprocess

import torch
from safetensors.torch import save as st_save

from .. import hashes
from ..errors import LoraError
from ..sidecar import atomic_write_bytes
from .config import TrainConfig
from .dataset import Dataset

# The precisions a network file may be saved in (the trainer's save_precision, the tools' --precision).
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    """The ss_* keys train_network.py writes, in its value formats (None where kohya writes None); features
    this trainer lacks get kohya's values for "off"."""
    md = {
        "ss_session_id": session_id,
        "ss_training_started_at": started_at,
        "ss_output_name": cfg.output_name,
        "ss_learning_rate": cfg.learning_rate,
        "ss_text_encoder_lr": cfg.text_encoder_lr,
        "ss_unet_lr": cfg.unet_lr,
        "ss_num_train_images": data.num_train_images,
        "ss_num_validation_images": len(data.validation),
        "ss_num_reg_images": data.reg_images_found,
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
        "ss_clip_skip": cfg.clip_skip,
        "ss_max_token_length": cfg.max_token_length,
        "ss_cache_latents": cfg.cache_latents,
        "ss_seed": seed,
        "ss_lowram": False,
        "ss_noise_offset": cfg.noise_offset,
        "ss_multires_noise_iterations": cfg.multires_noise_iterations,
        "ss_multires_noise_discount": cfg.multires_noise_discount,
        "ss_adaptive_noise_scale": cfg.adaptive_noise_scale,
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
        "ss_scale_weight_norms": cfg.scale_weight_norms,
        "ss_ip_noise_gamma": cfg.ip_noise_gamma,
        "ss_debiased_estimation": cfg.debiased_estimation_loss,
        "ss_noise_offset_random_strength": cfg.noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": cfg.ip_noise_gamma_random_strength,
        "ss_loss_type": cfg.loss_type,
        "ss_huber_schedule": cfg.huber_schedule,
        "ss_huber_scale": cfg.huber_scale,
        "ss_huber_c": cfg.huber_c,
        "ss_fp8_base": False,
        "ss_fp8_base_unet": False,
        "ss_validation_seed": cfg.validation_seed,
        "ss_validation_split": cfg.validation_split,
        "ss_max_validation_steps": cfg.max_validation_steps,
        "ss_validate_every_n_epochs": cfg.validate_every_n_epochs,
        "ss_validate_every_n_steps": cfg.validate_every_n_steps,
        "ss_resize_interpolation": cfg.resize_interpolation,
    }
    md.update(datasets_metadata(data) if cfg.dataset_config else single_dataset_metadata(cfg, data, processes))
    if cfg.network_args():
        md["ss_network_args"] = json.dumps(dict(cfg.network_args(), dropout=cfg.network_dropout))
    md.update(base_info)
    return {k: str(v) for k, v in md.items()}


def single_dataset_metadata(cfg: TrainConfig, data: Dataset, processes: int) -> dict:
    """The keys kohya writes for a run without a dataset config (train_data_dir / reg_data_dir / in_json)."""
    spec = data.datasets[0]
    bucketed = spec.enable_bucket
    return {
        "ss_batch_size_per_device": cfg.train_batch_size,
        "ss_total_batch_size": cfg.train_batch_size * cfg.gradient_accumulation_steps * processes,
        "ss_resolution": cfg.resolution_wh(),
        "ss_color_aug": cfg.color_aug,
        "ss_flip_aug": cfg.flip_aug,
        "ss_random_crop": cfg.random_crop,
        "ss_shuffle_caption": cfg.shuffle_caption,
        "ss_enable_bucket": bucketed,
        "ss_bucket_no_upscale": bucketed and spec.bucket_no_upscale,
        "ss_min_bucket_reso": spec.min_bucket_reso if bucketed else None,
        "ss_max_bucket_reso": spec.max_bucket_reso if bucketed else None,
        "ss_keep_tokens": cfg.keep_tokens,
        "ss_dataset_dirs": json.dumps(data.dirs_info(reg=False)),
        "ss_reg_dataset_dirs": json.dumps(data.dirs_info(reg=True)),
        "ss_tag_frequency": json.dumps(data.tag_frequency()),
        "ss_bucket_info": json.dumps(data.bucket_info()),
    }


def datasets_metadata(data: Dataset) -> dict:
    """kohya's ``ss_datasets`` (one entry per dataset of a dataset config, with its subsets) and the merged
    ``ss_tag_frequency`` / ``ss_dataset_dirs``."""
    datasets, dirs, tags = [], {}, {}
    for group, spec in enumerate(data.datasets):
        bucketed = spec.enable_bucket
        subsets = []
        for s in spec.subsets:
            entry = {"img_count": len(s.items), "num_repeats": s.num_repeats, "color_aug": s.color_aug,
                     "flip_aug": s.flip_aug, "random_crop": s.random_crop, "shuffle_caption": s.shuffle_caption,
                     "keep_tokens": s.keep_tokens, "keep_tokens_separator": s.keep_tokens_separator,
                     "secondary_separator": s.secondary_separator, "enable_wildcard": s.enable_wildcard,
                     "caption_prefix": s.caption_prefix, "caption_suffix": s.caption_suffix,
                     "resize_interpolation": s.resize_interpolation}
            name = None
            if s.image_dir:
                entry["image_dir"] = name = os.path.basename(s.image_dir)
            if spec.is_dreambooth:
                entry.update(class_tokens=s.class_tokens, is_reg=s.is_reg)
                name = None if s.is_reg else name
            else:
                entry["metadata_file"] = name = os.path.basename(s.metadata_file)
            subsets.append(entry)
            if name is not None:
                key, n = name, 2
                while key in dirs:
                    key, n = f"{name} ({n})", n + 1
                dirs[key] = {"n_repeats": s.num_repeats, "img_count": len(s.items)}
        freq = data.tag_frequency(group)
        for folder, counts in freq.items():
            tags.setdefault(folder, counts)
        datasets.append({
            "is_dreambooth": spec.is_dreambooth, "batch_size_per_device": spec.batch_size,
            "num_train_images": sum(i.repeats for i in data.train_items() if i.group == group),
            "num_reg_images": sum(len(s.items) * s.num_repeats for s in spec.subsets if s.is_reg),
            "resolution": list(spec.resolution), "enable_bucket": bucketed,
            "min_bucket_reso": spec.min_bucket_reso if bucketed else None,
            "max_bucket_reso": spec.max_bucket_reso if bucketed else None,
            "tag_frequency": freq, "bucket_info": data.bucket_info(group),
            "resize_interpolation": None, "subsets": subsets})
    return {"ss_datasets": json.dumps(datasets), "ss_tag_frequency": json.dumps(tags), "ss_dataset_dirs": json.dumps(dirs)}


MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")  # kohya's SS_METADATA_MINIMUM_KEYS (written with --no_metadata)
MODELSPEC_TEXT = ("author", "description", "license", "tags", "usage_hint", "merged_from", "trigger_phrase",
                  "preprocessor", "is_negative_embedding")
SGM = "https://github.com/Stability-AI/generative-models"


def implementation_version() -> str:
    """``sd-webui-lora/<commit>`` of this checkout, as kohya writes ``sd-scripts/<commit>``."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        commit = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"sd-webui-lora/{commit or 'unknown'}"


def modelspec(cfg: TrainConfig, family: str, saved_at: float, version: str) -> dict[str, str]:
    """The Stability ModelSpec keys kohya adds to a LoRA (``sai_model_spec.build_metadata``)."""
    if family == "sdxl":
        arch = "stable-diffusion-xl-v1-base"
    elif family == "sd2":
        arch = "stable-diffusion-v2-768-v" if cfg.v_parameterization else "stable-diffusion-v2-512"
    else:
        arch = "stable-diffusion-v1"
    w, h = cfg.resolution_wh()
    md = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": SGM if family == "sdxl" else "diffusers",
        "modelspec.title": cfg.metadata_title or cfg.output_name,
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(saved_at)).isoformat(),
        "modelspec.implementation_version": version,
        "modelspec.prediction_type": "v" if cfg.v_parameterization else "epsilon",
    }
    for name in MODELSPEC_TEXT:
        value = getattr(cfg, f"metadata_{name}")
        if value is not None:
            md[f"modelspec.{name}"] = value
    if cfg.min_timestep is not None or cfg.max_timestep is not None:
        md["modelspec.timestep_range"] = f"{cfg.min_timestep or 0},{1000 if cfg.max_timestep is None else cfg.max_timestep}"
    if cfg.clip_skip is not None:
        md["modelspec.encoder_layer"] = str(cfg.clip_skip)
    if cfg.metadata_thumbnail:
        md["modelspec.thumbnail"] = thumbnail(cfg.metadata_thumbnail)
    return md


def thumbnail(value: str) -> str:
    """An image file as a data URL (kohya's ``file_to_data_url``); a data URL as it is."""
    if value.startswith("data:"):
        return value
    try:
        with open(value, "rb") as f:
            data = f.read()
    except OSError as e:
        raise LoraError(value, f"cannot read the thumbnail ({e.strerror or e})", "check metadata_thumbnail") from None
    mime = mimetypes.guess_type(value)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def minimum(metadata: dict[str, str]) -> dict[str, str]:
    """What ``no_metadata`` keeps: kohya's minimum keys and the modelspec."""
    return {k: v for k, v in metadata.items() if k in MINIMUM_KEYS or k.startswith("modelspec.")}


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
