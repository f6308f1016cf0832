"""Data-parallel training across processes started by ``torchrun`` or ``accelerate launch``.

Both launchers set ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the rendezvous address; the trainer then
splits every optimizer step's micro-batches between the processes and sums their gradients, so N processes
with gradient accumulation A train exactly like one process with accumulation N·A (the same batches, noise
and timesteps). Only the first process writes files and reports progress.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    """This process's place in the run; ``world == 1`` is a plain single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        """Join the process group the launcher describes in the environment (nothing to do for one process).
        CUDA processes use NCCL on the GPU of their local rank (so a model factory can use ``"cuda"``),
        CPU processes Gloo."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank)

    def my_share(self, indices: list[int]) -> list[int]:
        """Micro-batch k of a step goes to process k mod N."""
        return indices[self.rank::self.world]

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Every process's gradients summed into each of them, in one collective call."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (cancel requests)."""
        return self.sum(1.0 if flag else 0.0) > 0 if self.world > 1 else flag

    def broadcast_int(self, value: int) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._device())
        dist.broadcast(t, 0)
        return int(t.item())

    def broadcast_params(self, params: list[torch.nn.Parameter]) -> None:
        """The first process's initial weights everywhere."""
        if self.world == 1:
            return
        with torch.no_grad():
            for p in params:
                buf = p.data.to(self._device())
                dist.broadcast(buf, 0)
                p.data.copy_(buf)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
