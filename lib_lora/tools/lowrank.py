"""Weight deltas → kohya LoRA/LoCon modules by truncated SVD, with kohya's rank rules (a fixed rank, or
``sv_ratio`` / ``sv_fro`` / ``sv_cumulative`` per module, capped at the rank)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..adapters import lora
from ..errors import LoraError
from ..keymap import Target
from ..model_index import ModelIndex
from ..train.metadata import SAVE_DTYPES, base_model_version, write_network
from .checkpoint import require_safetensors

DYNAMIC = ("sv_ratio", "sv_fro", "sv_cumulative")
# progress(done, total) before each module's SVD (where a tool spends its time); it may raise to stop the tool,
# which then has written nothing.
ToolProgress = Callable[[int, int], None]


@dataclass
class RankRule:
    """``rank`` for linear and 1x1 layers, ``conv_rank`` for larger kernels (default: ``rank``); with
    ``dynamic`` each module keeps what that rule asks for, at most its rank."""

    rank: int
    conv_rank: int | None = None
    dynamic: str | None = None
    dynamic_param: float | None = None

    def __post_init__(self) -> None:
        if self.rank < 1 or (self.conv_rank is not None and self.conv_rank < 0):
            raise LoraError(None, "rank must be at least 1 (conv rank 0 leaves 3x3 convs out)", "choose another rank")
        if self.dynamic is not None:
            if self.dynamic not in DYNAMIC:
                raise LoraError(None, f"dynamic method {self.dynamic!r} is unknown", f"use one of {', '.join(DYNAMIC)}")
            p = self.dynamic_param
            if p is None or p <= 0 or (self.dynamic != "sv_ratio" and p > 1):
                raise LoraError(None, f"{self.dynamic} needs a parameter: a ratio > 0 for sv_ratio, a fraction in "
                                "(0, 1] for sv_fro and sv_cumulative", "e.g. --dynamic sv_fro --dynamic-param 0.9")

    def cap(self, big_kernel: bool, size: int) -> int:
        """The most a module may keep: its rank (the conv rank for kernels above 1x1), at most ``size``."""
        return min(self.conv_rank if big_kernel and self.conv_rank is not None else self.rank, size)

    def rank_for(self, s: torch.Tensor, big_kernel: bool) -> int:
        """The rank kept for singular values ``s`` (all of them, descending): kohya resize_lora.py's rules."""
        cap = self.cap(big_kernel, len(s))
        if self.dynamic is None or cap == 0:
            return cap
        p = float(self.dynamic_param)
        if self.dynamic == "sv_ratio":
            keep = int((s >= s[0] / p).sum())
        elif self.dynamic == "sv_cumulative":
            keep = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), torch.tensor(p))) + 1
        else:
            energy = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
            keep = int(torch.searchsorted(energy, torch.tensor(p ** 2))) + 1
        return max(1, min(cap, keep))


@dataclass
class ToolResult:
    """A network as kohya tensors and metadata, and what happened per module."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    ranks: dict[str, int] = field(default_factory=dict)
    kept: dict[str, float] = field(default_factory=dict)  # Frobenius fraction of each delta the file keeps
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.ranks:
            return "no modules"
        ranks, kept = sorted(self.ranks.values()), sorted(self.kept.values())
        return (f"{len(self.ranks)} modules, rank {ranks[0]}..{ranks[-1]}, delta kept (Frobenius) min {kept[0]:.4f} "
                f"mean {sum(kept) / len(kept):.4f}" + (f"; {len(self.skipped)} skipped" if self.skipped else ""))


OVERSAMPLE, POWER_ITERATIONS, RANGE_TOLERANCE = 10, 2, 1e-3


def top_svd(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading r singular triplets. A seeded randomized range finder (Halko et al.) grows until its range
    holds all of ``matrix`` but at most ``RANGE_TOLERANCE`` of its norm, and the SVD of the projection is
    then the SVD of the matrix to that accuracy: every change a LoRA makes has a small rank, so this is
    ~10× faster than a full SVD on SD-sized layers. A matrix that needs more than half its size (a dense
    fine-tune difference) gets the full SVD, as kohya's tools do."""
    k = min(matrix.shape)
    q = r + OVERSAMPLE
    norm = float(matrix.norm())
    g = torch.Generator().manual_seed(0)
    while 2 * q < k:
        basis, _ = torch.linalg.qr(matrix @ torch.randn(matrix.shape[1], q, generator=g))
        for _ in range(POWER_ITERATIONS):
            basis, _ = torch.linalg.qr(matrix.T @ basis)
            basis, _ = torch.linalg.qr(matrix @ basis)
        projected = basis.T @ matrix
        if float((matrix - basis @ projected).norm()) <= RANGE_TOLERANCE * norm:
            ub, s, vh = torch.linalg.svd(projected, full_matrices=False)
            return (basis @ ub)[:, :r], s[:r], vh[:r]
        q *= 2
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :r], s[:r], vh[:r]


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """All singular values, descending, from the eigenvalues of the smaller Gram matrix (what dynamic rank
    rules read; a full SVD would cost 5-10× more)."""
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    return torch.linalg.eigvalsh(gram.double()).clamp(min=0).sqrt().flip(0).float()


def factorize(delta: torch.Tensor, rule: RankRule) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(up, down, kept fraction) with up·down = the best rank-r approximation of ``delta`` (shaped like the
    weight: [out, in] or [out, in, kh, kw]); the singular values are split evenly between the two factors
    so neither is tiny in fp16. None when the rule keeps nothing (conv rank 0)."""
    big_kernel = delta.dim() == 4 and delta.shape[2:] != (1, 1)
    matrix = delta.reshape(delta.shape[0], -1).float()
    if rule.dynamic:
        r = rule.rank_for(singular_values(matrix), big_kernel)
    else:
        r = rule.cap(big_kernel, min(matrix.shape))
    if r == 0:
        return None
    u, s, vh = top_svd(matrix, r)
    root = s.sqrt()
    up, down = u * root, root[:, None] * vh
    total = float(matrix.double().pow(2).sum())
    kept = min(1.0, float(s.double().pow(2).sum()) / total) ** 0.5 if total > 0 else 1.0
    if delta.dim() == 4:
        up = up.reshape(delta.shape[0], r, 1, 1)
        down = down.reshape(r, *delta.shape[1:])
    return up.contiguous(), down.contiguous(), kept


def add_module(result: ToolResult, key: str, delta: torch.Tensor, rule: RankRule, dtype: torch.dtype) -> None:
    """One kohya module (alpha = rank, so scale 1) for ``delta``, or a note when the rule keeps nothing."""
    if delta.dim() not in (2, 4):
        result.skipped.append(f"{key}: a {delta.dim()}-D weight (a norm layer) has no low-rank form")
        return
    made = factorize(delta, rule)
    if made is None:
        result.skipped.append(f"{key}: conv rank 0")
        return
    up, down, kept = made
    r = up.shape[1]
    for name, t in lora.file_tensors(up.to(dtype), down.to(dtype), torch.tensor(float(r), dtype=dtype)).items():
        result.tensors[f"{key}.{name}"] = t
    result.ranks[key] = r
    result.kept[key] = kept


def add_modules(result: ToolResult, deltas: dict[Target, torch.Tensor], index: ModelIndex, rule: RankRule,
                precision: str, progress: ToolProgress | None = None) -> None:
    """``add_module`` for every target's delta, under the model's kohya names."""
    for done, (target, delta) in enumerate(deltas.items()):
        if progress is not None:
            progress(done, len(deltas))
        add_module(result, index.kohya_name(target), delta, rule, SAVE_DTYPES[precision])


def lora_metadata(result: ToolResult, rule: RankRule, base: dict[str, str], family: str | None,
                  comment: str) -> dict[str, str]:
    """kohya's keys for a LoRA/LoCon file, over ``base`` (the source's training metadata, when there is one)."""
    md = {k: v for k, v in base.items() if not k.startswith("sshs_")}
    convs = any(lora.is_locon(result.tensors[f"{k}.{lora.DOWN}"]) for k in result.ranks)
    rank = "Dynamic" if rule.dynamic else str(rule.rank)
    md.update(ss_network_module="networks.lora", ss_network_dim=rank, ss_network_alpha=rank)
    args = {"conv_dim": str(rule.conv_rank or rule.rank), "conv_alpha": str(rule.conv_rank or rule.rank)} if convs else {}
    if args and not rule.dynamic:
        md["ss_network_args"] = json.dumps(args)
    else:
        md.pop("ss_network_args", None)
    if family:
        md.setdefault("ss_base_model_version", base_model_version(family, False))
        md["ss_v2"] = str(family == "sd2")
    md["ss_training_comment"] = (base.get("ss_training_comment", "") + "; " if base.get("ss_training_comment")
                                 and base["ss_training_comment"] != "None" else "") + comment
    return md


def save_network(path: str, result: ToolResult) -> None:
    """The file with kohya's sshs_* hashes, written atomically (to a temp file, then renamed). Its
    ``ss_output_name`` (the alias prompts may use) becomes the file's own name, so a resized copy never
    shares its source's alias."""
    require_safetensors(path)
    if not result.tensors:
        raise LoraError(path, "nothing to write: no module gave a low-rank delta", "check the inputs")
    result.metadata["ss_output_name"] = os.path.splitext(os.path.basename(path))[0]
    write_network(path, result.tensors, result.metadata)
