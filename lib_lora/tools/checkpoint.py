"""A checkpoint's state dict as a module tree under its own names, so the engine indexes and patches it like
a loaded model (``ModelIndex`` reads checkpoint naming). The modules hold the state dict's own tensors: a
merge writes straight into them, and saving writes the state dict.

Checkpoints are several GB: their tensors are views of a private memory map (read when used, changes kept in this
process), and saving streams them to the file one by one, so no step holds a second copy."""
from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import LoraError
from ..safetensors_io import Limits, read_state_dict, save_safetensors
from ..sidecar import atomic_write

CHECKPOINT_LIMITS = Limits(max_file_bytes=64 * 1024 ** 3)


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A checkpoint's tensors (``.safetensors``, or a pickle through the weights-only loader), memory-mapped, and
    its metadata."""
    tensors, metadata = read_state_dict(path, CHECKPOINT_LIMITS, mapped=True)
    if not any(k.startswith("model.diffusion_model.") for k in tensors):
        raise LoraError(path, "has no model.diffusion_model.* weights", "give a full SD1/SD2/SDXL checkpoint")
    return tensors, metadata


def _leaf(params: dict[str, torch.Tensor]) -> nn.Module | None:
    """A module of the right kind around these tensors (built on the meta device, then given them)."""
    with torch.device("meta"):
        if "in_proj_weight" in params:
            e = params["in_proj_weight"].shape[1]
            module = nn.MultiheadAttention(e, 1, bias="in_proj_bias" in params)
            del module.out_proj
        elif "weight" not in params:
            return None
        elif params["weight"].dim() == 4:
            w = params["weight"]
            module = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), bias="bias" in params)
        elif params["weight"].dim() == 2:
            module = nn.Linear(params["weight"].shape[1], params["weight"].shape[0], bias="bias" in params)
        elif params["weight"].dim() == 1:
            module = nn.LayerNorm(params["weight"].shape[0], elementwise_affine=True, bias="bias" in params)
        else:
            return None
    for name, t in params.items():
        setattr(module, name, nn.Parameter(t, requires_grad=False))
    return module


def as_modules(tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Linear, Conv2d, MultiheadAttention and (1-D) norm modules at the state dict's names, holding its tensors."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        owner, _, param = key.rpartition(".")
        if param in ("weight", "bias", "in_proj_weight", "in_proj_bias") and owner:
            groups.setdefault(owner, {})[param] = t
    root = nn.Module()
    for owner in sorted(groups, key=lambda n: n.count(".")):
        leaf = _leaf(groups[owner])
        if leaf is None:
            continue
        parent = root
        *path, last = owner.split(".")
        for part in path:
            child = parent._modules.get(part)
            if child is None:
                child = parent._modules[part] = nn.Module()
            parent = child
        parent._modules[last] = leaf  # parents come first (by depth), so nothing is replaced
    return root


def require_safetensors(path: str) -> None:
    if not path.lower().endswith(".safetensors"):
        raise LoraError(path, "output must be a .safetensors file", "choose a name ending in .safetensors")


def save_checkpoint(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """The state dict as ``.safetensors``, written to a temp file beside ``path`` and renamed over it."""
    require_safetensors(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: save_safetensors(tmp, tensors, metadata))
