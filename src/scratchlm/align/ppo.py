"""RLHF with PPO (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022) on the one
training loop: rollouts of the current policy (scratchlm.align.rollout), a reward at each
response's end, a per-token KL penalty against the frozen reference, GAE, and several epochs
of clipped policy and value updates over each rollout.

`scratchlm align ppo --model SFT --data PROMPTS --reward-model RM | --reward module:fn --out DIR`
-> RUN/
  final/          the policy, value_head.safetensors, its tokenizer and template.json
  metrics.json    mean reward, KL to the reference and length on held-out prompts, before and
                  after training; responses.md: a few of those responses before and after
  rl.png          reward, KL, clip fractions, value loss, entropy and length per step
  loss.png, metrics.jsonl/.csv, summary.json, checkpoints/

The value head is a linear layer (with a bias) on the policy's own final hidden states, trained
with it: loss = policy loss + vf_coef x value loss. One forward pass gives both the log-probs
and the values, half the compute and memory of a separate value model (TRL's old PPOTrainer
held one, initialised from the reward model), which is what decides on a CPU; the price is
that value gradients also move the shared trunk, which the small vf_coef (0.1, TRL's) and the
clipped value loss keep in check.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from scratchlm.align.rl import (
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    kl_per_token,
    token_rewards,
    whiten,
)
from scratchlm.align.rollout import Experience, RLObjective, entropy, left_aligned, run_rl
from scratchlm.config import PPOConfig, PPOSection
from scratchlm.model.gpt import GPT
from scratchlm.model.logprobs import IGNORE, token_logprobs

VALUE_HEAD = "value_head"


class KLController:
    """The KL penalty's coefficient: fixed, or adapted after each rollout towards a target KL
    per response (Ziegler et al. 2019): β ← β (1 + clip(KL / target - 1, ±0.2) n / horizon),
    n the rollout's responses."""

    def __init__(self, coef: float, adaptive: bool, target: float, horizon: int) -> None:
        self.value, self.adaptive = coef, adaptive
        self.target, self.horizon = target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.adaptive:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n / self.horizon


def new_value_head(model: GPT) -> nn.Linear:
    head = nn.Linear(model.config.n_embd, 1)
    nn.init.normal_(head.weight, std=model.config.init_std)
    nn.init.zeros_(head.bias)
    return head


class PPOObjective(RLObjective):
    name = "PPO"
    panels = [("reward", ["objective/scores", "val_reward"]),
              ("KL to the reference (nats/response)", ["objective/kl", "val_kl"]),
              ("clipping", ["policy/clipfrac_avg", "policy/approxkl_avg",
                            "value/clipfrac_avg"]),
              ("value loss", ["loss/value_avg"]),
              ("entropy (nats/token)", ["objective/entropy"]),
              ("response tokens", ["response/length", "val_length"])]

    def __init__(self, policy: GPT, reference: GPT, reward, tokenizer, template, prompts,
                 rollout, seed: int, section: PPOSection) -> None:
        super().__init__(policy, reference, reward, tokenizer, template, prompts, rollout, seed)
        self.section, self.epochs = section, section.epochs
        self.extras = {VALUE_HEAD: new_value_head(policy)}
        self.kl = KLController(section.kl_coef, section.adaptive_kl, section.kl_target,
                               section.kl_horizon)

    def value_head(self) -> nn.Module:
        return self.extras[VALUE_HEAD]

    def settle(self, exps: list[Experience]) -> tuple[list[Experience], dict[str, float]]:
        """Rewards with the KL penalty, optionally whitened; GAE; advantages whitened over the
        rollout (TRL's recipe)."""
        s = self.section
        logps, mask = left_aligned([e.logps for e in exps])
        ref, _ = left_aligned([e.ref_logps for e in exps])
        values, _ = left_aligned([e.values for e in exps])
        scores = torch.tensor([e.score for e in exps])
        kl = kl_per_token(logps, ref, s.kl_estimator) * mask
        rewards = token_rewards(scores, kl, mask, self.kl.value)
        if s.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, s.gamma, s.lam)
        advantages = whiten(advantages, mask)
        for i, e in enumerate(exps):
            n = len(e.response_ids)
            e.advantages, e.returns = advantages[i, :n].tolist(), returns[i, :n].tolist()
        kl_sum = kl.sum(-1)
        penalty = -self.kl.value * kl_sum
        stats = {"objective/scores": scores.mean().item(), "objective/kl": kl_sum.mean().item(),
                 "objective/non_score_reward": penalty.mean().item(),
                 "objective/rlhf_reward": (scores + penalty).mean().item(),
                 "objective/entropy": sum(e.entropy for e in exps) / len(exps),
                 "response/length": mask.sum(-1).float().mean().item(),
                 "response/ended": sum(e.ended for e in exps) / len(exps),
                 "kl_coef": self.kl.value}
        self.kl.update(stats["objective/kl"], len(exps))
        return exps, stats

    def loss(self, model: GPT, extras: nn.ModuleDict, batch: dict
             ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.section
        logits, hidden = model(batch["idx"])
        mask = batch["targets"] != IGNORE
        logps = token_logprobs(logits, batch["targets"])
        values = extras[VALUE_HEAD](hidden).squeeze(-1).float()
        pg, pg_clipped = clipped_policy_loss(logps, batch["logps"], batch["advantages"],
                                             s.cliprange)
        vf, vf_clipped = clipped_value_loss(values, batch["values"], batch["returns"],
                                            s.cliprange_value)
        per_token = pg + s.vf_coef * vf
        ent = entropy(logits) if s.entropy_coef else None
        if ent is not None:
            per_token = per_token - s.entropy_coef * ent
        n = mask.sum()
        with torch.no_grad():
            m = self.meter
            m.add("loss/policy_avg", (pg * mask).sum(), n)
            m.add("loss/value_avg", (vf * mask).sum(), n)
            m.add("policy/clipfrac_avg", (pg_clipped & mask).sum(), n)
            m.add("value/clipfrac_avg", (vf_clipped & mask).sum(), n)
            m.add("policy/approxkl_avg", (0.5 * (logps - batch["logps"]) ** 2 * mask).sum(), n)
            m.add("policy/entropy_avg", ((ent if ent is not None else entropy(logits))
                                         * mask).sum(), n)
        return (per_token * mask).sum(), n

    def state_dict(self) -> dict:
        return {**super().state_dict(), "kl_coef": self.kl.value}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.kl.value = state.get("kl_coef", self.kl.value)


def run_ppo(cfg: PPOConfig, out: Path, resume: bool = False, progress: bool = True) -> dict:
    """Train cfg.ppo.model with PPO against a reward model or function into `out`."""
    def make(policy, reference, reward, tokenizer, template, prompts) -> PPOObjective:
        return PPOObjective(policy, reference, reward, tokenizer, template, prompts,
                            cfg.rollout, cfg.train.seed, cfg.ppo)

    return run_rl(cfg, cfg.ppo, make, out, resume, progress, "ppo")
