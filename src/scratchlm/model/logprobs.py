"""Log-probabilities of given tokens: the one home of the next-token loss and of sequence
log-probs, shared by pretraining and SFT (summed cross-entropy), DPO and PPO (sequence
log-probs of responses) and evaluation (log-likelihood of choices).

Targets of -100 are positions that do not count (padding, a prompt that is not trained on).
Everything is computed in fp32 whatever the compute dtype: a log-softmax over a large
vocabulary in bf16 loses the small differences these losses are made of.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position: logits (B, T, vocab), targets (B, T) -> (B, T), with 0
    where the target is IGNORE."""
    mask = targets != IGNORE
    nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                          targets.masked_fill(~mask, 0).reshape(-1), reduction="none")
    return -nll.view(targets.shape) * mask


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token cross-entropy, number of positions it covers): the loss of a batch
    as the training loop wants it, normalised later by the count over the whole global batch."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, (targets != IGNORE).sum()


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sum"
                      ) -> torch.Tensor:
    """One log-probability per sequence (B,): the sum of its counted tokens' log-probs, or
    their mean ("mean": length-normalised, as the DPO chapter of the book and IPO use)."""
    lp = token_logprobs(logits, targets)
    if reduction == "sum":
        return lp.sum(-1)
    if reduction == "mean":
        return lp.sum(-1) / (targets != IGNORE).sum(-1).clamp(min=1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
