"""GRPO (Shao et al. 2024, DeepSeekMath) on the one training loop: several responses to each
prompt, each response's advantage its reward against its group's (no value head), a clipped
surrogate and a KL term against the frozen reference; rollouts as PPO's
(scratchlm.align.rollout).

`scratchlm align grpo --model SFT --data PROMPTS --reward-model RM | --reward module:fn --out DIR`
-> RUN/ as `align ppo`'s (no value head), figures under TRL's GRPOTrainer names: reward,
reward_std, frac_reward_zero_std, kl, entropy, clip_ratio/low_mean, clip_ratio/high_mean,
clip_ratio/region_mean, completions/mean_length, completions/clipped_ratio.

The loss of a batch equals TRL's (loss_type dapo, grpo or dr_grpo) on the same log-probs and
advantages; the loop's division by the global count does TRL's averaging (scratchlm.align.rl).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from scratchlm.align.rl import group_advantages, grpo_count, grpo_sum, grpo_token_loss, kl_per_token
from scratchlm.align.rollout import Experience, RLObjective, run_rl
from scratchlm.config import GRPOConfig, GRPOSection
from scratchlm.model.gpt import GPT
from scratchlm.model.logprobs import IGNORE, token_logprobs


class GRPOObjective(RLObjective):
    name = "GRPO"
    panels = [("reward", ["reward", "val_reward"]),
              ("KL to the reference", ["kl", "val_kl"]),
              ("clipped ratios", ["clip_ratio/region_mean"]),
              ("entropy (nats/token)", ["entropy"]),
              ("response tokens", ["completions/mean_length", "val_length"])]

    def __init__(self, policy: GPT, reference: GPT, reward, tokenizer, template, prompts,
                 rollout, seed: int, section: GRPOSection) -> None:
        super().__init__(policy, reference, reward, tokenizer, template, prompts, rollout, seed)
        self.section = section
        self.group, self.epochs = section.num_generations, section.epochs
        self.eps_high = section.epsilon_high if section.epsilon_high is not None \
            else section.epsilon

    def settle(self, exps: list[Experience]) -> tuple[list[Experience], dict[str, float]]:
        scores = torch.tensor([e.score for e in exps])
        advantages = group_advantages(scores, self.group, self.section.scale_rewards)
        for e, a in zip(exps, advantages.tolist()):
            e.advantages = [a] * len(e.response_ids)
        std = scores.view(-1, self.group).std(-1)
        tokens = sum(len(e.response_ids) for e in exps)
        stats = {"reward": scores.mean().item(), "reward_std": std.mean().item(),
                 "frac_reward_zero_std": (std == 0).float().mean().item(),
                 "completions/mean_length": tokens / len(exps),
                 "completions/clipped_ratio": sum(not e.ended for e in exps) / len(exps),
                 "entropy": sum(e.entropy * len(e.response_ids) for e in exps) / tokens}
        return exps, stats

    def count(self, batch: dict) -> int:
        return grpo_count(batch["targets"] != IGNORE, self.section.loss_type)

    def loss(self, model: GPT, extras: nn.ModuleDict, batch: dict
             ) -> tuple[torch.Tensor, int]:
        s = self.section
        logits, _ = model(batch["idx"])
        mask = batch["targets"] != IGNORE
        logps = token_logprobs(logits, batch["targets"])
        advantages = (batch["advantages"] * mask).sum(-1) / mask.sum(-1)  # (B,): one each
        per_token, parts = grpo_token_loss(logps, batch["logps"], batch["ref_logps"],
                                           advantages, s.beta, s.epsilon, self.eps_high)
        n = mask.sum()
        with torch.no_grad():
            ratio, adv = parts["ratio"], advantages[:, None]
            low = (ratio < 1 - s.epsilon) & (adv < 0) & mask
            high = (ratio > 1 + self.eps_high) & (adv > 0) & mask
            self.meter.add("kl", (kl_per_token(logps, batch["ref_logps"], "k3") * mask).sum(),
                           n)
            self.meter.add("clip_ratio/low_mean", low.sum(), n)
            self.meter.add("clip_ratio/high_mean", high.sum(), n)
            self.meter.add("clip_ratio/region_mean", (low | high).sum(), n)
        return grpo_sum(per_token, mask, s.loss_type, self.rollout.max_new_tokens), \
            grpo_count(mask, s.loss_type)


def run_grpo(cfg: GRPOConfig, out: Path, resume: bool = False, progress: bool = True) -> dict:
    """Train cfg.grpo.model with GRPO against a reward model or function into `out`."""
    def make(policy, reference, reward, tokenizer, template, prompts) -> GRPOObjective:
        return GRPOObjective(policy, reference, reward, tokenizer, template, prompts,
                             cfg.rollout, cfg.train.seed, cfg.grpo)

    return run_rl(cfg, cfg.grpo, make, out, resume, progress, "grpo")
