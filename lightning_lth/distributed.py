"""The one place that knows about DDP ranks: who writes, and the collectives the study uses.

Lightning starts the process group at the first ``fit`` (ranks > 0 are started then and run
the same command), so every question is answered live: before the group exists the rank
comes from the launcher's environment.
"""

from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist

from lightning_lth.errors import LTHError

_LAUNCHER_RANKS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


class DistContext:
    @property
    def active(self) -> bool:
        """True inside a process group of more than one rank."""
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    @property
    def rank(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
        return 0 if all(int(os.environ.get(name, 0)) == 0 for name in _LAUNCHER_RANKS) else 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes every file; the other ranks compute alongside it."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return value
        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def collective_device(self, device: torch.device) -> torch.device:
        """Where a collective's tensors must live: NCCL needs CUDA tensors."""
        if dist.get_backend() == "nccl" and device.type != "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def sum_(self, tensor: torch.Tensor) -> None:
        """In place: the sum of ``tensor`` over the ranks."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def broadcast_tensors(self, tensors: dict[str, torch.Tensor],
                          device: torch.device) -> dict[str, torch.Tensor]:
        """Rank 0's tensors (same names, same shapes on every rank), back on the CPU."""
        if not self.active:
            return tensors
        out = {}
        for name in sorted(tensors):  # the same order on every rank
            tensor = tensors[name].to(self.collective_device(device))
            dist.broadcast(tensor, src=0)
            out[name] = tensor.cpu()
        return {name: out[name] for name in tensors}

    def ranks_agree(self, what: str, tensors: dict[str, torch.Tensor]) -> None:
        """Every rank must hold the same tensors (masks, pi), else stop loudly."""
        if not self.active:
            return
        digest = hashlib.sha256()
        for name in sorted(tensors):
            digest.update(name.encode())
            digest.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest.hexdigest())
        if len(set(digests)) != 1:
            raise LTHError(f"DDP ranks disagree on {what}: {digests}")
        self.say(f"ranks agree on {what} ({len(digests)} ranks)")

    def say(self, message: str) -> None:
        if self.is_writer:
            print(message, flush=True)
