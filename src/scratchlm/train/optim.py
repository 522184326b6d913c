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

from scratchlm.model.gpt import GPT


def param_groups(model: GPT, weight_decay: float) -> list[dict]:
    embeddings = {id(model.tok_emb.weight)}
    if model.pos_emb is not None:
        embeddings.add(id(model.pos_emb.weight))
    decay, no_decay = [], []
    for p in model.parameters():  # a tied head is the embedding, listed once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: GPT, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float = 1e-8) -> torch.optim.AdamW:
    # The fused kernel is one launch for all parameters on a GPU; foreach elsewhere.
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             fused=fused or None, foreach=None if fused else True)
