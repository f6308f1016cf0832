"""Replacing a module's ``forward`` for a while, and putting back exactly what was there.

The bypass patcher and the trainer replace the forward of ``nn.MultiheadAttention`` (whose projections are
not called as modules, so hooks on them never run), and the trainer wraps blocks for gradient
checkpointing. A module may already carry an instance-level forward (another extension's, the WebUI's
``--lowvram`` wrappers): that one is restored, not the class's.
"""
from __future__ import annotations

from typing import Callable

import torch


class ForwardSwap:
    """``module.forward`` replaced by ``forward`` until ``remove()`` (the interface of torch's hook handles)."""

    def __init__(self, module: torch.nn.Module, forward: Callable):
        self.module = module
        self.previous = module.__dict__.get("forward")
        module.forward = forward

    def remove(self) -> None:
        if self.previous is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self.previous
