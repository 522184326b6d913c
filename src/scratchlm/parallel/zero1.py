"""ZeRO stage 1 (Rajbhandari et al. 2020): the optimizer state sharded over data-parallel ranks.

Gradients are averaged over all ranks as under DDP, so every rank holds whole weights and whole
gradients; but each parameter belongs to one rank, which alone keeps its AdamW moments and
updates it, then broadcasts the new values to the others. AdamW state is two fp32 tensors per
weight (8 bytes per parameter against 4 of the weight), so this is the cheapest large saving.
Parameters are whole tensors assigned greedily, largest first, to the least-loaded rank, so
each rank's share is about 1/N when no single tensor dominates.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from scratchlm.parallel import gather_to_first


def partition(sizes: list[int], world: int) -> list[int]:
    """The owner rank of each of `sizes` (elements per tensor), balancing elements per rank."""
    load, owner = [0] * world, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        rank = min(range(world), key=load.__getitem__)
        owner[i], load[rank] = rank, load[rank] + sizes[i]
    return owner


class ZeroOneOptimizer(torch.optim.Optimizer):
    """Wraps a freshly built optimizer: its param groups (all parameters) stay visible, for the
    learning rate, gradient clipping and the fp16 scaler; a second optimizer of the same class
    and settings steps this rank's parameters only."""

    def __init__(self, full: torch.optim.Optimizer, group: dist.ProcessGroup | None = None):
        super().__init__(full.param_groups, full.defaults)
        self.group = group
        self.rank, world = dist.get_rank(group), dist.get_world_size(group)
        params = [p for g in self.param_groups for p in g["params"]]
        owners = partition([p.numel() for p in params], world)
        self.owner = {id(p): r for p, r in zip(params, owners)}
        self.by_rank = [[p for p, r in zip(params, owners) if r == rank] for rank in range(world)]
        local_groups = [{**{k: v for k, v in g.items() if k != "params"},
                         "params": [p for p in g["params"] if self.owner[id(p)] == self.rank]}
                        for g in self.param_groups]
        # The same class and settings (defaults can hold more keys than __init__ takes).
        accepted = inspect.signature(type(full).__init__).parameters
        self.local = type(full)(local_groups,
                                **{k: v for k, v in full.defaults.items() if k in accepted})

    @torch.no_grad()
    def step(self, closure=None):
        for full, local in zip(self.param_groups, self.local.param_groups):
            local.update({k: v for k, v in full.items() if k != "params"})  # lr of this step
        self.local.step()
        # Each rank sends its updated parameters to the others: one flat broadcast per owner.
        for rank, params in enumerate(self.by_rank):
            if not params:
                continue
            flat = _flatten_dense_tensors([p.data for p in params])
            dist.broadcast(flat, src=dist.get_global_rank(self.group or dist.group.WORLD, rank),
                           group=self.group)
            for p, value in zip(params, _unflatten_dense_tensors(flat, params)):
                p.copy_(value)

    # --------------------------------------------------------------------------------------------
    # checkpoints: name-keyed, in the same form as torch.distributed.checkpoint's full state dict

    def gather_state_dict(self, model: nn.Module) -> dict:
        """The whole optimizer state, keyed by parameter name, on rank 0 of the group ({} on
        the others). A collective: every rank must call it."""
        names = {id(p): n for n, p in model.named_parameters()}
        mine = {names[id(p)]: {k: v.detach().cpu() for k, v in s.items()}
                for p, s in self.local.state.items()}
        parts = gather_to_first(mine, self.group)
        if self.rank != 0:
            return {}
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [names[id(p)] for p in g["params"]]} for g in self.param_groups]
        return {"state": {k: v for part in parts for k, v in part.items()},
                "param_groups": groups}

    def load_full_state_dict(self, model: nn.Module, state: dict) -> None:
        """Take this rank's share of a whole, name-keyed optimizer state."""
        names = {id(p): n for n, p in model.named_parameters()}
        local_sd = {"state": {}, "param_groups": []}
        index = 0
        for saved, group in zip(state["param_groups"], self.local.param_groups):
            ids = []
            for p in group["params"]:
                if names[id(p)] in state["state"]:
                    local_sd["state"][index] = state["state"][names[id(p)]]
                ids.append(index)
                index += 1
            local_sd["param_groups"].append(
                {**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
        self.local.load_state_dict(local_sd)
