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
    ("text_encoders.clip_l.transformer.", "te", False),  # SD3 (the WebUI's modules/models/sd3)
    ("text_encoders.clip_g.transformer.", "te2", False),
    ("text_encoders.t5xxl.transformer.", "te3", False),
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
        if "te3" in self.open_clip or any(p == "unet" and path.startswith("joint_blocks_") for p, path in self.modules):
            return "sd3"
        if "te2" in self.open_clip and not self.open_clip["te2"]:  # CLIP-G with HF naming: SD3's, T5 off
            return "sd3"
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
            if target.sub and not fused_qkv(*hit):
                return None
            return hit[0], hit[1], target.sub
        for sub in ("q", "k", "v"):
            suffix = f"_{sub}_proj"
            if target.path.endswith(suffix):
                hit = self.modules.get((target.part, target.path[: -len(suffix)]))
                if hit is not None and fused_qkv(*hit):
                    return hit[0], hit[1], sub
        return None

    def weight(self, target: Target) -> torch.Tensor | None:
        """The model's weight for a target (detached; q/k/v: its rows of the fused weight), or None."""
        hit = self.resolve(target)
        if hit is None:
            return None
        _name, module, sub = hit
        w = (module.in_proj_weight if isinstance(module, torch.nn.MultiheadAttention) else module.weight).detach()
        return w[qkv_slice(sub, w.shape[0] // 3)] if sub else w

    def kohya_name(self, target: Target) -> str:
        """The module name kohya's trainers write for a target of this model (q/k/v as ``..._q_proj``)."""
        path = target.path + (f"_{target.sub}_proj" if target.sub else "")
        return kohya_name(target.part, path, self.open_clip.get(target.part, False), self.family)


def fused_qkv(name: str, module: torch.nn.Module) -> bool:
    """A module holding q, k and v as thirds of one weight: nn.MultiheadAttention's in_proj, or SD3's ``….qkv``
    Linear (the WebUI's mmdit.QkvLinear; known by its checkpoint name, so a checkpoint's plain Linear counts too)."""
    if isinstance(module, torch.nn.MultiheadAttention):
        return True
    return isinstance(module, torch.nn.Linear) and name.endswith(".qkv") and module.out_features % 3 == 0


def qkv_slice(sub: str, size: int) -> slice:
    """The rows of q, k or v in a fused weight (nn.MultiheadAttention's in_proj, SD3's qkv; each ``size`` rows)."""
    i = "qkv".index(sub)
    return slice(i * size, (i + 1) * size)
