"""Alignment on the demo model: reward models, DPO, PPO and GRPO, held-out figures.

    python bench/bench_align.py [--base runs/demo/final] [--out bench/out/align]

From the demo model (`make demo`: 4.5M parameters pretrained on the built-in corpus) it trains
two SFT models (builtin:continue; the book's 1,100 instructions, ../shared/data), then
- reward models on the shared preference set and on the built-in builtin:continue pairs:
  pairwise accuracy and margin on held-out (test) pairs;
- DPO on both: held-out rewards/accuracies and margins before and after, sample answers;
- PPO and GRPO on builtin:continue prompts against a rule (builtin:verse) and against the
  built-in reward model: mean reward of held-out prompts before and after, KL to the SFT
  model, and the per-evaluation curves (plots in each run's rl.png).
Every run is a normal run directory under --out; a finished one is reused, so a second run of
the benchmark only prints. Prints Markdown tables; saves bench/out/align.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from results import save  # noqa: E402

from scratchlm.align.demo import demo_stage  # noqa: E402
from scratchlm.config import (  # noqa: E402
    DPOConfig,
    GRPOConfig,
    PPOConfig,
    RewardConfig,
    SFTConfig,
)
from scratchlm.utils import data_dir  # noqa: E402

CONTINUE = "builtin:continue"


def runs(base: Path, out: Path) -> dict[str, tuple]:
    """name -> (stage, config class, overrides), in the order they run."""
    from scratchlm.align.dpo import run_dpo
    from scratchlm.align.grpo import run_grpo
    from scratchlm.align.ppo import run_ppo
    from scratchlm.align.reward import run_reward
    from scratchlm.finetune.sft import run_sft

    shared = data_dir() / "instruct"
    instructions = shared / "instruction-data.json"
    preferences = shared / "instruction-data-with-preference.json"
    sft_c, sft_a = out / "sft-continue", out / "sft-alpaca"
    rl = ["--train.lr=2e-5", "--train.global_batch=8", "--train.eval_every=16",
          "--rollout.batch=32", "--rollout.max_new_tokens=24", "--rollout.eval_prompts=96"]
    return {
        "sft-continue": (run_sft, SFTConfig, [
            f"--sft.model={base}", f"--sft.data={CONTINUE}", "--train.max_steps=300",
            "--train.epochs=0", "--train.lr=1e-3", "--train.eval_every=100",
            "--sft.eval_examples=50", "--sft.max_new_tokens=24"]),
        "sft-alpaca": (run_sft, SFTConfig, [
            f"--sft.model={base}", f"--sft.data={instructions}", "--train.epochs=2",
            "--train.lr=1e-3", "--train.eval_every=100", "--sft.eval_examples=50",
            "--sft.max_new_tokens=48"]),
        "reward-shared": (run_reward, RewardConfig, [
            f"--reward.model={sft_a}", f"--reward.data={preferences}",
            "--reward.identical=drop", "--train.epochs=2", "--train.lr=3e-4",
            "--train.eval_every=50"]),
        "reward-continue": (run_reward, RewardConfig, [
            f"--reward.model={sft_c}", f"--reward.data={CONTINUE}", "--train.epochs=2",
            "--train.lr=3e-4", "--train.eval_every=50"]),
        "dpo-shared": (run_dpo, DPOConfig, [
            f"--dpo.model={sft_a}", f"--dpo.data={preferences}", "--dpo.identical=drop",
            "--train.epochs=2", "--train.lr=5e-5", "--train.micro_batch=8",
            "--train.eval_every=50", "--dpo.max_new_tokens=48"]),
        "dpo-continue": (run_dpo, DPOConfig, [
            f"--dpo.model={sft_c}", f"--dpo.data={CONTINUE}", "--train.epochs=2",
            "--train.lr=5e-5", "--train.micro_batch=8", "--train.eval_every=50",
            "--dpo.max_new_tokens=24"]),
        "ppo-verse": (run_ppo, PPOConfig, [
            f"--ppo.model={sft_c}", f"--ppo.data={CONTINUE}", "--ppo.reward=builtin:verse",
            "--train.max_steps=128", *rl]),
        "ppo-reward-model": (run_ppo, PPOConfig, [
            f"--ppo.model={sft_c}", f"--ppo.data={CONTINUE}",
            f"--ppo.reward_model={out / 'reward-continue'}", "--train.max_steps=128", *rl]),
        "grpo-verse": (run_grpo, GRPOConfig, [
            f"--grpo.model={sft_c}", f"--grpo.data={CONTINUE}", "--grpo.reward=builtin:verse",
            "--train.max_steps=64", "--rollout.batch=8", "--grpo.num_generations=4",
            *[a for a in rl if not a.startswith("--rollout.batch")]]),
        "grpo-reward-model": (run_grpo, GRPOConfig, [
            f"--grpo.model={sft_c}", f"--grpo.data={CONTINUE}",
            f"--grpo.reward_model={out / 'reward-continue'}", "--train.max_steps=64",
            "--rollout.batch=8", "--grpo.num_generations=4",
            *[a for a in rl if not a.startswith("--rollout.batch")]]),
    }


def curve(out: Path, keys: list[str]) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], **{k: r[k] for k in keys}} for r in rows if keys[0] in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=str(ROOT / "runs" / "demo" / "final"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "align"))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    base, out = Path(args.base), Path(args.out)
    if not (base / "config.json").is_file():
        sys.exit(f"no model at {base}: run `make demo` first (or pass --base)")
    summaries = {}
    for name, (run, cls, overrides) in runs(base, out).items():
        print(f"[bench] {name}", flush=True)
        summaries[name] = demo_stage(run, cls, overrides, out / name, not args.quiet)
        summaries[name]["seconds"] = summaries[name].get("seconds")

    print("\n### Reward models (held-out test pairs)\n")
    print("| data | SFT base | steps | test pairs | pairwise accuracy | margin |")
    print("|---|---|---|---|---|---|")
    for name, data, sft in [("reward-shared", "shared preference set", "sft-alpaca"),
                            ("reward-continue", "builtin:continue", "sft-continue")]:
        m, s = summaries[name]["metrics"]["test"], summaries[name]
        print(f"| {data} | {sft} | {s['steps']} | {m['pairs']} | {m['accuracy']:.1%} | "
              f"{m['margin']:.3f} |")

    print("\n### DPO (held-out test pairs, before -> after)\n")
    print("| data | steps | rewards/accuracies | rewards/margins | policy prefers chosen |")
    print("|---|---|---|---|---|")
    for name, data in [("dpo-shared", "shared preference set"),
                       ("dpo-continue", "builtin:continue")]:
        h, s = summaries[name]["held_out"], summaries[name]
        b, a = h["before"], h["after"]
        print(f"| {data} | {s['steps']} | {b['rewards/accuracies']:.1%} -> "
              f"{a['rewards/accuracies']:.1%} | {b['rewards/margins']:.3f} -> "
              f"{a['rewards/margins']:.3f} | {b['logps/accuracies']:.1%} -> "
              f"{a['logps/accuracies']:.1%} |")
    for name in ("dpo-shared", "dpo-continue"):
        print(f"\n{name}: held-out answers before and after\n")
        print("\n".join((out / name / "responses.md").read_text().splitlines()[:5]))

    print("\n### PPO and GRPO (held-out prompts, before -> after)\n")
    print("| run | reward | steps | mean reward | KL to SFT (nats/response) | tokens |")
    print("|---|---|---|---|---|---|")
    series = {}
    for name in ("ppo-verse", "ppo-reward-model", "grpo-verse", "grpo-reward-model"):
        h, s = summaries[name]["held_out"], summaries[name]
        b, a = h["before"], h["after"]
        reward = "builtin:verse" if "verse" in name else "reward-continue"
        print(f"| {name.split('-')[0].upper()} | {reward} | {s['steps']} | {b['reward']:.3f} "
              f"-> **{a['reward']:.3f}** | {a['kl']:.3f} | {b['length']:.1f} -> "
              f"{a['length']:.1f} |")
        series[name] = curve(out / name, ["val_reward", "val_kl"])
    print("\nValidation reward / KL at each evaluation:\n")
    for name, points in series.items():
        shown = ", ".join(f"{p['step']}: {p['val_reward']:.3f} / {p['val_kl']:.2f}"
                          for p in points)
        print(f"- {name}: {shown}")
    path = save("align", {"summaries": summaries, "curves": series})
    print(f"\nsaved {path}; plots: {out}/*/rl.png, {out}/*/curves.png")


if __name__ == "__main__":
    main()
