"""AdamW with weight decay on the weight matrices only.

Decay pulls parameters toward zero. That regularises the matmul weights, but a norm's gain and
any bias set the scale and offset of activations, where pulling toward zero only distorts
them; and an embedding row is only updated when its token occurs, so decay would shrink rare
tokens' rows every step while their gradient rarely pushes back. So: decay on every weight
with 2 or more dimensions except the token and position embeddings (and the head when it is
tied to the token embedding); none on norms, biases and embeddings.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from scratchlm.model.gpt import GPT


def param_groups(model: GPT, weight_decay: float) -> list[dict]:
    # By name, so that a pipeline stage holding the tied head but not the embedding treats it
    # as the embedding it is.
    embeddings = {"tok_emb.weight", "pos_emb.weight"}
    if model.config.tie_embeddings:
        embeddings.add("lm_head.weight")
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # a tied head is the embedding, listed once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and name not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: GPT, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float = 1e-8) -> torch.optim.AdamW:
    # The fused kernel is one launch for all parameters on a GPU; foreach elsewhere.
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             fused=fused or None, foreach=None if fused else True)


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
