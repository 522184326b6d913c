"""torch.distributed set-up and the one place that does rank-0 work.

Launched by `torchrun`, every process reads its rank and the world size from the environment;
launched plainly, a run is one process and nothing here does anything. Parallel layouts are
applied to a plain model from outside (the model knows nothing of them).
"""

from __future__ import annotations

import builtins
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scratchlm.errors import ScratchError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str, dp: int) -> DistInfo:
    """Join the process group torchrun set up (gloo on the CPU, NCCL on GPUs), checking that
    the requested layout fits the number of processes before any work starts."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dp != world:
        raise ScratchError(f"parallel.dp is {dp} but {world} process(es) were launched; launch "
                           f"with `torchrun --nproc_per_node={dp} -m scratchlm ...` or set "
                           f"--parallel.dp={world}")
    if world == 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]))
    if device.startswith("cuda"):
        torch.cuda.set_device(info.local_rank)
    return info


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print, on rank 0 only."""
    if is_main():
        builtins.print(*args, **kwargs)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all ranks (itself when single-process)."""
    if not dist.is_initialized():
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()
