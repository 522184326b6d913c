"""AdamW with weight decay on the weight matrices only.

Decay pulls parameters toward zero. That regularises the matmul weights, but a norm's gain and
any bias set the scale and offset of activations, where pulling toward zero only distorts
them; and an embedding row is only updated when its token occurs, so decay would shrink rare
tokens' rows every step while their gradient rarely pushes back. So: decay on every weight
with 2 or more dimensions except the token and position embeddings (and the head when it is
tied to the token embedding); none on norms, biases and embeddings.

`recipe_groups` then applies the loop's optimizer options to a stage's groups: with
train.optimizer=muon the blocks' weight matrices move to Muon groups (train/muon.py), and
train.embedding_lr / head_lr give the embeddings and an untied head learning rates of their
own, and train.layer_decay lowers them block by block toward the input. Each group's
"lr_scale" (its peak lr over train.lr) keeps it on the shared schedule.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from scratchlm.errors import ScratchError
from scratchlm.model.gpt import tied_weights


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay and no-decay groups over the parameters that train. `module` is a GPT or a
    TrainModule around one (names "model.*")."""
    gpt = getattr(module, "model", module)
    # By name, so that a pipeline stage holding the tied head but not the embedding treats it
    # as the embedding it is; LoRA's trained rows of added tokens are embedding rows too.
    embeddings = {"tok_emb.weight", "pos_emb.weight", "token_rows.emb", *tied_weights(gpt)}
    decay, no_decay = [], []
    for name, p in module.named_parameters():  # a tied head is the embedding, listed once
        if not p.requires_grad:
            continue
        short = name.removeprefix("model.")
        (decay if p.dim() >= 2 and short not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def recipe_groups(groups: list[dict], module: torch.nn.Module, train) -> list[dict]:
    """A stage's groups (see `param_groups`) split by the optimizer options of `train` (a
    TrainConfig): Muon groups ("use_muon": True) for the 2-D weights inside the blocks when
    train.optimizer is muon; the embeddings and an untied head in groups of their own when
    train.embedding_lr / head_lr are set; and one group per depth when train.layer_decay < 1.
    Unchanged when none of these is set."""
    gpt = getattr(module, "model", module)
    muon = train.optimizer == "muon"
    if train.head_lr and tied_weights(gpt):
        raise ScratchError("train.head_lr: the head is tied to the token embedding "
                           "(model.tie_embeddings), so it trains at train.embedding_lr; "
                           "untie it (--model.tie_embeddings=false) or leave head_lr at 0")
    if not (muon or train.embedding_lr or train.head_lr or train.layer_decay < 1):
        return groups
    prefix = "model." if gpt is not module else ""
    embeddings = {prefix + n for n in ("tok_emb.weight", "pos_emb.weight", "token_rows.emb",
                                       *tied_weights(gpt))}
    head = f"{prefix}lm_head.weight"
    n_layer = gpt.config.n_layer
    names = {id(p): n for n, p in module.named_parameters()}

    def kind(name: str, p: torch.nn.Parameter) -> str:
        if name in embeddings:
            return "embedding"
        if name == head:
            return "head"
        if muon and p.dim() == 2 and name.startswith(f"{prefix}blocks."):
            return "muon"
        return "adamw"

    def depth(name: str) -> int:
        """Layers between the parameter and the output: the embeddings n_layer + 1, block i
        n_layer - i (its index in the whole model, also in a pipeline stage), the rest 0."""
        if name in embeddings:
            return n_layer + 1
        if name.startswith(f"{prefix}blocks."):
            return n_layer - int(name.removeprefix(f"{prefix}blocks.").split(".")[0])
        return 0

    # Peak lr of each kind over train.lr: the schedule multiplies it in.
    scales = {"muon": train.muon_lr / train.lr, "adamw": 1.0,
              "embedding": (train.embedding_lr or train.lr) / train.lr,
              "head": (train.head_lr or train.lr) / train.lr}
    decay = train.layer_decay < 1
    out = []
    for group in groups:
        for k in ("muon", "adamw", "embedding", "head"):
            by_depth: dict[int, list] = {}  # in the parameters' order: the same groups each run
            for p in group["params"]:
                name = names[id(p)]
                if kind(name, p) == k:
                    by_depth.setdefault(depth(name) if decay else 0, []).append(p)
            for d, params in by_depth.items():
                out.append({**group, "params": params, "use_muon": k == "muon",
                            "lr_scale": group.get("lr_scale", 1.0) * scales[k]
                            * train.layer_decay ** d})
    return out


def build_optimizer(groups: list[dict], lr: float, betas: tuple[float, float],
                    eps: float = 1e-8, momentum: float = 0.95) -> torch.optim.Optimizer:
    """AdamW over parameter groups (see `param_groups`), or MuonAdamW when a group is marked
    "use_muon" (see `recipe_groups`; `momentum` is Muon's); empty groups are dropped."""
    from scratchlm.train.muon import MuonAdamW

    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ScratchError("no parameter trains (every one is frozen); check what the stage "
                           "is told to train")
    # The fused kernel is the fastest AdamW on a GPU (one launch for all parameters) and on a
    # CPU too: on this 2-core machine (1 thread) about 4.6x faster than foreach at nanoGPT's
    # CPU shape (3.2 vs 14.5 ms a step, 0.8M parameters). Its steps equal foreach's to float
    # rounding (a tiny SFT run: the same losses to 1e-5 for 8 steps, then the usual chaotic
    # drift). On a CPU, DTensor shards (FSDP, tensor parallelism) keep foreach.
    params = [p for g in groups for p in g["params"]]
    device = params[0].device.type
    fused = device == "cuda" or device == "cpu" and not any(
        isinstance(p, DTensor) for p in params)
    if any(g.get("use_muon") for g in groups):
        return MuonAdamW(groups, lr=lr, betas=betas, eps=eps, momentum=momentum,
                         fused=fused or None, foreach=None if fused else True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None,
                             foreach=None if fused else True)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float,
                   group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Scale gradients so that their global L2 norm is at most `max_norm`; returns the norm
    before clipping. Works on plain and DTensor (tensor-parallel, FSDP) gradients alike, each
    mesh's norm computed across its shards; `group` sums the squares over pipeline stages,
    which hold different parameters."""
    by_mesh: dict = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    square = torch.zeros((), dtype=torch.float32, device=params[0].device if params else "cpu")
    for grads in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(grads)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        square = square + norm.float() ** 2
    if group is not None:
        dist.all_reduce(square, group=group)
    total = square.sqrt()
    coef = min(max_norm / (total.item() + 1e-6), 1.0)
    if coef < 1.0:
        for grads in by_mesh.values():
            torch._foreach_mul_(grads, coef)
    return total
