"""kohya sd-scripts' ``train_network.py`` options that are not TrainConfig fields: the ones this trainer reads
under another shape (``network_module`` + ``network_args``, ``use_8bit_adam``, ...), and the ones it accepts
with a one-line note saying they do nothing here. Every other option of ``train_network.py --help`` is a
TrainConfig field of the same name and meaning.
"""
from __future__ import annotations

import difflib

from ..adapters import TRAINABLE_KINDS, train_labels
from ..errors import LoraError

# option → (the value meaning "off", what it would do that this trainer does not); a note is given only for
# another value. ANY: a note for any value given.
ANY = object()
NOT_HERE: dict[str, tuple[object, str]] = {
    "console_log_level": (None, "log levels are not set here"),
    "console_log_file": (None, "messages go to the console only"),
    "console_log_simple": (False, "the console format is fixed here"),
    "face_crop_aug_range": (None, "face-centred crops are not done here"),
    "debug_dataset": (False, "the dataset is not previewed; the run trains"),
    "skip_cache_check": (False, "the latent cache checks its keys anyway"),
    "alpha_mask": (False, "the loss is not masked by alpha here"),
    "masked_loss": (False, "the loss is not masked here"),
    "conditioning_data_dir": (None, "ControlNet-style datasets are not used here"),
    "dataset_class": (None, "custom dataset classes are not loaded here"),
    "huggingface_repo_id": (None, "nothing is uploaded to Hugging Face here"),
    "huggingface_repo_type": (None, "nothing is uploaded to Hugging Face here"),
    "huggingface_path_in_repo": (None, "nothing is uploaded to Hugging Face here"),
    "huggingface_token": (None, "nothing is uploaded to Hugging Face here"),
    "huggingface_repo_visibility": (None, "nothing is uploaded to Hugging Face here"),
    "save_state_to_huggingface": (False, "nothing is uploaded to Hugging Face here"),
    "resume_from_huggingface": (False, "states are resumed from local folders only"),
    "async_upload": (False, "nothing is uploaded to Hugging Face here"),
    "save_state_on_train_end": (False, "with save_state (on by default here) every save, the last included, "
                                       "writes a state"),
    "torch_compile": (False, "torch.compile is not used here"),
    "dynamo_backend": (("inductor", "no"), "torch.compile is not used here"),
    "max_data_loader_n_workers": (ANY, "images are read in the training process (latents are usually cached)"),
    "persistent_data_loader_workers": (False, "images are read in the training process"),
    "full_fp16": (False, "network weights stay fp32 here; mixed_precision casts the compute"),
    "full_bf16": (False, "network weights stay fp32 here; mixed_precision casts the compute"),
    "fp8_base": (False, "the base model is not stored in fp8 here"),
    "fp8_base_unet": (False, "the base model is not stored in fp8 here"),
    "ddp_timeout": (None, "several processes sum gradients directly here, not through DDP"),
    "ddp_gradient_as_bucket_view": (False, "several processes sum gradients directly here, not through DDP"),
    "ddp_static_graph": (False, "several processes sum gradients directly here, not through DDP"),
    "wandb_run_name": (None, "Weights & Biases is not supported here"),
    "wandb_api_key": (None, "Weights & Biases is not supported here"),
    "log_tracker_config": (None, "tracker config files are not read here"),
    "log_config": (False, "the run's options are in each state's train_state.json"),
    "lowram": (False, "the model is placed once on the training device here"),
    "highvram": (False, "the model is placed once on the training device here"),
    "deepspeed": (False, "DeepSpeed is not used here"),
    "zero_stage": (2, "DeepSpeed is not used here"),
    "offload_optimizer_device": (None, "DeepSpeed is not used here"),
    "offload_optimizer_nvme_path": (None, "DeepSpeed is not used here"),
    "offload_param_device": (None, "DeepSpeed is not used here"),
    "offload_param_nvme_path": (None, "DeepSpeed is not used here"),
    "zero3_init_flag": (False, "DeepSpeed is not used here"),
    "zero3_save_16bit_model": (False, "DeepSpeed is not used here"),
    "fp16_master_weights_and_gradients": (False, "DeepSpeed is not used here"),
    "lr_scheduler_type": ("", "custom scheduler classes are not loaded here; lr_scheduler is used"),
    "lr_scheduler_args": (None, "scheduler arguments are not used here; lr_scheduler is used"),
    "lr_decay_steps": (0, "warmup_stable_decay is not a scheduler here"),
    "lr_scheduler_timescale": (None, "inverse_sqrt is not a scheduler here"),
    "lr_scheduler_min_lr_ratio": (None, "cosine_with_min_lr is not a scheduler here"),
    "fused_backward_pass": (False, "the optimizer steps after the backward pass here"),
    "weighted_captions": (False, "captions are not weighted here: (word:1.3) is plain text"),
    "cpu_offload_checkpointing": (False, "checkpointed activations stay on the training device"),
    "save_model_as": ("safetensors", "networks are always saved as .safetensors"),
    "no_half_vae": (ANY, None),  # honoured: the VAE always runs in fp32 here
    "skip_until_initial_step": (False, "a run starts at step 0 or where a resumed state stopped"),
    "initial_epoch": (None, "a run starts at step 0 or where a resumed state stopped"),
    "initial_step": (None, "a run starts at step 0 or where a resumed state stopped"),
}
# options read into TrainConfig fields of another shape
RESHAPED = ("network_module", "network_args", "caption_extention", "use_8bit_adam", "use_lion_optimizer")
KOHYA_FLAGS = ("use_8bit_adam", "use_lion_optimizer", "no_half_vae")  # flags whose "off" is not False above
# options of the command line itself
COMMAND = ("config_file", "output_config")
# network_module → network_algo (LyCORIS' module takes the kind from network_args' algo)
NETWORK_MODULES = {**{f"networks.{kind}": kind for kind in TRAINABLE_KINDS}, "lycoris.kohya": None}
ALGOS = {label.lower(): kind for label, kind in train_labels().items()}  # algo= in network_args → network_algo
NETWORK_ARGS = {"algo": "network_algo", "conv_dim": "conv_dim", "conv_alpha": "conv_alpha", "dropout": "network_dropout",
                **{key: option for cls in TRAINABLE_KINDS.values() for option, key in cls.train_options.items()}}
OFF_VALUES = ("", "0", "0.0", "false", "none", "full")  # LyCORIS network_args that change nothing


def kohya_names() -> set[str]:
    """Every kohya option name this module reads or notes."""
    return set(NOT_HERE) | set(RESHAPED) | set(COMMAND)


def _is_off(value, off) -> bool:
    if off is ANY:
        return False
    if isinstance(off, tuple):
        return value in off
    return value == off or (off in (None, False) and value in (None, False, [], "", 0))


def translate(values: dict, known: set[str], optimizers: tuple[str, ...], source: str | None,
              notes: list[str], strict: bool) -> dict:
    """kohya option values as TrainConfig values: reshaped options turned into fields, options done nowhere
    here dropped with a note; unknown keys refused (``strict``, with the closest name) or noted."""
    values = {k: v for k, v in values.items() if k not in COMMAND}
    for name in list(values):
        if name in NOT_HERE:
            off, why = NOT_HERE[name]
            value = values.pop(name)
            if why and not _is_off(value, off):
                notes.append(f"{name} = {value!r} does nothing here: {why}")
    if "caption_extention" in values:
        values.setdefault("caption_extension", values.pop("caption_extention"))
    if values.pop("use_8bit_adam", False):
        values["optimizer_type"] = "AdamW8bit"
    if values.pop("use_lion_optimizer", False):
        values["optimizer_type"] = "Lion"
    _network(values, source, notes)
    _optimizer(values, optimizers)
    if "save_precision" in values and values["save_precision"] in ("float", None):
        values["save_precision"] = "fp32"
    lrs = values.get("text_encoder_lr")
    if isinstance(lrs, (list, tuple)):
        values["text_encoder_lr"] = lrs[0] if lrs else None
        if len(set(lrs)) > 1:
            notes.append(f"text_encoder_lr = {list(lrs)}: both text encoders train at {lrs[0]} here")
    warmup = values.get("lr_warmup_steps")
    if isinstance(warmup, float) and 0 < warmup < 1:
        values.pop("lr_warmup_steps")
        notes.append(f"lr_warmup_steps = {warmup} (a ratio) does nothing here: give a number of steps")
    for name in [k for k, v in values.items() if v is None and k not in known]:
        values.pop(name)
    unknown = [k for k in values if k not in known]
    if unknown:
        if strict:
            close = {k: difflib.get_close_matches(k, known | kohya_names(), 1) for k in unknown}
            hint = "; ".join(f"{k!r}" + (f" (did you mean {m[0]!r}?)" if m else "") for k, m in close.items())
            raise LoraError(source, f"unknown option {hint}", "see python -m lib_lora.train --help")
        for name in unknown:
            notes.append(f"{name} is not a train_network.py option; ignored")
            values.pop(name)
    return values


def _network(values: dict, source: str | None, notes: list[str]) -> None:
    """kohya's ``network_module`` + ``network_args = ["conv_dim=4", "algo=loha"]`` as this config's options."""
    module = values.pop("network_module", None)
    if module is not None and module not in NETWORK_MODULES:
        raise LoraError(source, f"network_module {module!r} is not trained here",
                        f"use one of {', '.join(NETWORK_MODULES)}")
    args = values.pop("network_args", None) or []
    if isinstance(args, str):
        args = args.split()
    for arg in args:
        key, sep, value = str(arg).partition("=")
        key, value = key.strip(), value.strip().strip('"')
        if not sep:
            raise LoraError(source, f"network_args entry {arg!r} is not key=value", "e.g. conv_dim=4")
        if key == "algo":
            if value.lower() not in ALGOS:
                raise LoraError(source, f"network_args algo={value} is not trained here", f"use one of {', '.join(ALGOS)}")
            value = ALGOS[value.lower()]
        if key in NETWORK_ARGS:
            values[NETWORK_ARGS[key]] = value
        elif value.lower() not in OFF_VALUES:
            notes.append(f"network_args {key}={value} does nothing here")
    if module == "lycoris.kohya":
        values.setdefault("network_algo", "lora")
    elif module is not None:
        values["network_algo"] = NETWORK_MODULES[module]


def _optimizer(values: dict, optimizers: tuple[str, ...]) -> None:
    """kohya matches optimizer names in any case; unset means AdamW."""
    name = values.get("optimizer_type")
    if name is None or name == "":
        values.pop("optimizer_type", None)
        return
    values["optimizer_type"] = next((o for o in optimizers if o.lower() == str(name).lower()), name)
