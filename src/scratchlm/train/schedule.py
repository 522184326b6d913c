"""Learning rate: linear warmup, then cosine decay to a floor (Loshchilov & Hutter 2017)."""

from __future__ import annotations

import math


def lr_at(step: int, max_lr: float, warmup_steps: int, total_steps: int,
          min_lr_ratio: float = 0.1) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    if step < warmup_steps:  # from max_lr / warmup up to max_lr, never 0 (a wasted step)
        return max_lr * (step + 1) / warmup_steps
    min_lr = max_lr * min_lr_ratio
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
