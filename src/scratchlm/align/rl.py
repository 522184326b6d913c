"""The formulas of PPO and GRPO, on tensors, each testable against its written-out definition.

Per-token tensors are (B, L) with a mask (B, L), True at response tokens; a row's response is
contiguous, its padding anywhere after it. Padding never reaches a result: masked positions
are excluded from means and come out as 0.
"""

from __future__ import annotations

import torch

WHITEN_EPS = 1e-8  # keeps a zero-variance batch finite: it whitens to all zeros


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the masked values (0 for fewer than two)."""
    n = mask.sum()
    centred = (x - masked_mean(x, mask)) * mask
    return (centred ** 2).sum() / (n - 1) if n > 1 else torch.zeros((), dtype=x.dtype,
                                                                    device=x.device)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked values, the mean added back when not `shift_mean`
    (reward whitening rescales rewards without moving them); 0 at masked-out positions."""
    mean = masked_mean(x, mask)
    out = (x - mean) * torch.rsqrt(masked_var(x, mask) + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1"
                 ) -> torch.Tensor:
    """An estimate of KL(π || π_ref) at each sampled token (Schulman, "Approximating KL
    divergence", 2020): k1 = log π - log π_ref (unbiased, can be negative); k3 = (r - 1) -
    log r with r = π_ref / π (unbiased, never negative)."""
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k3":
        log_r = ref_logps - logps
        return torch.exp(log_r) - log_r - 1
    raise ValueError(f"unknown KL estimator {estimator!r}")


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) the position of each row's last response token."""
    positions = torch.arange(mask.size(1), device=mask.device)
    return (positions * mask).argmax(-1)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
                  ) -> torch.Tensor:
    """(B, L) rewards: -kl_coef * KL at every response token, plus the response's score
    (B,) at its last token (Ziegler et al. 2019; Ouyang et al. 2022)."""
    rewards = -kl_coef * kl * mask
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last_index(mask)] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over responses left-aligned in
    (B, L): δ_t = r_t + γ V_{t+1} - V_t, A_t = δ_t + γλ A_{t+1}, with V and A zero past a
    response's end. Returns (advantages, returns = advantages + values), 0 off the mask."""
    values = values * mask
    L = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(L)):
        following = mask[:, t + 1] if t + 1 < L else torch.zeros_like(mask[:, 0])
        next_value = values[:, t + 1] * following if t + 1 < L else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running * following
        advantages[:, t] = running * mask[:, t]
    return advantages, (advantages + values) * mask


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor,
                        advantages: torch.Tensor, cliprange: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (Schulman et al. 2017): max(-A ρ, -A clip(ρ, 1 - ε,
    1 + ε)), ρ = π / π_old; and where the clipped term is the larger (it was clipped)."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """½ max((V - R)², (V_clip - R)²) per token, V_clip = V_old + clip(V - V_old, ±ε_v)
    (the clipped value loss of OpenAI's baselines and TRL); and where the clipped term won."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value,
                                              cliprange_value)
    plain = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped), clipped > plain


def group_advantages(scores: torch.Tensor, group: int, scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages (Shao et al. 2024): each score less its group's mean (the responses
    to one prompt, `group` consecutive scores), divided by the group's standard deviation
    (scale="group"), the whole batch's ("batch") or nothing ("none"); eps as TRL's."""
    grouped = scores.view(-1, group)
    centred = (grouped - grouped.mean(-1, keepdim=True)).reshape(-1)
    if scale == "group":
        std = grouped.std(-1, keepdim=True).expand_as(grouped).reshape(-1)
    elif scale == "batch":
        std = scores.std().expand_as(scores)
    elif scale == "none":
        return centred
    else:
        raise ValueError(f"unknown reward scaling {scale!r}")
    return centred / (std + eps)


def grpo_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor,
                    advantages: torch.Tensor, beta: float, eps_low: float, eps_high: float
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's loss per token: -min(ρ A, clip(ρ, 1 - ε_low, 1 + ε_high) A) + β k3(π, π_ref),
    with one advantage (B,) per response; and its parts (ρ, kl) for the figures."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    kl = kl_per_token(logps, ref_logps, "k3")
    loss = -surrogate + beta * kl if beta else -surrogate
    return loss, {"ratio": ratio, "kl": kl}


def grpo_sum(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str,
             max_new_tokens: int) -> torch.Tensor:
    """The summed loss of a batch whose count is `grpo_count`, so that the loop's division by
    the global count gives TRL's aggregation: dapo, the mean over every response token;
    grpo, each response's token mean, averaged over responses; dr_grpo, the token sum over
    responses x max_new_tokens."""
    masked = per_token * mask
    if loss_type == "dapo":
        return masked.sum()
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    if loss_type == "dr_grpo":
        return masked.sum() / max_new_tokens
    raise ValueError(f"unknown GRPO loss type {loss_type!r}")


def grpo_count(mask: torch.Tensor, loss_type: str) -> int:
    """Items a batch's GRPO loss covers: response tokens (dapo) or responses."""
    return int(mask.sum()) if loss_type == "dapo" else mask.size(0)
