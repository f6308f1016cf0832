"""Every device and dtype decision of the engine, in one place.

- A merge is summed in fp32 on the weight's own device, one layer at a time, and written back in the
  weight's dtype (fp32, fp16, bf16, or the WebUI's fp8 storage).
- The backup of a merged weight lives in CPU memory when the weight is on another device (pinned memory
  for CUDA, so the copy back is asynchronous): a merged network then costs no device memory beyond one
  layer's work buffer while it is applied. ``keep_on_device`` keeps backups beside the weights instead.
- Factors and inputs are multiplied in the input's dtype, except half precision on the CPU, which the
  WebUI's torch 2.1 cannot multiply, and fp8, which nothing multiplies directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

WORK_DTYPE = torch.float32
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
HALF_DTYPES = (torch.float16, torch.bfloat16)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype to multiply in, for inputs of ``dtype`` on ``device``."""
    if is_fp8(dtype) or (device.type == "cpu" and dtype in HALF_DTYPES):
        return WORK_DTYPE
    return dtype


def work_copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A private fp32 copy of ``t`` on ``device``: the buffer a layer's merge is summed in."""
    return t.to(device=device, dtype=WORK_DTYPE, copy=True)


@dataclass(frozen=True)
class BackupPlace:
    """Where backups of merged weights are kept.

    ``device=None`` decides per weight: CPU memory for weights on any other device (pinned where the device
    is CUDA), beside the weight when it is already on the CPU. An explicit ``device`` overrides that (tests on
    CPU-only machines inject one to account backups apart from the weights); ``keep_on_device`` keeps every
    backup beside its weight.
    """

    device: torch.device | None = None
    keep_on_device: bool = False

    def target(self, weight: torch.Tensor) -> torch.device:
        if self.keep_on_device:
            return weight.device
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cpu")

    def backup(self, t: torch.Tensor) -> torch.Tensor:
        """A bit-exact copy of ``t`` for the backup (same dtype)."""
        target = self.target(t)
        if target.type == "cpu" and t.device.type == "cuda":
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return out.copy_(t.detach(), non_blocking=True)
        return t.detach().to(target, copy=True)


def restore_into(param: torch.Tensor, backup: torch.Tensor) -> None:
    """Put a backup's bits back into ``param`` (asynchronously from pinned CPU memory)."""
    param.detach().copy_(backup, non_blocking=backup.is_pinned())
