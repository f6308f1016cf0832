"""A network of trainable adapters (each kind's trainable form) hooked onto a loaded model, saved under kohya's
key names.

The model is never modified: each trained layer gets a forward hook adding the module's extra output (open_clip's
``nn.MultiheadAttention`` gets the shared forward of ``lib_lora.mha`` instead, as its projections are not called as
modules), so the WebUI's loaded checkpoint can be trained and given back untouched. The layers trained are
``kohya_targets``' (kohya's ``networks.lora``: the UNet's transformer blocks and the text encoder's attention and
MLP blocks, plus, with ``conv_dim``, the ResBlocks' and down/upsamplers' layers). Every key name is checked through
the engine's own key mapping, so a saved file loads back onto exactly the trained layers.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..adapters import TRAINABLE_KINDS, TrainableAdapter
from ..errors import LoraError
from ..forward_swap import ForwardSwap
from ..keymap import FAMILY_NAMES, split_key, target_for
from ..kohya_targets import kohya_targets
from ..mha import mha_forward
from ..model_index import ModelIndex
from .config import TrainConfig


class TrainNetwork(nn.Module):
    """All trainable adapters of one run, keyed by kohya name; ``attach()`` hooks them onto the model."""

    def __init__(self, sd_model: nn.Module, cfg: TrainConfig):
        super().__init__()
        index = ModelIndex(sd_model)
        if index.family not in ("sd1", "sd2", "sdxl"):
            raise LoraError(None, f"training {FAMILY_NAMES.get(index.family, index.family)} models is not supported",
                            "load an SD1.x, SD2.x or SDXL checkpoint")
        self.family = index.family
        self.algo = cfg.network_algo
        self.loras = nn.ModuleDict()
        self.parts: dict[str, str] = {}
        self.skipped: list[str] = []
        self._targets: dict[str, tuple[nn.Module, str | None]] = {}
        self._handles: list = []
        self._mha: dict[nn.MultiheadAttention, dict[str, TrainableAdapter]] = {}
        kind = TRAINABLE_KINDS[self.algo]
        options = {name: getattr(cfg, name) for name in kind.train_options}
        for target in kohya_targets(index, convs=cfg.conv_dim is not None):
            if cfg.network_train_unet_only if target.part != "unet" else cfg.network_train_text_encoder_only:
                continue
            full, org = index.modules[(target.part, target.path)]
            layer = org.out_proj if target.sub else org
            big_conv = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
            dim, alpha = (cfg.conv_dim, cfg.effective_conv_alpha) if big_conv else (cfg.network_dim, cfg.network_alpha)
            key = index.kohya_name(target)
            if not _resolves_to(key, full, target.sub, index):
                self.skipped.append(f"{full}{'.' + target.sub if target.sub else ''}: kohya name {key} would not load back onto it")
                continue
            self.loras[key] = kind.trainable(layer, dim, alpha, cfg.network_dropout, **options)
            self.parts[key] = target.part
            self._targets[key] = (org, target.sub)
            parent = index.parent_mha.get(full)
            if target.sub or parent:
                mha = org if target.sub else index.by_name[parent]
                self._mha.setdefault(mha, {})
                if target.sub:
                    self._mha[mha][target.sub] = self.loras[key]
        if not self.loras:
            raise LoraError(None, "the model has no layers to train", "check network_train_unet_only / _text_encoder_only")

    def attach(self) -> None:
        """Hook every module onto its layer (idempotent)."""
        if self._handles:
            return
        for key, lora in self.loras.items():
            org, sub = self._targets[key]
            if not sub:
                self._handles.append(org.register_forward_hook(_hook(lora)))
        for mha, loras in self._mha.items():
            self._handles.append(ForwardSwap(mha, functools.partial(mha_forward, mha, _mha_extra(loras))))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def param_groups(self, te_lr: float, unet_lr: float) -> list[dict]:
        """Text encoder first, then UNet (kohya's order), each with its own learning rate."""
        groups = []
        for part, lr in (("te", te_lr), ("unet", unet_lr)):
            params = [p for k, m in self.loras.items() if (self.parts[k] == "unet") == (part == "unet")
                      for p in m.parameters()]
            if params:
                groups.append({"params": params, "lr": lr, "name": part})
        return groups

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for key, lora in self.loras.items():
            for name, t in lora.state_dict().items():
                out[f"{key}.{name}"] = t.detach().to("cpu", dtype or t.dtype).contiguous().clone()
        return out

    def load_kohya_state_dict(self, sd: dict[str, torch.Tensor], source: str, strict: bool = True) -> int:
        """Copy matching tensors in; with ``strict`` every tensor must exist on both sides with equal shapes."""
        mine = {f"{k}.{n}": t for k, m in self.loras.items() for n, t in m.state_dict().items()}
        problems = [f"{k}: shape {tuple(sd[k].shape)} but the network has {tuple(t.shape)}"
                    for k, t in mine.items() if k in sd and sd[k].shape != t.shape]
        if strict:
            problems += [f"{k}: missing" for k in mine if k not in sd]
            problems += [f"{k}: not in this network" for k in sd if k not in mine]
        if problems:
            raise LoraError(source, f"network weights do not fit ({len(problems)} problems, e.g. {problems[0]})",
                            "use the same network_algo, network_dim, conv_dim and trained parts")
        with torch.no_grad():
            for k, t in mine.items():
                if k in sd:
                    t.copy_(sd[k])
        return sum(k in sd for k in mine)


def _hook(lora: TrainableAdapter):
    dtype = next(iter(lora.parameters())).dtype

    def hook(_module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return lora.add_to(out, args[0].to(dtype))

    return hook


def _mha_extra(loras: dict[str, TrainableAdapter]):
    """q/k/v outputs for ``mha_forward``; out_proj is an ordinary hooked Linear there, called as a module."""
    dtypes = {sub: next(iter(lora.parameters())).dtype for sub, lora in loras.items()}

    def extra(sub: str, x: torch.Tensor) -> torch.Tensor | None:
        lora = loras.get(sub)
        if lora is None:
            return None
        return lora(x.to(dtypes[sub])).to(x.dtype)

    return extra


def _resolves_to(key: str, full: str, sub: str | None, index: ModelIndex) -> bool:
    split = split_key(key + ".alpha")
    if split is None:
        return False
    hit = index.resolve(target_for(split[0], split[1], index.family))
    return hit is not None and hit[0] == full and hit[2] == sub
