"""Every training option in one dataclass, with kohya sd-scripts' names, so kohya TOML files mostly just work.

Values come from the defaults, then a TOML file (flat, or in tables that are flattened as kohya does),
then command-line flags; unknown keys are refused with the closest known name.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field

from .. import toml_reader
from ..errors import LoraError

OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Lion8bit", "Adafactor", "Prodigy")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")
ALGOS = ("lora", "loha", "lokr")
PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("fp32", "fp16", "bf16")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")


def _opt(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


def _list(help: str):
    return field(default_factory=list, metadata={"help": help, "choices": None})


@dataclass
class TrainConfig:
    # --- model --------------------------------------------------------------------------------
    model_factory: str | None = _opt(None, "CLI only: 'module:function' returning a ModelBundle for this config")
    pretrained_model_name_or_path: str | None = _opt(None, "base checkpoint file; its name and hashes go into the metadata")
    v_parameterization: bool = _opt(False, "train with v-prediction (SD2 768-v models)")
    # --- dataset ------------------------------------------------------------------------------
    train_data_dir: str = _opt("", "folder of kohya subfolders '<repeats>_<class words>' holding the images")
    reg_data_dir: str | None = _opt(None, "regularisation images, same folder layout")
    caption_extension: str = _opt(".txt", "caption file beside each image (image stem + this)")
    resolution: str = _opt("512", "training resolution 'N' or 'W,H'; the bucket area")
    enable_bucket: bool = _opt(True, "aspect-ratio buckets instead of one square crop")
    min_bucket_reso: int = _opt(256, "smallest bucket side")
    max_bucket_reso: int = _opt(1024, "largest bucket side")
    bucket_reso_steps: int = _opt(64, "bucket sides are multiples of this (a multiple of 64)")
    bucket_no_upscale: bool = _opt(False, "never enlarge an image; small images get small buckets")
    shuffle_caption: bool = _opt(False, "shuffle comma-separated tags")
    keep_tokens: int = _opt(0, "leading tags never shuffled or dropped")
    caption_dropout_rate: float = _opt(0.0, "chance of training an image with an empty caption")
    caption_dropout_every_n_epochs: int = _opt(0, "empty captions for every image in every n-th epoch")
    caption_tag_dropout_rate: float = _opt(0.0, "chance of dropping each non-kept tag")
    max_token_length: int | None = _opt(None, "caption tokens the text encoder sees: 75 (unset), 150 or 225, "
                                        "in 75-token chunks as the WebUI prompts; the rest is cut")
    caption_prefix: str | None = _opt(None, "text put before every caption (before shuffling, as kohya does)")
    caption_suffix: str | None = _opt(None, "text put after every caption")
    flip_aug: bool = _opt(False, "random horizontal flips")
    random_crop: bool = _opt(False, "a random crop of each resized image instead of its centre (cache_latents off)")
    color_aug: bool = _opt(False, "a small random hue shift of each image (cache_latents off)")
    prior_loss_weight: float = _opt(1.0, "loss weight of regularisation images")
    validation_split: float = _opt(0.0, "fraction of each training folder held out for validation loss")
    validation_seed: int | None = _opt(None, "seed of the split and of the validation noise (default: seed)")
    validate_every_n_steps: int | None = _opt(None, "validation loss every n steps")
    validate_every_n_epochs: int | None = _opt(1, "validation loss every n epochs (unless validate_every_n_steps is set)")
    # --- latent cache -------------------------------------------------------------------------
    cache_latents: bool = _opt(True, "encode each image once and keep the latents in memory")
    cache_latents_to_disk: bool = _opt(False, "also keep them on disk, reused by later runs")
    latent_cache_dir: str | None = _opt(None, "disk cache folder (default: <train_data_dir>/.latent_cache)")
    vae_batch_size: int = _opt(1, "images per VAE call while caching")
    # --- network ------------------------------------------------------------------------------
    network_algo: str = _opt("lora", "lora (kohya networks.lora), loha or lokr (LyCORIS)", ALGOS)
    network_dim: int = _opt(4, "rank")
    network_alpha: float = _opt(1.0, "alpha; the update is scaled by alpha/rank")
    network_dropout: float | None = _opt(None, "dropout on the rank dimension while training")
    conv_dim: int | None = _opt(None, "also train the UNet's 3x3 convs (ResBlocks, down/upsamplers) at this rank")
    conv_alpha: float | None = _opt(None, "alpha of those convs (default 1)")
    lokr_factor: int = _opt(-1, "LoKr: Kronecker factor (-1: as square as possible)")
    network_train_unet_only: bool = _opt(False, "train only the UNet")
    network_train_text_encoder_only: bool = _opt(False, "train only the text encoder")
    network_weights: str | None = _opt(None, "start from this network file's weights")
    # --- optimizer ----------------------------------------------------------------------------
    optimizer_type: str = _opt("AdamW", "optimizer", OPTIMIZERS)
    optimizer_args: list[str] = _list("extra optimizer arguments 'key=value' (Python literals)")
    learning_rate: float = _opt(1e-4, "learning rate")
    unet_lr: float | None = _opt(None, "UNet learning rate (default: learning_rate)")
    text_encoder_lr: float | None = _opt(None, "text encoder learning rate (default: learning_rate)")
    lr_scheduler: str = _opt("constant", "learning-rate schedule", SCHEDULERS)
    lr_warmup_steps: int = _opt(0, "linear warm-up steps (all schedules but constant)")
    lr_scheduler_num_cycles: int = _opt(1, "cosine_with_restarts: number of cycles")
    lr_scheduler_power: float = _opt(1.0, "polynomial: power")
    max_grad_norm: float = _opt(1.0, "clip the gradient norm to this (0: no clipping)")
    # --- training -----------------------------------------------------------------------------
    max_train_steps: int = _opt(1600, "optimizer steps")
    max_train_epochs: int | None = _opt(None, "epochs; overrides max_train_steps")
    train_batch_size: int = _opt(1, "images per batch (all from one bucket)")
    gradient_accumulation_steps: int = _opt(1, "batches per optimizer step")
    gradient_checkpointing: bool = _opt(False, "recompute block activations in backward to save memory")
    mixed_precision: str = _opt("no", "autocast the model's compute; network weights stay fp32", PRECISIONS)
    seed: int | None = _opt(None, "random seed (default: a random one, recorded in the metadata)")
    noise_offset: float | None = _opt(None, "add per-channel offset noise of this strength")
    min_snr_gamma: float | None = _opt(None, "min-SNR loss weighting gamma (5 is common)")
    multires_noise_iterations: int | None = _opt(None, "multi-resolution (pyramid) noise with this many levels (6-10)")
    multires_noise_discount: float = _opt(0.3, "pyramid noise: strength kept per level")
    ip_noise_gamma: float | None = _opt(None, "input perturbation noise of this strength (0.1 is common)")
    zero_terminal_snr: bool = _opt(False, "rescale the noise schedule to zero SNR at the last timestep (v-prediction)")
    debiased_estimation_loss: bool = _opt(False, "weight the loss by 1/sqrt(SNR)")
    loss_type: str = _opt("l2", "loss between prediction and target", LOSS_TYPES)
    huber_schedule: str = _opt("snr", "huber / smooth_l1: how the threshold follows the timestep", HUBER_SCHEDULES)
    huber_c: float = _opt(0.1, "huber / smooth_l1 threshold")
    # --- output -------------------------------------------------------------------------------
    output_dir: str = _opt("output", "where network files, states and the loss curve go")
    output_name: str = _opt("last", "file name without extension")
    save_every_n_epochs: int | None = _opt(None, "save name-000004.safetensors every n epochs")
    save_every_n_steps: int | None = _opt(None, "save name-step00000100.safetensors every n steps")
    save_precision: str = _opt("fp32", "dtype of the saved network", SAVE_PRECISIONS)
    save_state: bool = _opt(True, "save a resumable training state beside every saved network")
    resume: str | None = _opt(None, "continue from this state folder (name-...-state)")
    training_comment: str | None = _opt(None, "free text stored as ss_training_comment")
    # --- samples ------------------------------------------------------------------------------
    sample_prompts: str | None = _opt(None, "text file, one prompt per line, for sample images")
    sample_every_n_steps: int | None = _opt(None, "sample images every n steps")
    sample_every_n_epochs: int | None = _opt(None, "sample images every n epochs")

    def __post_init__(self) -> None:
        self.validate()

    # --- checks -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Refuse impossible values early, with the option's name in the message."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                _bad(f.name, f"must be one of {', '.join(choices)}, not {getattr(self, f.name)!r}")
        for name in ("network_dim", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                     "vae_batch_size", "min_bucket_reso", "max_bucket_reso"):
            if getattr(self, name) < 1:
                _bad(name, "must be at least 1")
        for name in ("max_train_epochs", "save_every_n_epochs", "save_every_n_steps", "validate_every_n_steps",
                     "validate_every_n_epochs", "sample_every_n_steps", "sample_every_n_epochs", "conv_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                _bad(name, "must be at least 1 (or unset)")
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate", "validation_split"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _bad(name, "must be in [0, 1)")
        if self.network_dropout is not None and not 0.0 <= self.network_dropout < 1.0:
            _bad("network_dropout", "must be in [0, 1)")
        if self.learning_rate <= 0:
            _bad("learning_rate", "must be positive")
        if not 0.0 < self.huber_c <= 1.0:
            _bad("huber_c", "must be in (0, 1]")
        if self.multires_noise_iterations is not None and self.multires_noise_iterations < 1:
            _bad("multires_noise_iterations", "must be at least 1 (or unset)")
        if self.bucket_reso_steps < 64 or self.bucket_reso_steps % 64:
            _bad("bucket_reso_steps", "must be a multiple of 64 (the UNet halves the latent three times)")
        if self.min_bucket_reso > self.max_bucket_reso:
            _bad("min_bucket_reso", "is larger than max_bucket_reso")
        if self.max_token_length not in (None, 75, 150, 225):
            _bad("max_token_length", "must be 75, 150 or 225 (or unset)")
        for name in ("random_crop", "color_aug"):
            if getattr(self, name) and (self.cache_latents or self.cache_latents_to_disk):
                _bad(name, "needs cache_latents and cache_latents_to_disk off: a cached latent is one fixed view")
        if self.network_train_unet_only and self.network_train_text_encoder_only:
            _bad("network_train_unet_only", "and network_train_text_encoder_only leave nothing to train")
        if self.keep_tokens < 0 or self.caption_dropout_every_n_epochs < 0 or self.lr_warmup_steps < 0:
            _bad("keep_tokens / caption_dropout_every_n_epochs / lr_warmup_steps", "must not be negative")
        self.resolution_wh()

    def resolution_wh(self) -> tuple[int, int]:
        try:
            parts = [int(p) for p in str(self.resolution).replace("x", ",").split(",")]
        except ValueError:
            parts = []
        if len(parts) not in (1, 2) or min(parts) < 64:
            _bad("resolution", f"must be 'N' or 'W,H' with sides of at least 64, not {self.resolution!r}")
        return (parts[0], parts[-1])

    @property
    def network_module(self) -> str:
        return "networks.lora" if self.network_algo == "lora" else "lycoris.kohya"

    @property
    def effective_conv_alpha(self) -> float | None:
        return None if self.conv_dim is None else (1.0 if self.conv_alpha is None else self.conv_alpha)

    def network_args(self) -> dict[str, str]:
        """kohya's ``--network_args`` equivalent of the network options (strings, as kohya stores them)."""
        args: dict[str, str] = {}
        if self.network_algo != "lora":
            args["algo"] = self.network_algo
        if self.conv_dim is not None:
            args["conv_dim"] = str(self.conv_dim)
            args["conv_alpha"] = str(self.effective_conv_alpha)
        if self.network_algo == "lokr" and self.lokr_factor != -1:
            args["factor"] = str(self.lokr_factor)
        return args

    # --- loading ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str | None = None) -> TrainConfig:
        values = _kohya_compat(dict(values), source)
        known = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        unknown = [k for k in values if k not in known]
        if unknown:
            close = {k: difflib.get_close_matches(k, known, 1) for k in unknown}
            hint = "; ".join(f"{k!r}" + (f" (did you mean {m[0]!r}?)" if m else "") for k, m in close.items())
            raise LoraError(source, f"unknown option {hint}", "see python -m lib_lora.train --help")
        return cls(**{k: _coerce(k, v, hints[k], source) for k, v in values.items()})

    @classmethod
    def from_toml(cls, path: str) -> TrainConfig:
        return cls.from_dict(read_toml(path), source=path)


def read_toml(path: str) -> dict:
    """A TOML file's options; top-level tables are flattened (kohya's config files group options that way)."""
    try:
        with open(path, "rb") as f:
            doc = toml_reader.load(f)
    except OSError as e:
        raise LoraError(path, f"cannot read the config ({e.strerror or e})", "check the path") from None
    except toml_reader.TOMLDecodeError as e:
        raise LoraError(path, f"not valid TOML: {e}", "fix the config file") from None
    flat: dict = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _kohya_compat(values: dict, source: str | None) -> dict:
    """kohya's ``network_module`` + ``network_args = ["conv_dim=4", "algo=loha"]`` as this config's options."""
    module = values.pop("network_module", None)
    if module not in (None, "networks.lora", "lycoris.kohya"):
        raise LoraError(source, f"network_module {module!r} is not supported", "use networks.lora or lycoris.kohya")
    args = values.pop("network_args", None) or []
    names = {"algo": "network_algo", "conv_dim": "conv_dim", "conv_alpha": "conv_alpha", "factor": "lokr_factor",
             "dropout": "network_dropout"}
    for arg in args:
        key, sep, value = str(arg).partition("=")
        if not sep or key.strip() not in names:
            raise LoraError(source, f"network_args entry {arg!r} is not supported",
                            f"supported: {', '.join(k + '=...' for k in names)}")
        values[names[key.strip()]] = value.strip()
    if module == "lycoris.kohya" and "network_algo" not in values:
        values["network_algo"] = "lora"
    return values


def _base_type(hint):
    """``X`` of ``X | None``; any other type as it is."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _coerce(name: str, value, hint, source: str | None):
    """A TOML/CLI value as the option's type (TOML gives ints for floats, network_args gives strings)."""
    target = _base_type(hint)
    if value is None:
        if target is not hint:
            return None
        _bad(name, "must be set", source)
    try:
        if typing.get_origin(target) is list:
            if isinstance(value, str):
                value = [value]
            return [str(v) for v in value]
        if target is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if target is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if target is str and isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return target(value)
    except (TypeError, ValueError):
        _bad(name, f"must be {getattr(target, '__name__', target)}, not {value!r}", source)


def _bad(name: str, reason: str, source: str | None = None) -> typing.NoReturn:
    raise LoraError(source, f"option {name} {reason}", "fix the training config")


# --- command line --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """One flag per option (kohya's underscore name, a dashed alias too); only flags given override the TOML."""
    parser = argparse.ArgumentParser(prog="python -m lib_lora.train", argument_default=argparse.SUPPRESS,
                                     description="Train a LoRA/LoHa/LoKr network, kohya-style.")
    parser.add_argument("--config", help="TOML file of options (flags given here override it)")
    parser.add_argument("--print-config", action="store_true", help="print the merged options as JSON and exit")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        help_text = f.metadata["help"] + (f" (default: {f.default})" if f.default is not dataclasses.MISSING else "")
        kind = _base_type(hints[f.name])
        if kind is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(kind) is list:
            parser.add_argument(*flags, dest=f.name, nargs="*", help=help_text)
        else:
            parser.add_argument(*flags, dest=f.name, choices=f.metadata["choices"], help=help_text)
    return parser


def from_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    ns = build_parser().parse_args(argv)
    values = read_toml(ns.config) if getattr(ns, "config", None) else {}
    flags = {k: v for k, v in vars(ns).items() if k not in ("config", "print_config")}
    values.update(flags)
    return TrainConfig.from_dict(values, source=getattr(ns, "config", None)), ns


def dumps(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), indent=2)
