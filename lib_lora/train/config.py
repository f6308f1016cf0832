"""Every training option in one dataclass, with kohya sd-scripts' names, so kohya TOML files mostly just work.

Values come from the defaults, then a TOML file (flat, or in tables that are flattened as kohya does),
then command-line flags; unknown keys are refused with the closest known name.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field

from .. import toml_reader
from ..adapters import TRAINABLE_KINDS, train_labels
from ..errors import LoraError
from .kohya_options import COMMAND, KOHYA_FLAGS, NOT_HERE, RESHAPED, translate

OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Lion8bit", "Adafactor", "Prodigy")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")
ALGOS = tuple(TRAINABLE_KINDS)
PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("fp32", "fp16", "bf16")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a")
LOGGERS = ("tensorboard", "wandb", "all")


def _opt(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


def _list(help: str):
    return field(default_factory=list, metadata={"help": help, "choices": None})


@dataclass
class TrainConfig:
    # --- model --------------------------------------------------------------------------------
    model_factory: str | None = _opt(None, "CLI only: 'module:function' returning a ModelBundle for this config")
    pretrained_model_name_or_path: str | None = _opt(None, "base checkpoint file (.safetensors or .ckpt, SD1.x, SD2.x or "
                                                     "SDXL); the CLI builds the model from it; its name and hashes go "
                                                     "into the metadata")
    webui: str | None = _opt(None, "CLI: the WebUI folder whose ldm/sgm code builds the model (default: the WebUI this "
                             "Python or this extension sits in)")
    v2: bool = _opt(False, "kohya's SD2.x flag; the family is read from the checkpoint, so this only checks it")
    v_parameterization: bool = _opt(False, "train with v-prediction (SD2 768-v models)")
    vae: str | None = _opt(None, "CLI: a VAE file (ldm keys) whose weights replace the checkpoint's")
    tokenizer_cache_dir: str | None = _opt(None, "CLI: folder of local tokenizer copies, looked in before the Hugging "
                                           "Face cache (read offline)")
    clip_skip: int | None = _opt(None, "text-encoder layer from the end to train on (2: the penultimate), as the "
                                 "WebUI's CLIP skip; SD1/SD2 (SDXL uses fixed layers)")
    sdpa: bool = _opt(False, "the UNet's attention through torch's scaled_dot_product_attention")
    xformers: bool = _opt(False, "the UNet's attention through xformers (when it is installed)")
    mem_eff_attn: bool = _opt(False, "the UNet's attention in query chunks, recomputed in backward (least memory)")
    # --- dataset ------------------------------------------------------------------------------
    train_data_dir: str = _opt("", "folder of kohya subfolders '<repeats>_<class words>' holding the images")
    dataset_config: str | None = _opt(None, "kohya's dataset TOML ([general], [[datasets]], [[datasets.subsets]]); "
                                      "replaces train_data_dir and reg_data_dir")
    in_json: str | None = _opt(None, "kohya's fine-tuning metadata JSON (caption and tags per image of train_data_dir)")
    dataset_repeats: int = _opt(1, "repeats of the in_json images")
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
    caption_separator: str = _opt(",", "what separates tags")
    keep_tokens_separator: str = _opt("", "tags before it (and after a second one) are never shuffled or dropped")
    secondary_separator: str | None = _opt(None, "joins tags that shuffle and drop as one; replaced by caption_separator")
    enable_wildcard: bool = _opt(False, "{a|b} picks one at random; a multi-line caption gives one random line")
    token_warmup_min: int = _opt(1, "tags used at step 0 (with token_warmup_step)")
    token_warmup_step: float = _opt(0.0, "all tags from this step on (a fraction: of max_train_steps)")
    max_token_length: int | None = _opt(None, "caption tokens the text encoder sees: 75 (unset), 150 or 225, "
                                        "in 75-token chunks as the WebUI prompts; the rest is cut")
    caption_prefix: str | None = _opt(None, "text put before every caption (before shuffling, as kohya does)")
    caption_suffix: str | None = _opt(None, "text put after every caption")
    flip_aug: bool = _opt(False, "random horizontal flips")
    random_crop: bool = _opt(False, "a random crop of each resized image instead of its centre (cache_latents off)")
    color_aug: bool = _opt(False, "a small random hue shift of each image (cache_latents off)")
    resize_interpolation: str | None = _opt(None, "resampling filter when resizing images (default: lanczos)",
                                            INTERPOLATIONS)
    cache_info: bool = _opt(False, "keep image sizes and captions in metadata_cache.json of each folder")
    prior_loss_weight: float = _opt(1.0, "loss weight of regularisation images")
    validation_split: float = _opt(0.0, "fraction of each training folder held out for validation loss")
    validation_seed: int | None = _opt(None, "seed of the split and of the validation noise (default: seed)")
    validate_every_n_steps: int | None = _opt(None, "validation loss every n steps")
    validate_every_n_epochs: int | None = _opt(None, "validation loss every n epochs (unset: every epoch) unless "
                                               "validate_every_n_steps is set")
    max_validation_steps: int | None = _opt(None, "validate on at most this many held-out images")
    # --- latent cache -------------------------------------------------------------------------
    cache_latents: bool = _opt(True, "encode each image once and keep the latents in memory")
    cache_latents_to_disk: bool = _opt(False, "also keep them on disk, reused by later runs")
    latent_cache_dir: str | None = _opt(None, "disk cache folder (default: <train_data_dir>/.latent_cache, with a "
                                        "dataset_config <output_dir>/.latent_cache)")
    vae_batch_size: int = _opt(1, "images per VAE call while caching")
    # --- network ------------------------------------------------------------------------------
    network_algo: str = _opt("lora", f"{', '.join(ALGOS)}: lora is kohya's networks.lora, the others LyCORIS' kinds",
                              ALGOS)
    network_dim: int = _opt(4, "rank")
    network_alpha: float = _opt(1.0, "alpha; the update is scaled by alpha/rank")
    network_dropout: float | None = _opt(None, "dropout on the rank dimension while training")
    conv_dim: int | None = _opt(None, "also train the UNet's 3x3 convs (ResBlocks, down/upsamplers) at this rank")
    conv_alpha: float | None = _opt(None, "alpha of those convs (default 1)")
    lokr_factor: int = _opt(-1, "LoKr: Kronecker factor (-1: as square as possible)")
    network_train_unet_only: bool = _opt(False, "train only the UNet")
    network_train_text_encoder_only: bool = _opt(False, "train only the text encoder")
    network_weights: str | None = _opt(None, "start from this network file's weights")
    dim_from_weights: bool = _opt(False, "take network_dim and network_alpha from network_weights")
    base_weights: list[str] = _list("networks merged into the model for the run (not trained, not saved)")
    base_weights_multiplier: list[str] = _list("strength of each base_weights network (default 1)")
    scale_weight_norms: float | None = _opt(None, "after each step, scale down modules whose weight norm exceeds this")
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
    huber_scale: float = _opt(1.0, "huber / smooth_l1: the threshold schedule's scale")
    noise_offset_random_strength: bool = _opt(False, "noise offset of a random strength in [0, noise_offset]")
    adaptive_noise_scale: float | None = _opt(None, "add this times the latents' mean absolute value to noise_offset")
    ip_noise_gamma_random_strength: bool = _opt(False, "input perturbation of a random strength in [0, ip_noise_gamma]")
    min_timestep: int | None = _opt(None, "smallest training timestep (0-999)")
    max_timestep: int | None = _opt(None, "training timesteps below this (1-1000)")
    scale_v_pred_loss_like_noise_pred: bool = _opt(False, "v-prediction: weight the loss like ε-prediction's")
    v_pred_like_loss: float | None = _opt(None, "add a v-prediction-like loss times this")
    # --- output -------------------------------------------------------------------------------
    output_dir: str = _opt("output", "where network files, states and the loss curve go")
    output_name: str = _opt("last", "file name without extension")
    save_every_n_epochs: int | None = _opt(None, "save name-000004.safetensors every n epochs")
    save_every_n_steps: int | None = _opt(None, "save name-step00000100.safetensors every n steps")
    save_n_epoch_ratio: int | None = _opt(None, "save about this many epoch files in all (sets save_every_n_epochs)")
    save_last_n_epochs: int | None = _opt(None, "keep only the last n epoch files (older ones are removed)")
    save_last_n_epochs_state: int | None = _opt(None, "keep only the last n epoch states (default: save_last_n_epochs)")
    save_last_n_steps: int | None = _opt(None, "keep step files of the last n steps only")
    save_last_n_steps_state: int | None = _opt(None, "keep step states of the last n steps only")
    save_precision: str = _opt("fp32", "dtype of the saved network", SAVE_PRECISIONS)
    save_state: bool = _opt(True, "save a resumable training state beside every saved network")
    no_metadata: bool = _opt(False, "write only kohya's minimum metadata keys")
    metadata_title: str | None = _opt(None, "modelspec.title (default: output_name)")
    metadata_author: str | None = _opt(None, "modelspec.author")
    metadata_description: str | None = _opt(None, "modelspec.description")
    metadata_license: str | None = _opt(None, "modelspec.license")
    metadata_tags: str | None = _opt(None, "modelspec.tags (comma-separated)")
    metadata_usage_hint: str | None = _opt(None, "modelspec.usage_hint")
    metadata_thumbnail: str | None = _opt(None, "modelspec.thumbnail: an image file (stored as a data URL) or a data URL")
    metadata_merged_from: str | None = _opt(None, "modelspec.merged_from")
    metadata_trigger_phrase: str | None = _opt(None, "modelspec.trigger_phrase")
    metadata_preprocessor: str | None = _opt(None, "modelspec.preprocessor")
    metadata_is_negative_embedding: str | None = _opt(None, "modelspec.is_negative_embedding")
    resume: str | None = _opt(None, "continue from this state folder (name-...-state)")
    training_comment: str | None = _opt(None, "free text stored as ss_training_comment")
    # --- logs -------------------------------------------------------------------------------
    logging_dir: str | None = _opt(None, "TensorBoard event files (loss, learning rates, validation loss, samples) "
                                   "here; CSV when tensorboard is not installed")
    log_with: str | None = _opt(None, "tensorboard (wandb is not supported here)", LOGGERS)
    log_prefix: str | None = _opt(None, "prefix of the run's log folder name")
    log_tracker_name: str | None = _opt(None, "the run's log folder name (default: network_train)")
    # --- samples ------------------------------------------------------------------------------
    sample_prompts: str | None = _opt(None, "text file, one prompt per line, for sample images")
    sample_every_n_steps: int | None = _opt(None, "sample images every n steps")
    sample_every_n_epochs: int | None = _opt(None, "sample images every n epochs")
    sample_at_first: bool = _opt(False, "sample images before the first step too")
    sample_sampler: str | None = _opt(None, "sampler of prompts without --ss (unset: the sampler's default)", SAMPLERS)

    def __post_init__(self) -> None:
        self.validate()

    # --- checks -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Refuse impossible values early, with the option's name in the message."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) is not None and getattr(self, f.name) not in choices:
                _bad(f.name, f"must be one of {', '.join(choices)}, not {getattr(self, f.name)!r}")
        for name in ("network_dim", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                     "vae_batch_size", "min_bucket_reso", "max_bucket_reso"):
            if getattr(self, name) < 1:
                _bad(name, "must be at least 1")
        for name in ("max_train_epochs", "save_every_n_epochs", "save_every_n_steps", "validate_every_n_steps",
                     "validate_every_n_epochs", "sample_every_n_steps", "sample_every_n_epochs", "conv_dim", "clip_skip",
                     "max_validation_steps", "save_n_epoch_ratio", "save_last_n_epochs", "save_last_n_epochs_state",
                     "save_last_n_steps", "save_last_n_steps_state", "dataset_repeats"):
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
        if not 0 <= (self.min_timestep or 0) < (1000 if self.max_timestep is None else self.max_timestep) <= 1000:
            _bad("min_timestep / max_timestep", "must satisfy 0 <= min_timestep < max_timestep <= 1000")
        if not self.caption_separator:
            _bad("caption_separator", "must not be empty")
        if self.token_warmup_min < 0 or self.token_warmup_step < 0:
            _bad("token_warmup_min / token_warmup_step", "must not be negative")
        if self.scale_weight_norms is not None and self.scale_weight_norms <= 0:
            _bad("scale_weight_norms", "must be positive (or unset)")
        self.base_weight_multipliers()
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

    def base_weight_multipliers(self) -> list[float]:
        """The strength of each ``base_weights`` network (1 where none is given)."""
        try:
            given = [float(m) for m in self.base_weights_multiplier]
        except ValueError:
            _bad("base_weights_multiplier", f"must be numbers, not {self.base_weights_multiplier}")
        return [given[i] if i < len(given) else 1.0 for i in range(len(self.base_weights))]

    @property
    def attention(self) -> str | None:
        """The attention kohya's flags ask for, by kohya's precedence (mem_eff_attn, xformers, sdpa); None: the
        model's own."""
        return next((name for name in ("mem_eff_attn", "xformers", "sdpa") if getattr(self, name)), None)

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
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for option, key in TRAINABLE_KINDS[self.network_algo].train_options.items():
            if getattr(self, option) != defaults[option]:
                args[key] = str(getattr(self, option))
        return args

    # --- loading ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str | None = None, notes: list[str] | None = None,
                  strict: bool = True) -> TrainConfig:
        """Options by name; kohya's names for options of another shape are translated and options done nowhere
        here are dropped with a note (into ``notes``); an unknown name is refused (``strict``) or noted."""
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        values = translate(values, known, OPTIMIZERS, source, [] if notes is None else notes, strict)
        return cls(**{k: _coerce(k, v, hints[k], source) for k, v in values.items()})

    @classmethod
    def from_toml(cls, path: str) -> TrainConfig:
        return cls.from_dict(read_toml(path), source=path)


def load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return toml_reader.load(f)
    except OSError as e:
        raise LoraError(path, f"cannot read the config ({e.strerror or e})", "check the path") from None
    except toml_reader.TOMLDecodeError as e:
        raise LoraError(path, f"not valid TOML: {e}", "fix the config file") from None


def read_toml(path: str) -> dict:
    """A TOML file's options; top-level tables are flattened (kohya's config files group options that way)."""
    return _flatten(load_toml(path))


def _flatten(doc: dict) -> dict:
    """Top-level tables merged into one level, as kohya's ``read_config_from_file`` does."""
    flat: dict = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


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
    """One flag per option (kohya's underscore name, a dashed alias too), and every other option of kohya's
    train_network.py; only flags given override the config files."""
    parser = argparse.ArgumentParser(prog="python -m lib_lora.train", argument_default=argparse.SUPPRESS,
                                     description=f"Train a {'/'.join(train_labels())} network, kohya-style.")
    parser.add_argument("--config", help="TOML file of options (flags given here override it; unknown keys are refused)")
    parser.add_argument("--config_file", help="kohya sd-scripts / kohya_ss run TOML (flags given here override it; "
                        "keys train_network.py does not know are noted and ignored)")
    parser.add_argument("--output_config", action="store_true", help="write the merged options to --config_file as "
                        "a kohya-compatible TOML and exit (as kohya does)")
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
    kohya = parser.add_argument_group("kohya options", "train_network.py options read in another shape, or "
                                      "accepted with a note saying they do nothing here")
    for name in RESHAPED + tuple(NOT_HERE):
        off, why = NOT_HERE.get(name, (None, None))
        help_text = f"does nothing here: {why}" if why else "kohya's option, read into the options above"
        if off is False or name in KOHYA_FLAGS:
            kohya.add_argument(f"--{name}", dest=name, nargs="?", const=True, type=_flag, help=help_text)
        else:
            kohya.add_argument(f"--{name}", dest=name, nargs="*" if name in ("network_args", "lr_scheduler_args")
                               else None, help=help_text)
    return parser


def _flag(text: str) -> bool:
    return text.lower() in ("true", "1", "yes")


def from_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """The options of a command line: defaults, then --config / --config_file, then flags. Notes about kohya
    options that do nothing here are in ``namespace.notes``."""
    ns = build_parser().parse_args(argv)
    own, kohya = getattr(ns, "config", None), getattr(ns, "config_file", None)
    if getattr(ns, "output_config", False):
        return _from_values(ns, {}, kohya, strict=True), ns
    values = read_toml(own) if own else {}
    if kohya:
        values.update(read_toml(kohya))
    return _from_values(ns, values, kohya or own, strict=not kohya), ns


def _from_values(ns: argparse.Namespace, values: dict, source: str | None, strict: bool) -> TrainConfig:
    ns.notes = []
    values.update({k: v for k, v in vars(ns).items() if k not in COMMAND + ("config", "print_config", "notes")})
    return TrainConfig.from_dict(values, source=source, notes=ns.notes, strict=strict)


def dumps(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), indent=2)


# --- kohya-compatible files -----------------------------------------------------------------------------
OURS_ONLY = ("model_factory", "webui", "latent_cache_dir", "network_algo", "conv_dim", "conv_alpha",
             *(option for cls in TRAINABLE_KINDS.values() for option in cls.train_options))


def kohya_values(config: TrainConfig) -> dict:
    """The options as kohya's train_network.py names them (network kind as network_module + network_args);
    unset options are left out."""
    values = {k: v for k, v in config.to_dict().items() if k not in OURS_ONLY and v not in (None, "", [])}
    values["network_module"] = config.network_module
    args = [f"{k}={v}" for k, v in config.network_args().items()]
    if args:
        values["network_args"] = args
    if config.save_precision == "fp32":
        values["save_precision"] = "float"
    if config.base_weights_multiplier:
        values["base_weights_multiplier"] = [float(m) for m in config.base_weights_multiplier]
    return dict(sorted(values.items()))


def to_kohya_toml(config: TrainConfig) -> str:
    """The options as a flat TOML file kohya's ``--config_file`` (and this trainer's) reads: the same run."""
    lines = ["# written by sd-webui-lora: train_network.py --config_file this.toml"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in kohya_values(config).items()]
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def is_dataset_config(values: dict) -> bool:
    """A kohya dataset TOML ([general] / [[datasets]]) rather than a run TOML."""
    return "datasets" in values or set(values) == {"general"}


def import_file(path: str) -> tuple[TrainConfig, list[str]]:
    """A kohya file as options, for a UI: a run TOML (kohya sd-scripts' --config_file, kohya_ss's or one written
    by ``to_kohya_toml``) gives its options; a dataset TOML becomes ``dataset_config``. Returns the notes about
    options that do nothing here."""
    notes: list[str] = []
    doc = load_toml(path)
    if is_dataset_config(doc):
        return TrainConfig(dataset_config=path), [f"{path}: a dataset config; training uses its datasets"]
    return TrainConfig.from_dict(_flatten(doc), source=path, notes=notes, strict=False), notes
