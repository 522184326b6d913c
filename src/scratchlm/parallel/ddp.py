"""Data parallel (DDP): every process holds the whole model and a slice of the global batch;
gradients are averaged across processes during the backward pass of the last micro-step."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: nn.Module, device: str) -> DistributedDataParallel:
    """Wrap a plain model. Its weights are broadcast from rank 0 here, so every process starts
    from the same ones; `no_sync()` skips the all-reduce on accumulation micro-steps."""
    device_ids = [int(device.split(":")[1])] if device.startswith("cuda:") else None
    return DistributedDataParallel(model, device_ids=device_ids)
