"""Dropout (Srivastava et al. 2014) with masks drawn fast on a CPU.

PyTorch draws a CPU dropout mask with `bernoulli_`, about 8 ns an element on two threads here;
at the baby-GPT shape (dropout 0.2, 19 masks a step, six of them on the T x T attention
weights) that is about a seventh of a training step. Here a mask is 15-bit random integers
compared with a threshold, four of them cut from each 64-bit draw: forward and backward
together cost about a third of F.dropout's (`bench/bench_pretrain.py --sections side`). The
rate is rounded to a multiple of 2^-15 (0.2 -> 0.200012) and the kept values are scaled by the
exact inverse of the kept fraction, so every activation keeps its expectation, as with
F.dropout. The mask is saved as booleans for backward, as PyTorch's own dropout saves it.

Elsewhere F.dropout runs unchanged: on a GPU (its fused Philox kernel is already fast), on
DTensors (tensor parallelism's random streams) and under torch.compile (which generates its own
masks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 1 << 15  # each mask draw is uniform on [0, 2^15)


def fast_path(x: torch.Tensor) -> bool:
    """Whether x's dropout draws its mask here rather than through F.dropout."""
    return not torch.compiler.is_compiling() and x.device.type == "cpu" \
        and type(x) is torch.Tensor


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(booleans of `shape`, True where kept; the scale of the kept values) for rate p."""
    threshold = min(round(p * LEVELS), LEVELS - 1)
    n = shape.numel()
    # random_() on int64 is uniform on [0, 2^63): each of its four 16-bit lanes, its sign bit
    # cleared, is uniform on [0, 2^15) and independent of the others.
    draws = torch.empty(-(-n // 4), dtype=torch.int64, device=device).random_()
    lanes = draws.view(torch.int16)[:n].bitwise_and_(LEVELS - 1)  # (n,)
    return (lanes >= threshold).view(shape), LEVELS / (LEVELS - threshold)


class MaskedScale(torch.autograd.Function):
    """x * keep * scale, with only the boolean mask saved for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training), with the mask drawn as above where `fast_path` allows."""
    if not training or p == 0.0:
        return x
    if not fast_path(x):
        return F.dropout(x, p, training)
    keep, scale = keep_mask(x.shape, p, x.device)
    return MaskedScale.apply(x, keep, scale)


class Dropout(nn.Dropout):
    """nn.Dropout (same rate attribute, same state) through `dropout` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
