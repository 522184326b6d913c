"""Data parallel (DDP): every process holds the whole model and a slice of the global batch;
gradients are averaged across processes during the backward pass of the last micro-step."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: nn.Module, device: str,
              group: dist.ProcessGroup | None = None) -> DistributedDataParallel:
    """Wrap a plain model. Its weights are broadcast from rank 0 here, so every process starts
    from the same ones; `no_sync()` skips the all-reduce on accumulation micro-steps."""
    device_ids = [int(device.split(":")[1])] if device.startswith("cuda:") else None
    return DistributedDataParallel(model, device_ids=device_ids, process_group=group)


def average_gradients(params: list[nn.Parameter], group: dist.ProcessGroup,
                      bucket_elements: int = 2**24) -> None:
    """Average gradients over a data-parallel group by hand, in flat buckets: what DDP does
    during the backward pass, done after it. Used where DDP's wrapper does not fit (tensor-
    parallel DTensor parameters, pipeline stages); the local shard of a DTensor gradient is
    what its rank holds, and what the same shard on the other groups must be averaged with."""
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
             for p in params if p.grad is not None]
    size = dist.get_world_size(group)
    bucket: list[torch.Tensor] = []
    for i, g in enumerate(grads):
        bucket.append(g)
        if sum(t.numel() for t in bucket) >= bucket_elements or i == len(grads) - 1:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=group)
            flat /= size
            for t, avg in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                t.copy_(avg)
            bucket = []
