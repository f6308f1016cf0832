"""A checkpoint file as the trainer's ModelBundle, for the CLI: ``--pretrained_model_name_or_path FILE`` alone.

The family (SD1.x, SD2.x, SDXL) is read from the file's keys; the model is built from the WebUI's own ldm/sgm
code and config files (``--webui DIR``, or the WebUI this Python or this extension sits in), exactly as the
WebUI builds it, and the file's weights are copied in. Nothing is downloaded: text encoders are built from
their configs (a local copy, else CLIP-L's known shape) and take their weights from the checkpoint; tokenizers
come from local files (``tokenizer_cache_dir``, the checkpoint's own folder config, or the Hugging Face cache
read offline). ``.ckpt`` files go only through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .. import hashes
from ..errors import LoraError
from ..safetensors_io import Limits, load_pickled, read_header
from .config import TrainConfig
from .model import ModelBundle

CHECKPOINT_LIMITS = Limits(max_file_bytes=64 * 1024 ** 3, max_header_bytes=256 * 1024 ** 2)
CLIP_L = "openai/clip-vit-large-patch14"
# CLIP-L's text tower (openai/clip-vit-large-patch14), for when no copy of its config is at hand
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                   projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
REPOS = {"ldm": "stable-diffusion-stability-ai", "sgm": "generative-models"}


Tensors = Callable[[], Iterator[tuple[str, torch.Tensor]]]


@dataclass
class Checkpoint:
    """What the file says before anything is built: its family, its tensors, the WebUI and the config that
    builds it."""

    path: str
    family: str
    tensors: Tensors
    webui: Path
    config: str
    config_beside: bool


# ---- reading the file -------------------------------------------------------------------------------
def read_checkpoint(path: str) -> tuple[set[str], Tensors]:
    """The tensor names of a .safetensors (its checked header) or .ckpt checkpoint, and its tensors one by one
    (safetensors memory-mapped)."""
    if path.lower().endswith(".safetensors"):
        keys = set(read_header(path, CHECKPOINT_LIMITS).tensors)
        from safetensors import safe_open

        def tensors():
            with safe_open(path, "pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        return keys, tensors
    state = load_pickled(path, CHECKPOINT_LIMITS)
    return set(state), lambda: iter(state.items())


def detect_family(path: str, keys: set[str]) -> str:
    """sd1, sd2 or sdxl from the checkpoint's keys (the WebUI's ``guess_model_config_from_state_dict`` marks)."""
    if "conditioner.embedders.1.model.ln_final.weight" in keys:
        return "sdxl"
    if "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys:
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys) and \
            "model.diffusion_model.input_blocks.0.0.weight" in keys:
        return "sd1"
    if any(k.startswith(("unet.", "text_encoder.", "down_blocks.")) for k in keys):
        raise LoraError(path, "is a diffusers-layout file, not a single-file SD checkpoint",
                        "use the .safetensors/.ckpt checkpoint the WebUI loads")
    raise LoraError(path, "is not an SD1.x, SD2.x or SDXL checkpoint (no UNet and text encoder keys)",
                    "point pretrained_model_name_or_path at a Stable Diffusion checkpoint")


# ---- the WebUI's code -------------------------------------------------------------------------------
def find_webui(given: str | None) -> Path:
    """The WebUI folder: the one given, else the WebUI this extension or this Python's venv sits in."""
    def ok(p: Path) -> bool:
        return (p / "repositories" / REPOS["ldm"] / "ldm").is_dir()

    if given:
        if not ok(Path(given)):
            raise LoraError(given, "is not a stable-diffusion-webui folder (no repositories/"
                            f"{REPOS['ldm']}/ldm in it)", "give the folder holding webui.py and repositories/")
        return Path(given)
    prefix = Path(sys.prefix)
    for candidate in (Path(__file__).resolve().parents[4], prefix.parent, prefix.parent / "webui"):
        if ok(candidate):
            return candidate
    raise LoraError(None, "building the model from a checkpoint needs the WebUI's ldm/sgm code, and no WebUI was "
                    "found beside this Python or this extension", "pass --webui /path/to/stable-diffusion-webui "
                    "(and run with the WebUI's Python), or give a model_factory")


def config_for(ckpt_path: str, family: str, webui: Path) -> tuple[str, bool]:
    """The ldm/sgm YAML that builds this checkpoint: ``<checkpoint>.yaml`` beside it (as the WebUI does), else
    the WebUI's own config for the family."""
    beside = os.path.splitext(ckpt_path)[0] + ".yaml"
    if os.path.isfile(beside):
        return beside, True
    sd2 = webui / "repositories" / REPOS["ldm"] / "configs" / "stable-diffusion"
    return str({"sd1": webui / "configs" / "v1-inference.yaml", "sd2": sd2 / "v2-inference.yaml",
                "sdxl": webui / "repositories" / REPOS["sgm"] / "configs" / "inference" / "sd_xl_base.yaml"}[family]), False


def import_code(webui: Path, family: str):
    """ldm's or sgm's ``instantiate_from_config``, from the WebUI's repositories."""
    package = "sgm" if family == "sdxl" else "ldm"
    for repo in REPOS.values():
        path = str(webui / "repositories" / repo)
        if path not in sys.path:
            sys.path.append(path)
    try:
        return importlib.import_module(f"{package}.util").instantiate_from_config, importlib.import_module("omegaconf")
    except ImportError as e:
        raise LoraError(None, f"the WebUI's {package} code cannot be imported here: {e}",
                        f"run with the WebUI's Python ({webui / 'venv' / 'bin' / 'python'} or the one it was "
                        "installed with), whose packages it needs") from None


# ---- building without downloads ----------------------------------------------------------------------
class _Patches:
    """Attributes replaced for a block and put back after it."""

    def __init__(self):
        self.saved: list[tuple[object, str, object]] = []

    def set(self, owner, name: str, value) -> None:
        self.saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, value)

    def restore(self) -> None:
        for owner, name, value in reversed(self.saved):
            if value is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


_MISSING = object()


def local_tokenizer(load: Callable[[str], object], version: str, cache_dir: str | None):
    """A tokenizer from local files only (``load(place)`` reads one): ``cache_dir/<repo_id with _>`` (kohya's
    tokenizer_cache_dir), a folder named by ``version``, or the Hugging Face cache offline."""
    places = [os.path.join(cache_dir, version.replace("/", "_"))] if cache_dir else []
    places += [version] if os.path.isdir(version) else []
    for place in places:
        if os.path.isdir(place):
            return load(place)
    try:
        return load(version)
    except (OSError, ValueError):
        raise LoraError(None, f"no local copy of the {version} tokenizer (nothing is downloaded)",
                        "put it in the Hugging Face cache (the WebUI's first start does) or save it to "
                        f"<tokenizer_cache_dir>/{version.replace('/', '_')}") from None


def clip_text_config(version: str):
    """CLIP text config of ``version``: a local folder's, the Hugging Face cache's, else CLIP-L's known shape."""
    from transformers import CLIPTextConfig

    if os.path.isfile(os.path.join(version, "config.json")):
        return CLIPTextConfig.from_pretrained(version, local_files_only=True)
    try:
        return CLIPTextConfig.from_pretrained(version, local_files_only=True)
    except (OSError, ValueError):
        if version != CLIP_L:
            raise LoraError(None, f"no local config for the text encoder {version}",
                            "put its config.json in the Hugging Face cache or beside the checkpoint's .yaml") from None
        return CLIPTextConfig(**CLIP_L_TEXT)


@contextlib.contextmanager
def offline_construction(tokenizer_cache_dir: str | None) -> Iterator[None]:
    """ldm's / sgm's text encoders built from configs (weights come from the checkpoint), tokenizers from local
    files, open_clip without pretrained weights, and no random initialisation of what the checkpoint fills."""
    import open_clip
    import transformers

    patches = _Patches()
    tokenizer_cls, model_cls = transformers.CLIPTokenizer, transformers.CLIPTextModel
    load_tokenizer = tokenizer_cls.from_pretrained.__func__
    create = open_clip.create_model_and_transforms

    def tokenizer(cls, version, *_args, **_kwargs):
        return local_tokenizer(lambda place: load_tokenizer(cls, place, local_files_only=True), version,
                               tokenizer_cache_dir)

    patches.set(tokenizer_cls, "from_pretrained", classmethod(tokenizer))
    patches.set(model_cls, "from_pretrained", classmethod(lambda cls, version, *a, **kw: cls(clip_text_config(version))))
    patches.set(open_clip, "create_model_and_transforms", lambda *a, pretrained=None, **kw: create(*a, pretrained=None, **kw))
    for name in ("kaiming_uniform_", "_no_grad_normal_", "_no_grad_uniform_", "normal_", "uniform_", "trunc_normal_"):
        patches.set(torch.nn.init, name, lambda t, *a, **kw: t)
    try:
        yield
    finally:
        patches.restore()


def copy_weights(model: nn.Module, tensors: Tensors, path: str, family: str) -> None:
    """The checkpoint's tensors into the model; every parameter must be in the file."""
    own = model.state_dict(keep_vars=True)
    filled = set()
    with torch.no_grad():
        for key, t in tensors():
            target = own.get(key)
            if target is None:
                continue
            if target.shape != t.shape:
                raise LoraError(path, f"{key} has shape {tuple(t.shape)}, the {FAMILY_NAMES[family]} model "
                                f"{tuple(target.shape)}", "use a config (.yaml beside the checkpoint) that fits it")
            target.copy_(t.to(target.dtype))
            filled.add(key)
    params = {name for name, _ in model.named_parameters()}
    missing = sorted(params - filled)
    if missing:
        raise LoraError(path, f"lacks {len(missing)} weights of the {FAMILY_NAMES[family]} model (e.g. {missing[0]})",
                        "the file is incomplete or of another kind")


def inspect_checkpoint(cfg: TrainConfig) -> Checkpoint:
    path = cfg.pretrained_model_name_or_path
    if not path or not os.path.isfile(path):
        raise LoraError(path, "is not a checkpoint file", "give pretrained_model_name_or_path = a .safetensors or .ckpt file")
    keys, tensors = read_checkpoint(path)
    family = detect_family(path, keys)
    webui = find_webui(cfg.webui)
    config, beside = config_for(path, family, webui)
    return Checkpoint(path, family, tensors, webui, config, beside)


# ---- placement: the one device/dtype decision of a CLI run -------------------------------------------
def placement(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """This process's GPU when there is one (a launcher has set it), else the CPU; the UNet and text encoders in
    the mixed-precision dtype on a GPU, fp32 on the CPU (autocast does the rest); the VAE stays fp32."""
    if torch.cuda.is_available():
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
        return torch.device("cuda", torch.cuda.current_device()), dtype
    return torch.device("cpu"), torch.float32


# ---- the bundle ----------------------------------------------------------------------------------------
def token_chunks(ids: list[list[int]], chunks: int, bos: int, eos: int, pad: int, length: int = 77) -> torch.Tensor:
    """[batch, k, 77] tokens: each caption's ids in (length - 2)-token pieces between start and end tokens,
    padded; k is what the batch's longest caption needs, at most ``chunks`` (the rest is cut, as kohya does)."""
    n = length - 2
    ids = [t[:n * chunks] for t in ids]
    used = max(1, max((len(t) + n - 1) // n for t in ids))
    rows = [[[bos] + t[k * n:(k + 1) * n] + [eos] + [pad] * (n - len(t[k * n:(k + 1) * n])) for k in range(used)]
            for t in ids]
    return torch.tensor(rows, dtype=torch.long)


def hf_ids(tokenizer, captions: list[str]) -> list[list[int]]:
    return tokenizer(captions, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


def open_clip_ids(captions: list[str]) -> tuple[list[list[int]], int, int]:
    from open_clip import tokenizer as oc

    t = oc._tokenizer
    return [t.encode(c) for c in captions], t.encoder["<start_of_text>"], t.encoder["<end_of_text>"]


def _flat(tokens: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    b, k, n = tokens.shape
    return tokens.reshape(b * k, n), b, k


def text_functions(model: nn.Module, family: str, cfg: TrainConfig):
    """(tokenize, encode_text) of the model's own text encoders, as the WebUI conditions: CLIP skip on SD1/SD2,
    75-token chunks side by side, SDXL's two encoders side by side with the second one's pooled output."""
    chunks = (cfg.max_token_length or 75) // 75
    skip = cfg.clip_skip or 1
    if family == "sd1":
        emb = model.cond_stage_model
        tok = emb.tokenizer

        def tokenize(captions: list[str]) -> torch.Tensor:
            return token_chunks(hf_ids(tok, captions), chunks, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)

        def encode_text(tokens: torch.Tensor) -> torch.Tensor:
            flat, b, k = _flat(tokens)
            out = emb.transformer(input_ids=flat, output_hidden_states=skip > 1)
            z = out.last_hidden_state if skip <= 1 else emb.transformer.text_model.final_layer_norm(out.hidden_states[-skip])
            return z.reshape(b, k * z.shape[1], z.shape[2])
        return tokenize, encode_text
    if family == "sd2":
        emb = model.cond_stage_model
        emb.layer_idx = skip  # open_clip's layers from the end, 1 = the penultimate (SD2's own)

        def tokenize(captions: list[str]) -> torch.Tensor:
            ids, bos, eos = open_clip_ids(captions)
            return token_chunks(ids, chunks, bos, eos, 0)

        def encode_text(tokens: torch.Tensor) -> torch.Tensor:
            flat, b, k = _flat(tokens)
            z = emb.encode_with_transformer(flat)
            return z.reshape(b, k * z.shape[1], z.shape[2])
        return tokenize, encode_text
    first, second = model.conditioner.embedders[0], model.conditioner.embedders[1]
    tok = first.tokenizer

    def tokenize(captions: list[str]) -> list[torch.Tensor]:
        ids, bos, eos = open_clip_ids(captions)
        return [token_chunks(hf_ids(tok, captions), chunks, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id),
                token_chunks(ids, chunks, bos, eos, 0)]

    def encode_text(tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        (t1, b, k), (t2, _, _) = _flat(tokens[0]), _flat(tokens[1])
        z1 = first.transformer(input_ids=t1, output_hidden_states=True).hidden_states[first.layer_idx]
        out = second.encode_with_transformer(t2)
        z2, pooled = out["penultimate"], out["pooled"]
        context = torch.cat([z1, z2.to(z1.dtype)], dim=-1)
        return context.reshape(b, k * context.shape[1], context.shape[2]), pooled.reshape(b, k, -1)[:, 0]
    return tokenize, encode_text


def is_v_prediction(unet: nn.Module, context_dim: int) -> bool:
    """The WebUI's test for SD2 768-v weights: at t=999 a v-model's output is far below its input."""
    p = next(unet.parameters())
    x = torch.full((1, 4, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        out = unet(x, torch.tensor([999], device=p.device), context=torch.full((1, 2, context_dim), 0.5,
                                                                                 device=p.device, dtype=p.dtype))
    return float((out - x).mean()) < -1


def replace_vae(model: nn.Module, path: str) -> None:
    tensors = dict(read_checkpoint(path)[1]())
    prefix = "first_stage_model."
    tensors = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}
    vae = model.first_stage_model
    own = vae.state_dict(keep_vars=True)
    wanted = {name for name, _ in vae.named_parameters()}
    if not wanted <= set(tensors):
        raise LoraError(path, f"is not a VAE of this model ({len(wanted - set(tensors))} of its weights are missing)",
                        "use an ldm-format VAE file for this model family")
    with torch.no_grad():
        for key in wanted:
            if own[key].shape != tensors[key].shape:
                raise LoraError(path, f"{key} has shape {tuple(tensors[key].shape)}, the VAE {tuple(own[key].shape)}",
                                "use a VAE of this model family")
            own[key].copy_(tensors[key])


def load_checkpoint(cfg: TrainConfig, log: Callable[[str], None] = print) -> ModelBundle:
    """The checkpoint ``cfg.pretrained_model_name_or_path`` built with the WebUI's code, as a ModelBundle;
    sets ``cfg.v_parameterization`` for SD2 768-v weights the run was not told about."""
    ckpt = inspect_checkpoint(cfg)
    instantiate, omegaconf = import_code(ckpt.webui, ckpt.family)
    log(f"building the {FAMILY_NAMES[ckpt.family]} model of {ckpt.path} from {ckpt.config}")
    if cfg.v2 and ckpt.family != "sd2":
        log(f"warning: v2 is set but {ckpt.path} is an {FAMILY_NAMES[ckpt.family]} checkpoint; trained as that")
    config = omegaconf.OmegaConf.load(ckpt.config)
    ddconfig = config.model.params.first_stage_config.params.ddconfig
    if ddconfig.get("attn_type") == "vanilla-xformers" and importlib.util.find_spec("xformers") is None:
        ddconfig.attn_type = "vanilla"  # as the WebUI does without xformers
    with offline_construction(cfg.tokenizer_cache_dir):
        model = instantiate(config.model)
    copy_weights(model, ckpt.tensors, ckpt.path, ckpt.family)
    if cfg.vae:
        replace_vae(model, cfg.vae)
    device, dtype = placement(cfg)
    model.eval().requires_grad_(False)
    model.to(device)
    for part in (model.model, getattr(model, "cond_stage_model", None), getattr(model, "conditioner", None)):
        if part is not None:
            part.to(dtype)
    if ckpt.family == "sd2" and not cfg.v_parameterization:
        parameterization = config.model.params.get("parameterization", None)
        context_dim = config.model.params.unet_config.params.context_dim
        if parameterization == "v" or (not ckpt.config_beside and is_v_prediction(model.model.diffusion_model, context_dim)):
            cfg.v_parameterization = True
            log("v-prediction weights (SD2 768-v): training with v_parameterization")
    tokenize, encode_text = text_functions(model, ckpt.family, cfg)
    vae = model.first_stage_model

    def vae_encode(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = pixels.to(device, next(vae.parameters()).dtype)
            if ckpt.family == "sdxl":
                return model.encode_first_stage(x).float()
            return model.get_first_stage_encoding(model.encode_first_stage(x)).float()

    vae_id = f"{os.path.basename(ckpt.path)}:{hashes.legacy_hash(ckpt.path)}"
    if cfg.vae:
        vae_id += f":{os.path.basename(cfg.vae)}:{hashes.legacy_hash(cfg.vae)}"
    return ModelBundle(model, vae_encode, tokenize, encode_text, vae_id=vae_id)
