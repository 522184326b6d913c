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
from scratchlm.train.trainer import run_finished  # noqa: E402
from scratchlm.utils import data_dir  # noqa: E402

CONTINUE = "builtin:continue"


def runs(base: Path, out: Path) -> dict[str, tuple]:
    """name -> (stage, config class, overrides), in the order they run. Budgets are small:
    the whole benchmark is meant to take minutes on 2 shared CPU cores."""
    from scratchlm.align.dpo import run_dpo
    from scratchlm.align.grpo import run_grpo
    from scratchlm.align.ppo import run_ppo
    from scratchlm.align.reward import run_reward
    from scratchlm.finetune.sft import run_sft

    shared = data_dir() / "instruct"
    instructions = shared / "instruction-data.json"
    preferences = shared / "instruction-data-with-preference.json"
    sft_c, sft_a = out / "sft-continue", out / "sft-alpaca"
    # Held-out reward on the same 48 validation prompts (same seeds) at every evaluation.
    rl = ["--train.global_batch=8", "--rollout.max_new_tokens=24", "--rollout.eval_prompts=48"]
    # PPO: 12 rollouts of 32 (4 epochs x 4 minibatches of 8 each). At lr 3e-4 most tokens were
    # clipped (clip fraction ~0.8, approximate KL 0.1-0.3 a minibatch: steps too large for the
    # trust region) and the rule reward barely rose; 1e-4 for twice the rollouts rises steadily.
    ppo = [*rl, "--train.lr=1e-4", "--rollout.batch=32", "--train.max_steps=192",
           "--train.eval_every=32"]
    # GRPO: 36 rollouts of 8 prompts x 4 responses (one pass over each).
    grpo = [*rl, "--train.lr=1e-4", "--rollout.batch=8", "--grpo.num_generations=4",
            "--train.max_steps=144", "--train.eval_every=24"]
    # The most telling figures first: an interrupted benchmark keeps its finished runs.
    return {
        "sft-continue": (run_sft, SFTConfig, [
            f"--sft.model={base}", f"--sft.data={CONTINUE}", "--train.max_steps=200",
            "--train.epochs=0", "--train.lr=1e-3", "--train.eval_every=100",
            "--sft.eval_examples=10", "--sft.max_new_tokens=24"]),
        "reward-continue": (run_reward, RewardConfig, [
            f"--reward.model={sft_c}", f"--reward.data={CONTINUE}", "--train.max_steps=100",
            "--train.epochs=0", "--train.lr=3e-4", "--train.eval_every=50"]),
        "dpo-continue": (run_dpo, DPOConfig, [
            f"--dpo.model={sft_c}", f"--dpo.data={CONTINUE}", "--train.max_steps=100",
            "--train.epochs=0", "--train.lr=1e-4", "--train.micro_batch=8",
            "--train.eval_every=50", "--dpo.max_new_tokens=24", "--dpo.sample_prompts=4"]),
        "ppo-verse": (run_ppo, PPOConfig, [
            f"--ppo.model={sft_c}", f"--ppo.data={CONTINUE}", "--ppo.reward=builtin:verse",
            *ppo]),
        "sft-alpaca": (run_sft, SFTConfig, [
            f"--sft.model={base}", f"--sft.data={instructions}", "--train.epochs=1",
            "--train.lr=1e-3", "--train.eval_every=100", "--sft.eval_examples=10",
            "--sft.max_new_tokens=32"]),
        "reward-shared": (run_reward, RewardConfig, [
            f"--reward.model={sft_a}", f"--reward.data={preferences}",
            "--reward.identical=drop", "--train.epochs=1", "--train.lr=3e-4",
            "--train.eval_every=40"]),
        "grpo-verse": (run_grpo, GRPOConfig, [
            f"--grpo.model={sft_c}", f"--grpo.data={CONTINUE}", "--grpo.reward=builtin:verse",
            *grpo]),
        "ppo-reward-model": (run_ppo, PPOConfig, [
            f"--ppo.model={sft_c}", f"--ppo.data={CONTINUE}",
            f"--ppo.reward_model={out / 'reward-continue'}", *ppo]),
        "dpo-shared": (run_dpo, DPOConfig, [
            f"--dpo.model={sft_a}", f"--dpo.data={preferences}", "--dpo.identical=drop",
            "--train.max_steps=100", "--train.epochs=0", "--train.lr=1e-4",
            "--train.micro_batch=8", "--train.eval_every=50", "--dpo.max_new_tokens=32",
            "--dpo.sample_prompts=4"]),
        "grpo-reward-model": (run_grpo, GRPOConfig, [
            f"--grpo.model={sft_c}", f"--grpo.data={CONTINUE}",
            f"--grpo.reward_model={out / 'reward-continue'}", *grpo]),
    }


def quick(overrides: list[str]) -> list[str]:
    """A quarter of each step budget; an epoch becomes 30 steps."""
    out = []
    for o in overrides:
        if o.startswith("--train.max_steps="):
            o = f"--train.max_steps={max(8, int(o.split('=')[1]) // 4)}"
        elif o == "--train.epochs=1":
            out.append("--train.max_steps=30")
            o = "--train.epochs=0"
        elif o.startswith("--train.eval_every="):
            o = f"--train.eval_every={max(4, int(o.split('=')[1]) // 4)}"
        out.append(o)
    return out


def plot_rl(series: dict[str, list[dict]], path: Path) -> None:
    """Held-out mean reward (relative to the SFT model's, so a rule scored 0-1 and a reward
    model's logits share the axis) and KL to the SFT model at each evaluation, a line a run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for name, points in series.items():
        steps = [p["step"] for p in points]
        start = points[0]["val_reward"]
        axes[0].plot(steps, [p["val_reward"] / start for p in points], "o-", ms=3, label=name)
        axes[1].plot(steps, [p["val_kl"] for p in points], "o-", ms=3, label=name)
    for ax, label in zip(axes, ["held-out mean reward / the SFT model's",
                                "KL to the SFT model (nats/response)"]):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("PPO and GRPO on builtin:continue prompts (step 0: the SFT model)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def curve(out: Path, keys: list[str]) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], **{k: r[k] for k in keys}} for r in rows if keys[0] in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=str(ROOT / "runs" / "demo" / "final"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "align"))
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="a quarter of every step budget (30 steps for a whole epoch): a "
                        "sanity pass for a busy machine, into its own --out")
    parser.add_argument("--only", default="", help="comma-separated run names (default: all; "
                        "the tables show the runs that are there)")
    args = parser.parse_args()
    base, out = Path(args.base), Path(args.out)
    if not (base / "config.json").is_file():
        sys.exit(f"no model at {base}: run `make demo` first (or pass --base)")
    summaries = {}
    only = set(filter(None, args.only.split(",")))
    for name, (run, cls, overrides) in runs(base, out).items():
        if args.quick:
            overrides = quick(overrides)
        if only and name not in only and run_finished(out / name) is None:
            continue
        print(f"[bench] {name}", flush=True)
        summaries[name] = demo_stage(run, cls, overrides, out / name, not args.quiet)

    print("\n### Reward models (held-out test pairs)\n")
    print("| data | SFT base | steps | test pairs | pairwise accuracy | margin | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, data, sft in [("reward-shared", "shared preference set", "sft-alpaca"),
                            ("reward-continue", "builtin:continue", "sft-continue")]:
        if name not in summaries:
            continue
        m, s = summaries[name]["metrics"]["test"], summaries[name]
        print(f"| {data} | {sft} | {s['steps']} | {m['pairs']} | {m['accuracy']:.1%} | "
              f"{m['margin']:.3f} | {s['seconds']:.0f} |")

    print("\n### DPO (held-out test pairs, before -> after)\n")
    print("| data | steps | rewards/accuracies | rewards/margins | policy prefers chosen |")
    print("|---|---|---|---|---|")
    for name, data in [("dpo-shared", "shared preference set"),
                       ("dpo-continue", "builtin:continue")]:
        if name not in summaries:
            continue
        h, s = summaries[name]["held_out"], summaries[name]
        b, a = h["before"], h["after"]
        print(f"| {data} | {s['steps']} | {b['rewards/accuracies']:.1%} -> "
              f"{a['rewards/accuracies']:.1%} | {b['rewards/margins']:.3f} -> "
              f"{a['rewards/margins']:.3f} | {b['logps/accuracies']:.1%} -> "
              f"{a['logps/accuracies']:.1%} |")
    for name in [n for n in ("dpo-shared", "dpo-continue") if n in summaries]:
        print(f"\n{name}: held-out answers before and after\n")
        print("\n".join((out / name / "responses.md").read_text().splitlines()[:5]))

    print("\n### PPO and GRPO (held-out prompts, before -> after)\n")
    print("| run | reward | steps | mean reward | KL to SFT (nats/response) | tokens |")
    print("|---|---|---|---|---|---|")
    series = {}
    for name in ("ppo-verse", "ppo-reward-model", "grpo-verse", "grpo-reward-model"):
        if name not in summaries:
            continue
        h, s = summaries[name]["held_out"], summaries[name]
        b, a = h["before"], h["after"]
        reward = "builtin:verse" if "verse" in name else "reward-continue"
        print(f"| {name.split('-')[0].upper()} | {reward} | {s['steps']} | {b['reward']:.3f} "
              f"-> **{a['reward']:.3f}** | {a['kl']:.3f} | {b['length']:.1f} -> "
              f"{a['length']:.1f} |")
        v = h["val_before"]
        series[name] = [{"step": 0, "val_reward": v["reward"], "val_kl": v["kl"]},
                        *curve(out / name, ["val_reward", "val_kl"])]
    print("\nValidation reward / KL at each evaluation:\n")
    for name, points in series.items():
        shown = ", ".join(f"{p['step']}: {p['val_reward']:.3f} / {p['val_kl']:.2f}"
                          for p in points)
        print(f"- {name}: {shown}")
    if series:
        plot_rl(series, out / "rl_held_out.png")
    path = save("align", {"summaries": summaries, "curves": series})
    print(f"\nsaved {path}; plots: {out}/rl_held_out.png, {out}/*/rl.png, "
          f"{out}/*/curves.png")


if __name__ == "__main__":
    main()
