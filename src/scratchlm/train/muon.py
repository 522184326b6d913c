"""Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"), with AdamW beside it.

Muon keeps a momentum of each weight matrix's gradient and steps along that momentum
*orthogonalised*: for M = U S V^T it moves by U V^T, every singular direction at the same
rate, so the few directions that dominate a raw gradient no longer drown out the rest.
U V^T is approximated without an SVD by a quintic Newton–Schulz iteration, five matmul
rounds (`newton_schulz`). It suits the matrices inside the blocks; embeddings, the head and
the 1-D gains and biases are not such maps and keep AdamW (modded-nanogpt, nanochat, Moonlight).

`MuonAdamW` is one optimizer over both kinds of group (a group with "use_muon": True steps
with Muon), so the training loop, GradScaler, ZeRO-1 and checkpoints (state by parameter
name: Muon's "momentum_buffer", AdamW's "step", "exp_avg", "exp_avg_sq") see one object.
Its AdamW groups run torch's own AdamW kernel (`torch.optim.adam.adam` with decoupled decay).

Sharded weights (DTensor: FSDP's ZeRO-2/3 shards, tensor-parallel splits) are orthogonalised
whole: the momentum stays sharded, each step gathers the update (one all-gather per matrix),
every rank computes the same U V^T and keeps its own shard of it.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate
from torch.optim.adam import adam

from scratchlm.errors import ScratchError

# Coefficients of the quintic p(s) = a s + b s^3 + c s^5 that each Newton–Schulz round applies
# to every singular value (Jordan et al.): chosen for the steepest rise at 0, so that five
# rounds bring singular values from (0, 1] into about [0.7, 1.2] instead of converging exactly.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximation of U V^T for g = U S V^T, (rows, cols) -> (rows, cols).

    Divided by its Frobenius norm, g's singular values lie in [0, 1]; each round
    X <- a X + (b A + c A^2) X with A = X X^T maps every singular value s to p(s) and keeps U
    and V. Computed in fp32 on the CPU (bf16 matmuls are slow there) and in bf16 on a GPU."""
    dtype = torch.bfloat16 if g.is_cuda else torch.float32
    x = g.to(dtype)
    wide = x.size(0) <= x.size(1)
    if not wide:  # iterate on the wide form, so that the Gram matrix X X^T is the smaller one
        x = x.mT
    x = x / (x.norm() + eps)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT  # (r, r), r = min(rows, cols)
        # The scalings ride in the matmuls (addmm's beta and alpha): no elementwise passes.
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.addmm(x, poly, x, beta=a)  # a X + (b A + c A^2) X
    return (x if wide else x.mT).to(g.dtype)


def orthogonalise(update: torch.Tensor, steps: int) -> torch.Tensor:
    """`newton_schulz` of a plain or sharded (DTensor) matrix, in the same layout."""
    if not isinstance(update, DTensor):
        return newton_schulz(update, steps)
    whole = newton_schulz(update.full_tensor(), steps)  # the same on every rank
    mesh = update.device_mesh
    # Replicated -> the parameter's placements is a local slice on each rank: no traffic.
    return DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False
                              ).redistribute(mesh, update.placements)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the groups with "use_muon": True (2-D parameters only), AdamW for the others.

    Muon step for a matrix W (rows, cols) with gradient G:
        M <- momentum * M + (1 - momentum) * G                  (an average of gradients)
        O <- newton_schulz(G + momentum * (M - G))              (Nesterov: a look-ahead)
        W <- W * (1 - lr * weight_decay) - lr * sqrt(max(1, rows / cols)) * O
    O has RMS about 1/sqrt(max(rows, cols)); the factor gives tall matrices (an MLP's first
    layer, whose rows outnumber its columns) the same per-element step as square ones."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, use_muon: bool = False,
                 foreach: bool | None = None, fused: bool | None = None) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        use_muon=use_muon, foreach=foreach, fused=fused)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ScratchError("Muon orthogonalises weight matrices; a group marked "
                                   "use_muon holds a parameter that is not 2-D")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - beta)
            update = p.grad.lerp(buf, beta) if group["nesterov"] else buf
            o = orthogonalise(update, group["ns_steps"])
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(o, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)

    def _adamw_step(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        fused = bool(group["fused"])
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:  # as torch.optim.AdamW lays its state out
                state["step"] = torch.zeros((), dtype=torch.float32,
                                            device=p.device if fused else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=group["foreach"],
             fused=group["fused"], decoupled_weight_decay=True, amsgrad=False, beta1=beta1,
             beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
             eps=group["eps"], maximize=False)
