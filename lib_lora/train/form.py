"""TrainConfig as a form: what an unset option looks like in a field, the network kinds, and presets.

A form has no "unset" for numbers, so an option that may be unset shows 0 (-1 for seeds) and an empty text
for an unset path; ``from_form`` turns those back into ``None``. A UI builds its fields from
``TrainConfig``'s own defaults, help texts and choices, so nothing here repeats a list of the config's.
"""
from __future__ import annotations

import dataclasses
import typing

from ..adapters import train_labels
from ..errors import LoraError
from .config import TrainConfig, _base_type

# The form's kind → network_algo; LoCon is LoRA with the 3x3 convs trained too (conv rank 0 means the rank).
ALGO_BY_LABEL = train_labels()
_LYCORIS = [label for label, algo in ALGO_BY_LABEL.items() if algo != "lora"]

# Form values that are not TrainConfig options: (default, help).
EXTRAS = {
    "kind": ("LoRA", f"LoRA: linear layers; LoCon: also the 3x3 convs (conv rank 0 = the rank); {', '.join(_LYCORIS)}: LyCORIS"),
    "train_unet": (True, "train the UNet's layers"),
    "train_text_encoder": (True, "train the text encoder's layers"),
}

# Each preset sets only its own fields: pick a purpose, then a memory tier.
PRESETS: dict[str, dict] = {
    "Style (rank 8)": {
        "network_dim": 8, "network_alpha": 4.0, "learning_rate": 1e-4, "unet_lr": 1e-4, "text_encoder_lr": 5e-5,
        "max_train_steps": 1500, "lr_scheduler": "cosine", "lr_warmup_steps": 100, "shuffle_caption": True,
        "keep_tokens": 1, "caption_dropout_rate": 0.05, "flip_aug": True, "min_snr_gamma": 5.0},
    "Character / detail (rank 16)": {
        "network_dim": 16, "network_alpha": 8.0, "learning_rate": 1e-4, "unet_lr": 1e-4, "text_encoder_lr": 5e-5,
        "max_train_steps": 2000, "lr_scheduler": "cosine", "lr_warmup_steps": 100, "shuffle_caption": True,
        "keep_tokens": 1, "caption_dropout_rate": 0.0, "flip_aug": False, "min_snr_gamma": 5.0},
    "Memory: low (6-8 GB)": {
        "train_batch_size": 1, "gradient_accumulation_steps": 1, "gradient_checkpointing": True,
        "mixed_precision": "fp16", "cache_latents": True, "vae_batch_size": 1},
    "Memory: medium (10-12 GB)": {
        "train_batch_size": 2, "gradient_accumulation_steps": 1, "gradient_checkpointing": True,
        "mixed_precision": "fp16", "cache_latents": True, "vae_batch_size": 2},
    "Memory: high (16 GB or more)": {
        "train_batch_size": 4, "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
        "mixed_precision": "fp16", "cache_latents": True, "vae_batch_size": 4},
}

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _optional(name: str) -> bool:
    return _base_type(_HINTS[name]) is not _HINTS[name]


def _is_list(name: str) -> bool:
    return typing.get_origin(_base_type(_HINTS[name])) is list


def _unset(name: str):
    """The form value of ``None`` for an option that may be unset."""
    kind = _base_type(_HINTS[name])
    if kind is str:
        return ""
    return -1 if name.endswith("seed") else 0


def form_default(name: str) -> bool | int | float | str:
    """The value a form field starts with: the option's default, or what stands for unset."""
    if name in EXTRAS:
        return EXTRAS[name][0]
    f = _FIELDS[name]
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if _is_list(name):
        return " ".join(value)
    return _unset(name) if value is None else value


def help_text(name: str) -> str:
    """The option's help, saying what the unset value of its field means."""
    if name in EXTRAS:
        return EXTRAS[name][1]
    text = _FIELDS[name].metadata["help"]
    if not _optional(name):
        return text
    unset = _unset(name)
    return f"{text}; {'empty' if unset == '' else unset} = unset"


def value_type(name: str) -> type:
    """The option's type without ``None`` (bool, int, float, str or list); form-only values by their default."""
    if name in EXTRAS:
        return type(EXTRAS[name][0])
    return _base_type(_HINTS[name])


def choices(name: str) -> list[str] | None:
    """The allowed values of a choice field, else None."""
    if name in EXTRAS:
        return list(ALGO_BY_LABEL) if name == "kind" else None
    found = _FIELDS[name].metadata.get("choices")
    return list(found) if found else None


def from_form(values: dict) -> TrainConfig:
    """A TrainConfig from form values (option names plus ``kind``, ``train_unet``, ``train_text_encoder``;
    list options as space-separated text); options not given keep their defaults."""
    values = dict(values)
    kind = values.pop("kind", EXTRAS["kind"][0])
    if kind not in ALGO_BY_LABEL:
        raise LoraError(None, f"unknown network kind {kind!r}", f"choose one of {', '.join(ALGO_BY_LABEL)}")
    unet, te = values.pop("train_unet", True), values.pop("train_text_encoder", True)
    if not unet and not te:
        raise LoraError(None, "neither the UNet nor the text encoder is selected for training", "tick at least one")
    out = {}
    for name, value in values.items():
        if name not in _FIELDS:
            raise LoraError(None, f"unknown training option {name!r}", "this form is out of date; reload the page")
        if isinstance(value, str):
            value = value.split() if _is_list(name) else value.strip()
        if _optional(name) and (value is None or value == _unset(name)):
            value = None
        out[name] = value
    out["network_algo"] = ALGO_BY_LABEL[kind]
    if kind == "LoRA":
        out["conv_dim"] = out["conv_alpha"] = None
    elif kind == "LoCon" and not out.get("conv_dim"):
        out["conv_dim"] = out.get("network_dim", form_default("network_dim"))
    out["network_train_unet_only"] = not te
    out["network_train_text_encoder_only"] = not unet
    return TrainConfig.from_dict(out)
