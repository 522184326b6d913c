"""ZeRO-2 and ZeRO-3 through FSDP2 (`fully_shard`): parameters, gradients and optimizer state
are sharded over the data-parallel ranks, so each holds about 1/N of them.

Each transformer block is its own unit (its parameters are all-gathered just before it runs),
then the root takes the rest (embeddings, final norm, head, a stage's extra heads). ZeRO-3
frees a block's gathered parameters after its forward pass and gathers them again for the
backward pass; ZeRO-2 keeps them between the two (more memory, less communication) while
gradients and optimizer state stay sharded.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from scratchlm.model.gpt import GPT


def apply_fsdp(module: nn.Module, model: GPT, mesh: DeviceMesh, zero: int,
               compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard in place over the data-parallel `mesh`: each of `model`'s blocks, then `module`
    (the model, or a TrainModule around it with a stage's extra heads) as the root. The model
    may already be tensor-parallel: FSDP then shards the DTensor parameters a second time, a
    2-D layout. `compute_dtype` (bf16 / fp16) makes blocks compute in that dtype from fp32
    sharded weights, with gradients reduced in fp32."""
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) \
        if compute_dtype is not None else MixedPrecisionPolicy()
    reshard = zero >= 3
    for block in model.blocks.values():
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    return module
