"""Where each target lives in a loaded model: checkpoint names, seen through the WebUI's wrappers."""
from __future__ import annotations

import torch

from .keymap import Target, kohya_name

PATCHABLE = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention)
# (checkpoint prefix, part, whether that encoder uses open_clip naming)
ROOTS = (
    ("model.diffusion_model.", "unet", False),
    ("cond_stage_model.transformer.", "te", False),
    ("cond_stage_model.model.", "te", True),
    ("conditioner.embedders.0.transformer.", "te", False),
    ("conditioner.embedders.1.model.", "te2", True),
)


def checkpoint_name(name: str) -> str:
    """A module name with the WebUI's ``.wrapped`` levels removed."""
    return ".".join(p for p in name.split(".") if p != "wrapped")


class ModelIndex:
    """Patchable modules by (part, underscored path), the model's family, and MHA parents of out_proj."""

    def __init__(self, model: torch.nn.Module):
        self.modules: dict[tuple[str, str], tuple[str, torch.nn.Module]] = {}
        self.parent_mha: dict[str, str] = {}
        self.open_clip: dict[str, bool] = {}
        self.by_name: dict[str, torch.nn.Module] = {}
        for raw, module in model.named_modules():
            if not isinstance(module, PATCHABLE):
                continue
            name = checkpoint_name(raw)
            self.by_name[name] = module
            for prefix, part, open_clip in ROOTS:
                if name.startswith(prefix):
                    self.modules[(part, name[len(prefix):].replace(".", "_"))] = (name, module)
                    self.open_clip.setdefault(part, open_clip)
                    break
        for name, module in self.by_name.items():
            if isinstance(module, torch.nn.MultiheadAttention):
                self.parent_mha[name + ".out_proj"] = name
        self.family = self._family()

    def _family(self) -> str | None:
        if "te2" in self.open_clip:
            return "sdxl"
        if "te" in self.open_clip:
            return "sd2" if self.open_clip["te"] else "sd1"
        if any(p == "unet" and path.startswith("label_emb") for p, path in self.modules):
            return "sdxl"
        proj = self.modules.get(("unet", "input_blocks_1_1_proj_in"))
        if proj is not None:
            return "sd2" if isinstance(proj[1], torch.nn.Linear) else "sd1"
        return None

    def resolve(self, target: Target) -> tuple[str, torch.nn.Module, str | None] | None:
        """(checkpoint name, module, sub) for a target, or None when the model has no such module."""
        hit = self.modules.get((target.part, target.path))
        if hit is not None:
            if target.sub and not isinstance(hit[1], torch.nn.MultiheadAttention):
                return None
            return hit[0], hit[1], target.sub
        for sub in ("q", "k", "v"):
            suffix = f"_{sub}_proj"
            if target.path.endswith(suffix):
                hit = self.modules.get((target.part, target.path[: -len(suffix)]))
                if hit is not None and isinstance(hit[1], torch.nn.MultiheadAttention):
                    return hit[0], hit[1], sub
        return None

    def weight(self, target: Target) -> torch.Tensor | None:
        """The model's weight for a target (detached; q/k/v: its rows of in_proj_weight), or None."""
        hit = self.resolve(target)
        if hit is None:
            return None
        _name, module, sub = hit
        if isinstance(module, torch.nn.MultiheadAttention):
            w = module.in_proj_weight.detach()
            return w[qkv_slice(sub, w.shape[0] // 3)]
        return module.weight.detach()

    def kohya_name(self, target: Target) -> str:
        """The module name kohya's trainers write for a target of this model (q/k/v as ``..._q_proj``)."""
        path = target.path + (f"_{target.sub}_proj" if target.sub else "")
        return kohya_name(target.part, path, self.open_clip.get(target.part, False), self.family)


def qkv_slice(sub: str, size: int) -> slice:
    """The rows of q, k or v in an nn.MultiheadAttention's packed in_proj (each ``size`` rows)."""
    i = "qkv".index(sub)
    return slice(i * size, (i + 1) * size)
