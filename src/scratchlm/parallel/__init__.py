"""torch.distributed set-up and the one place that does rank-0 work.

Launched by `torchrun`, every process reads its rank and the world size from the environment;
launched plainly, a run is one process and nothing here does anything. Parallel layouts are
applied to a plain model from outside by `parallelize` (scratchlm.parallel.runtime; the model
knows nothing of them).
"""

from __future__ import annotations

import builtins
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from scratchlm.errors import ScratchError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job. Ranks form a (pp, dp, tp) grid, tensor parallelism
    innermost so that its frequent collectives stay between neighbouring ranks (one node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mesh: DeviceMesh | None = None
    dp: int = 1
    tp: int = 1
    pp: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def coord(self, dim: str) -> int:
        """This rank's index along a mesh dimension ("pp", "dp" or "tp")."""
        return self.mesh.get_local_rank(dim) if self.mesh is not None else 0

    def group(self, dim: str) -> dist.ProcessGroup | None:
        return self.mesh.get_group(dim) if self.mesh is not None else None


def check_layout(parallel, model, world: int) -> None:
    """Refuse a layout that cannot work, before any work starts (`parallel` a ParallelConfig,
    `model` a ModelConfig)."""
    p = parallel  # its own ranges were checked when the config was built
    if p.dp * p.tp * p.pp != world:
        raise ScratchError(
            f"parallel.dp x tp x pp = {p.dp} x {p.tp} x {p.pp} = {p.dp * p.tp * p.pp} but "
            f"{world} process(es) were launched; launch with `torchrun --nproc_per_node="
            f"{p.dp * p.tp * p.pp} -m scratchlm ...` or change the layout")
    if p.tp > 1:
        for what, n in [("model.n_head", model.n_head), ("model.n_kv_head", model.n_kv_head),
                        ("model.intermediate_size", model.intermediate_size)]:
            if n % p.tp:
                raise ScratchError(f"{what} ({n}) is not divisible by parallel.tp ({p.tp}); "
                                   "each tensor-parallel rank takes an equal share")
        if p.sequence_parallel and model.block_size % p.tp:
            raise ScratchError(f"model.block_size ({model.block_size}) is not divisible by "
                               f"parallel.tp ({p.tp}), as sequence parallelism needs; change "
                               "one or set --parallel.sequence_parallel=false")
    if p.pp > 1 and model.n_layer % p.pp:
        raise ScratchError(f"model.n_layer ({model.n_layer}) is not divisible by parallel.pp "
                           f"({p.pp}); each pipeline stage takes an equal share of the blocks")
    if p.zero == 1 and (p.tp > 1 or p.pp > 1):
        raise ScratchError("parallel.zero=1 works with data parallelism alone; with tp or pp "
                           "use zero 0, 2 or 3")
    if p.zero >= 2 and p.pp > 1:
        raise ScratchError("parallel.zero 2/3 (FSDP) is not combined with pipeline stages yet; "
                           "use --parallel.zero=0 with parallel.pp")


def init_distributed(device: str, parallel, model) -> DistInfo:
    """Check the layout against the number of processes torchrun launched, join the process
    group (gloo on the CPU, NCCL on GPUs) and build the (pp, dp, tp) device mesh."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(parallel, model, world)
    if world == 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    mesh = init_device_mesh(device.split(":")[0], (parallel.pp, parallel.dp, parallel.tp),
                            mesh_dim_names=("pp", "dp", "tp"))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, mesh,
                    parallel.dp, parallel.tp, parallel.pp)


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


def gather_to_first(obj, group: dist.ProcessGroup | None = None) -> list:
    """Every rank's picklable `obj`, in rank order, on the group's first rank ([] on the
    others). A collective: every rank of the group must call it."""
    group = group or dist.group.WORLD
    first = dist.get_global_rank(group, 0)
    parts = [None] * dist.get_world_size(group) if dist.get_rank() == first else None
    dist.gather_object(obj, parts, dst=first, group=group)
    return parts or []


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all ranks (itself when single-process)."""
    if not dist.is_initialized():
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()
