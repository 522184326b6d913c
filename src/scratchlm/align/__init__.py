"""Alignment after SFT, every stage an objective of the one training loop:

- `reward.py`: a reward model (a scalar head at the last real token, Bradley–Terry loss);
- `dpo.py`: direct preference optimisation (sigmoid or IPO loss against a reference);
- `ppo.py`: RLHF with PPO (rollouts through the KV cache, a value head, GAE, clipped losses);
- `grpo.py`: GRPO (group-relative advantages, no value head);
- `data.py` (preference pairs and prompts), `rl.py` (the formulas PPO and GRPO share),
  `rollout.py` (sampling, scoring, the rollout buffer), `rewards.py` (reward functions and
  reward models as a reward source), `demo.py` (the whole path on the built-in corpus).
"""
