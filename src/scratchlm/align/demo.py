"""The whole alignment path on the built-in corpus, from a pretrained model, in minutes on a
CPU: SFT on builtin:continue (continue a speech with its next line), then a reward model on
the builtin:continue pairs (the real next line against its words shuffled) and PPO against it,
and DPO from the SFT model on the same pairs. Each stage is a normal run directory under
`out`; a finished one with the same config is reused, an interrupted one resumed. Writes
`out/report.md`.
"""

from __future__ import annotations

import json
from pathlib import Path

from scratchlm.config import DPOConfig, PPOConfig, RewardConfig, SFTConfig
from scratchlm.demo import demo_stage
from scratchlm.utils import atomic_write_text

DATA = "builtin:continue"


def demo_configs(out: Path, base_model: Path) -> dict[str, tuple[type, list[str]]]:
    """Each stage's config class and overrides (small budgets, the learning rates a model of
    a few million parameters takes)."""
    sft, rm = out / "sft", out / "reward"
    return {
        "sft": (SFTConfig, [f"--sft.model={base_model}", f"--sft.data={DATA}",
                            "--train.max_steps=300", "--train.epochs=0", "--train.lr=1e-3",
                            "--train.eval_every=100", "--sft.eval_examples=20",
                            "--sft.max_new_tokens=24"]),
        "reward": (RewardConfig, [f"--reward.model={sft}", f"--reward.data={DATA}",
                                  "--train.max_steps=150", "--train.epochs=0",
                                  "--train.lr=3e-4", "--train.eval_every=50"]),
        "ppo": (PPOConfig, [f"--ppo.model={sft}", f"--ppo.data={DATA}",
                            f"--ppo.reward_model={rm}", "--train.max_steps=64",
                            "--train.lr=1e-4", "--train.global_batch=8",
                            "--train.eval_every=32", "--rollout.batch=32",
                            "--rollout.max_new_tokens=24", "--rollout.eval_prompts=48"]),
        "dpo": (DPOConfig, [f"--dpo.model={sft}", f"--dpo.data={DATA}",
                            "--train.max_steps=150", "--train.epochs=0", "--train.lr=5e-5",
                            "--train.micro_batch=8", "--train.eval_every=50",
                            "--dpo.max_new_tokens=24"]),
    }


def run_alignment_demo(out: Path, base_model: Path, progress: bool = True,
                       train_overrides: list[str] = ()) -> Path:
    """pretrained model -> SFT -> reward model -> PPO, and SFT -> DPO; returns report.md.
    `train_overrides` (--train.KEY=VALUE) apply to every stage, after its own settings."""
    from scratchlm.align.dpo import run_dpo
    from scratchlm.align.ppo import run_ppo
    from scratchlm.align.reward import run_reward
    from scratchlm.finetune.sft import run_sft

    out = Path(out)
    stages = {"sft": run_sft, "reward": run_reward, "ppo": run_ppo, "dpo": run_dpo}
    summaries = {}
    for name, (cls, overrides) in demo_configs(out, Path(base_model)).items():
        summaries[name] = demo_stage(stages[name], cls, [*overrides, *train_overrides],
                                     out / name, progress)
    report = atomic_write_text(out / "report.md", render_report(out, base_model, summaries))
    print(f"[align demo] report: {report}")
    return report


def render_report(out: Path, base_model: Path, s: dict[str, dict]) -> str:
    rm = s["reward"]["metrics"]
    ppo, dpo = s["ppo"]["held_out"], s["dpo"]["held_out"]
    test = s["sft"].get("test", {})
    lines = [
        "# scratchlm alignment demo",
        "",
        f"From `{base_model}`, on `{DATA}` (continue a speech of the built-in corpus with its "
        "next line; pairs: the real line against its words shuffled; split by play).",
        "",
        "| stage | run | figure on held-out data |",
        "|---|---|---|",
        f"| SFT | `sft/` | {s['sft']['steps']} steps; test token F1 "
        f"{test.get('token_f1', float('nan')):.3f} |",
        f"| reward model | `reward/` | pairwise accuracy {rm['test']['accuracy']:.1%}, "
        f"margin {rm['test']['margin']:.3f} ({rm['test']['pairs']} test pairs) |",
        f"| PPO vs the reward model | `ppo/` | mean reward {ppo['before']['reward']:.3f} -> "
        f"**{ppo['after']['reward']:.3f}**, KL to the SFT model {ppo['after']['kl']:.3f} "
        f"nats per response |",
        f"| DPO | `dpo/` | rewards/accuracies {dpo['before']['rewards/accuracies']:.1%} -> "
        f"**{dpo['after']['rewards/accuracies']:.1%}**, rewards/margins "
        f"{dpo['after']['rewards/margins']:.3f} ({dpo['pairs']} test pairs) |",
        "",
        "Curves: `reward/curves.png`, `ppo/rl.png`, `dpo/curves.png`.",
        "",
        "## PPO: held-out responses before and after",
        "",
        _read(out / "ppo" / "responses.md"),
        "## DPO: held-out answers before and after",
        "",
        _read(out / "dpo" / "responses.md"),
        "## Figures",
        "",
        "```json",
        json.dumps({"reward": rm["test"], "ppo": ppo, "dpo": dpo}, indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else "(none)\n"
