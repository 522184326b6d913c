"""PPO and GRPO: each formula against a written-out reference on hand-made tensors (with a
response that ends at its first token, padding inside a batch, a zero-variance batch); GRPO's
loss against TRL's on the same log-probs and advantages; PPO's loss as the sum of its parts;
short runs that raise a rule reward; bad rewards."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from scratchlm.align.common import StepMeter
from scratchlm.align.grpo import GRPOObjective
from scratchlm.align.ppo import PPOObjective
from scratchlm.align.rl import (
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    group_advantages,
    grpo_count,
    grpo_sum,
    grpo_token_loss,
    kl_per_token,
    token_rewards,
    whiten,
)
from scratchlm.align.rollout import Experience, left_aligned
from scratchlm.cli import main
from scratchlm.config import GRPOSection, PPOSection
from scratchlm.model.logprobs import IGNORE, token_logprobs

PAD = 99.0  # garbage in padding: a result that reads it is wrong

# Three responses of 4, 1 (it ends at its first token) and 3 tokens.
LENGTHS = [4, 1, 3]


def padded(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-aligned (B, L) with PAD after each row's end, and the mask."""
    values, mask = left_aligned(rows)
    return values.masked_fill(~mask, PAD), mask


def rows_of(x: torch.Tensor, lengths: list[int]) -> list[list[float]]:
    return [x[i, :n].tolist() for i, n in enumerate(lengths)]


# ------------------------------------------------------------------------------------------------
# written-out references, one sequence at a time


def ref_gae(rewards: list[float], values: list[float], gamma: float, lam: float
            ) -> tuple[list[float], list[float]]:
    adv, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv, [a + v for a, v in zip(adv, values)]


def ref_whiten(xs: list[float], shift_mean: bool) -> list[float]:
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
    return [(x - mean) / math.sqrt(var + 1e-8) + (0 if shift_mean else mean) for x in xs]


def test_gae_and_returns_per_sequence_with_padding_and_a_one_token_response() -> None:
    torch.manual_seed(0)
    rewards = [torch.randn(n).tolist() for n in LENGTHS]
    values = [torch.randn(n).tolist() for n in LENGTHS]
    r, mask = padded(rewards)
    v, _ = padded(values)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)]:
        adv, ret = gae(r * mask, v, mask, gamma, lam)
        for i in range(len(LENGTHS)):
            want_adv, want_ret = ref_gae(rewards[i], values[i], gamma, lam)
            assert rows_of(adv, LENGTHS)[i] == pytest.approx(want_adv, abs=1e-6)
            assert rows_of(ret, LENGTHS)[i] == pytest.approx(want_ret, abs=1e-6)
        assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)
    # The one-token response: A = r - V, R = r.
    adv, ret = gae(r * mask, v, mask, 1.0, 0.95)
    assert adv[1, 0].item() == pytest.approx(rewards[1][0] - values[1][0], abs=1e-6)
    assert ret[1, 0].item() == pytest.approx(rewards[1][0], abs=1e-6)
    # A row is the same alone as in a padded batch.
    alone, _ = gae(torch.tensor([rewards[2]]), torch.tensor([values[2]]),
                   torch.ones(1, 3, dtype=torch.bool), 1.0, 0.95)
    torch.testing.assert_close(alone[0], adv[2, :3])


def test_per_token_kl_penalty_and_score_at_the_last_token() -> None:
    logps = [[-1.0, -2.0, -0.5, -3.0], [-0.7], [-1.5, -0.2, -2.2]]
    ref = [[-1.2, -1.0, -0.5, -2.0], [-0.9], [-1.0, -0.4, -2.0]]
    scores = torch.tensor([2.0, -1.0, 0.5])
    lp, mask = padded(logps)
    rl, _ = padded(ref)
    for estimator in ("k1", "k3"):
        kl = kl_per_token(lp, rl, estimator) * mask
        rewards = token_rewards(scores, kl, mask, 0.1)
        for i, n in enumerate(LENGTHS):
            for t in range(n):
                a, b = logps[i][t], ref[i][t]
                k = a - b if estimator == "k1" else math.exp(b - a) - (b - a) - 1
                want = -0.1 * k + (scores[i].item() if t == n - 1 else 0.0)
                assert rewards[i, t].item() == pytest.approx(want, abs=1e-6), (estimator, i, t)
        assert torch.all(rewards[~mask] == 0)
    assert kl_per_token(torch.tensor([-1.0]), torch.tensor([-1.0]), "k3").item() == 0
    assert torch.all(kl_per_token(lp, rl, "k3")[mask] >= 0)  # k3 is never negative


def test_whitening_and_a_zero_variance_batch() -> None:
    rows = [[1.0, 2.0, 4.0, 8.0], [3.0], [-1.0, 0.0, 5.0]]
    x, mask = padded(rows)
    flat = [v for r in rows for v in r]
    for shift in (True, False):
        got = whiten(x, mask, shift_mean=shift)
        assert [v for r in rows_of(got, LENGTHS) for v in r] == \
            pytest.approx(ref_whiten(flat, shift), abs=1e-5)
        assert torch.all(got[~mask] == 0)
    same, mask = padded([[0.5] * n for n in LENGTHS])
    assert torch.all(whiten(same, mask) == 0)  # finite: nothing to scale
    assert torch.allclose(whiten(same, mask, shift_mean=False)[mask], torch.tensor(0.5))
    one = whiten(torch.tensor([[7.0]]), torch.ones(1, 1, dtype=torch.bool))
    assert one.item() == 0  # a single value: no variance, no NaN


def test_clipped_policy_loss_by_hand() -> None:
    # ratio exp(lp - old): 1.5 (above 1 + ε), 0.5 (below 1 - ε), 1.1 (inside), for A > 0 and A < 0
    old = torch.zeros(2, 3)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 1.1]]))
    adv = torch.tensor([[2.0, 2.0, 2.0], [-2.0, -2.0, -2.0]])
    loss, clipped = clipped_policy_loss(lp, old, adv, 0.2)
    # A > 0: max(-A ρ, -A clip ρ) -> -2 * 1.2, -2 * 0.5, -2 * 1.1; A < 0: 2 * 1.5, 2 * 0.8, 2 * 1.1
    want = torch.tensor([[-2.4, -1.0, -2.2], [3.0, 1.6, 2.2]])
    torch.testing.assert_close(loss, want)
    assert clipped.tolist() == [[True, False, False], [False, True, False]]


def test_clipped_value_loss_by_hand() -> None:
    old = torch.tensor([0.0, 0.0, 1.0])
    values = torch.tensor([0.5, 0.1, 0.0])
    returns = torch.tensor([1.0, -1.0, 0.0])
    loss, clipped = clipped_value_loss(values, old, returns, 0.2)
    # 1: V_clip 0.2 -> max(0.25, 0.64); 2: inside -> (1.1)²; 3: V_clip 0.8 -> max(0, 0.64)
    torch.testing.assert_close(loss, 0.5 * torch.tensor([0.64, 1.21, 0.64]))
    assert clipped.tolist() == [True, False, True]


def test_group_advantages_by_hand_and_a_zero_variance_group() -> None:
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    std = torch.tensor([1.0, 2.0, 3.0]).std().item()  # unbiased: 1.0
    want = [(1 - 2) / (std + 1e-4), 0.0, (3 - 2) / (std + 1e-4), 0.0, 0.0, 0.0]
    assert group_advantages(scores, 3).tolist() == pytest.approx(want, abs=1e-6)
    batch_std = scores.std().item()
    assert group_advantages(scores, 3, "batch").tolist() == pytest.approx(
        [-1 / (batch_std + 1e-4), 0, 1 / (batch_std + 1e-4), 0, 0, 0], abs=1e-6)
    assert group_advantages(scores, 3, "none").tolist() == [-1, 0, 1, 0, 0, 0]
    assert torch.all(torch.isfinite(group_advantages(torch.full((4,), 2.0), 2)))


# ------------------------------------------------------------------------------------------------
# losses of a batch, through the objectives


def experiences(vocab: int, seed: int = 0) -> list[Experience]:
    """Hand-made experiences of different prompt and response lengths, one response of a
    single token."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (p, n) in enumerate([(5, 4), (3, 1), (6, 3), (4, 2)]):
        out.append(Experience(
            i, torch.randint(vocab, (p,), generator=g).tolist(),
            torch.randint(vocab, (n,), generator=g).tolist(), True, score=float(i),
            logps=(-torch.rand(n, generator=g) * 3).tolist(),
            ref_logps=(-torch.rand(n, generator=g) * 3).tolist(),
            values=torch.randn(n, generator=g).tolist(),
            advantages=torch.randn(n, generator=g).tolist(),
            returns=torch.randn(n, generator=g).tolist()))
    return out


class FixedModel:
    """Stands in for the policy: fixed logits (and hidden states) whatever the input."""

    def __init__(self, logits: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        self.logits, self.hidden = logits, hidden

    def __call__(self, idx: torch.Tensor):
        return self.logits, self.hidden


def bare(cls, **attrs):
    obj = object.__new__(cls)
    obj.meter, obj.pad_id = StepMeter(), 0
    for k, v in attrs.items():
        setattr(obj, k, v)
    return obj


def test_ppo_loss_is_the_clipped_policy_and_value_losses_summed_over_tokens() -> None:
    section = PPOSection(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    obj = bare(PPOObjective, section=section)
    exps = experiences(11)
    batch = obj.collate(exps)
    torch.manual_seed(1)
    logits = torch.randn(*batch["idx"].shape, 11)
    hidden = torch.randn(*batch["idx"].shape, 3)
    head = torch.nn.Linear(3, 1)
    loss, count = obj.loss(FixedModel(logits, hidden), {"value_head": head}, batch)
    assert count == sum(len(e.response_ids) for e in exps)
    lp_grid = token_logprobs(logits, batch["targets"])
    v_grid = head(hidden).squeeze(-1)
    mask = batch["targets"] != IGNORE
    want = 0.0
    for i, e in enumerate(exps):
        lps, vs = lp_grid[i][mask[i]].tolist(), v_grid[i][mask[i]].tolist()
        for t in range(len(e.response_ids)):
            ratio = math.exp(lps[t] - e.logps[t])
            a = e.advantages[t]
            pg = max(-a * ratio, -a * min(max(ratio, 0.8), 1.2))
            clipped_v = e.values[t] + min(max(vs[t] - e.values[t], -0.2), 0.2)
            vf = 0.5 * max((vs[t] - e.returns[t]) ** 2, (clipped_v - e.returns[t]) ** 2)
            want += pg + 0.1 * vf
    assert loss.item() == pytest.approx(want, rel=1e-5)
    figures = obj.meter.means()
    assert {"loss/policy_avg", "loss/value_avg", "policy/clipfrac_avg", "value/clipfrac_avg",
            "policy/approxkl_avg", "policy/entropy_avg"} <= set(figures)


def test_ppo_settle_whitens_finite_advantages_for_a_zero_variance_batch() -> None:
    obj = bare(PPOObjective, section=PPOSection(),
               kl=SimpleNamespace(value=0.05, update=lambda kl, n: None))
    exps = experiences(11)
    for e in exps:  # the same score, and the policy still the reference: nothing to learn
        e.score, e.ref_logps, e.values = 1.0, list(e.logps), [0.0] * len(e.logps)
    settled, stats = obj.settle(exps)
    flat = torch.tensor([a for e in settled for a in e.advantages])
    assert torch.all(torch.isfinite(flat)) and stats["objective/kl"] == 0
    assert stats["objective/scores"] == 1.0


def trl_grpo_loss(loss_type: str, logps, old, ref, advantages, mask, beta: float,
                  eps: float, max_len: int) -> tuple[torch.Tensor, dict]:
    """TRL's GRPOTrainer._compute_loss on given per-token log-probs (the model's forward
    replaced), one process, no accumulation."""
    from trl import GRPOTrainer

    t = object.__new__(GRPOTrainer)
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps),
                                                             None)
    t.top_entropy_quantile, t.off_policy_mask_threshold = 1.0, None
    t.importance_sampling_level, t.beta, t.loss_type = "token", beta, loss_type
    t.epsilon_low = t.epsilon_high = eps
    t.args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    t.use_vllm = t.vllm_importance_sampling_correction = False
    t.model, t.current_gradient_accumulation_steps = SimpleNamespace(training=True), 1
    t.accelerator = SimpleNamespace(num_processes=1, reduce=lambda x, reduction: x,
                                    gather=lambda x: x)
    t._entropy_bonus_enabled = t.aux_loss_enabled = False
    t.max_completion_length = max_len
    t._metrics = {"train": defaultdict(list)}
    B, C = logps.shape
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long),
              "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, C, dtype=torch.long),
              "completion_mask": mask.long(), "advantages": advantages,
              "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return t._compute_loss(None, inputs), t._metrics["train"]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_grpo_loss_equals_trls_on_the_same_logprobs_and_advantages(loss_type: str) -> None:
    pytest.importorskip("trl")
    max_len = 6
    section = GRPOSection(loss_type=loss_type, beta=0.04, epsilon=0.2)
    obj = bare(GRPOObjective, section=section, eps_high=0.2,
               rollout=SimpleNamespace(max_new_tokens=max_len))
    exps = experiences(11, seed=3)
    for e, a in zip(exps, [1.3, -0.7, 0.4, -1.1]):
        e.advantages = [a] * len(e.response_ids)
    batch = obj.collate(exps)
    torch.manual_seed(2)
    logits = torch.randn(*batch["idx"].shape, 11) * 3  # ratios far enough from 1 to clip
    ours, count = obj.loss(FixedModel(logits), {}, batch)
    assert count == obj.count(batch)
    # The same tensors in TRL's layout: completions left-aligned (B, C).
    mask = batch["targets"] != IGNORE
    lp_grid = token_logprobs(logits, batch["targets"])
    lps, cmask = left_aligned([lp_grid[i][mask[i]].tolist() for i in range(len(exps))])
    old, _ = left_aligned([e.logps for e in exps])
    ref, _ = left_aligned([e.ref_logps for e in exps])
    adv = torch.tensor([e.advantages[0] for e in exps])
    theirs, metrics = trl_grpo_loss(loss_type, lps, old, ref, adv, cmask.float(), 0.04, 0.2,
                                    max_len)
    assert (ours / count).item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    figures = obj.meter.means()
    assert figures["kl"] == pytest.approx(metrics["kl"][0], rel=1e-5)
    assert figures["clip_ratio/region_mean"] == pytest.approx(
        metrics["clip_ratio/region_mean"][0], abs=1e-6)
    assert figures["clip_ratio/region_mean"] > 0  # the test reaches the clipped branch
    # And the summed form TRL's normalisation comes from.
    per_token, _ = grpo_token_loss(lps, old, ref, adv, 0.04, 0.2, 0.2)
    assert (grpo_sum(per_token, cmask, loss_type, max_len)
            / grpo_count(cmask, loss_type)).item() == pytest.approx(theirs.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# runs on the tiny model


RULES = '''
def commas(prompt, response):
    """A rule a tiny model can learn in a few steps: one token's frequency."""
    return response.count(",") / 4


def raises(prompt, response):
    raise ValueError("no score for you")


def nan(prompt, response):
    return float("nan")
'''


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rewards") / "rules.py"
    path.write_text(RULES)
    return path


def rl_args(verb: str, model: Path, out: Path | None, reward: str, *extra: str) -> list[str]:
    return ["align", verb, "--model", str(model), "--data", "builtin:continue", "--reward",
            reward, *(["--out", str(out)] if out else []), "--quiet", "--train.lr=5e-4",
            "--train.eval_every=0", "--rollout.max_new_tokens=16", "--rollout.eval_prompts=32",
            "--train.global_batch=8", *extra]


def held_out(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_a_few_ppo_steps_raise_a_rule_reward(sft_model: Path, reward_file: Path,
                                            tmp_path: Path) -> None:
    out = tmp_path / "ppo"
    assert main(rl_args("ppo", sft_model, out, f"{reward_file}:commas", "--rollout.batch=16",
                        "--train.max_steps=24")) == 0
    m = held_out(out)
    # Held-out prompts, the same sampling seeds before and after; 3 rollouts of 16 responses
    # take the tiny SFT model from about one comma in 7 responses to more than twice that.
    assert m["after"]["reward"] > 1.5 * m["before"]["reward"] + 0.05, m
    assert m["before"]["kl"] == 0 and 0 < m["after"]["kl"] < 5, m
    # The validation curve's step 0 (evaluations run on val; before/after on test).
    assert m["val_before"]["kl"] == 0 and m["val_before"] != m["before"], m
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    for key in ("objective/kl", "objective/entropy", "objective/scores", "policy/clipfrac_avg",
                "policy/approxkl_avg", "loss/value_avg", "response/length"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert (out / "rl.png").stat().st_size > 5000
    assert (out / "final" / "value_head.safetensors").is_file()
    assert (out / "final" / "template.json").is_file()
    assert "| prompt | before |" in (out / "responses.md").read_text()


@pytest.mark.slow
def test_grpo_runs_on_groups_and_logs_trls_figures(sft_model: Path, reward_file: Path,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "grpo"
    assert main(rl_args("grpo", sft_model, out, f"{reward_file}:commas", "--rollout.batch=4",
                        "--grpo.num_generations=4", "--train.max_steps=12",
                        "--grpo.epochs=2")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward", "reward_std", "kl", "entropy", "clip_ratio/region_mean",
                "completions/mean_length", "frac_reward_zero_std"):
        assert all(math.isfinite(r[key]) for r in rows), key
    m = held_out(out)
    assert m["after"]["reward"] > m["before"]["reward"], m
    assert not (out / "final" / "value_head.safetensors").exists()


@pytest.mark.parametrize("name, message", [
    ("raises", "raised ValueError: no score for you on response 1"),
    ("nan", "returned nan for response 1"),
])
def test_a_reward_function_that_fails_stops_before_writing(name: str, message: str,
                                                           sft_model: Path, reward_file: Path,
                                                           tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(rl_args("ppo", sft_model, out, f"{reward_file}:{name}", "--rollout.batch=8",
                        "--rollout.eval_prompts=2")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: reward ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("reward, message", [
    ("nosuchmodule:fn", "importing nosuchmodule failed"),
    ("builtin:nope", "no built-in reward 'nope'"),
    ("", "give exactly one reward"),
])
def test_a_reward_that_cannot_be_loaded_is_refused(reward: str, message: str, sft_model: Path,
                                                   tmp_path: Path, capsys) -> None:
    args = rl_args("grpo", sft_model, tmp_path / "out", reward)
    if not reward:
        args = args[:args.index("--reward")] + args[args.index("--reward") + 2:]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ppo_killed_mid_rollout_then_resumed_equals_an_uninterrupted_run(
        sft_model: Path, reward_file: Path, tmp_path: Path) -> None:
    """Two optimizer steps per rollout, a checkpoint after step 3 (the first of the second
    rollout's two): the resumed run finishes that rollout from its checkpointed buffer, then
    samples the next one; weights, value head and every loss equal the run left alone."""
    from helpers import losses, sigkill_then_resume

    argv = rl_args("ppo", sft_model, None, f"{reward_file}:commas", "--rollout.batch=8",
                   "--ppo.epochs=2", "--train.max_steps=6", "--train.checkpoint_every=3",
                   "--rollout.eval_prompts=8")
    whole, killed = sigkill_then_resume(argv, tmp_path, 3, ["model.safetensors",
                                                            "value_head.safetensors"])
    assert losses(killed) == losses(whole)
    # The resumed session takes the held-out figures before training from the checkpoint.
    held = [json.loads((d / "summary.json").read_text())["held_out"] for d in (whole, killed)]
    assert held[0]["before"] == held[1]["before"] and held[0]["val_before"] == held[1]["val_before"]


def test_adaptive_kl_controller_by_hand() -> None:
    from scratchlm.align.ppo import KLController

    fixed = KLController(0.05, False, 6.0, 10000)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    kl = KLController(0.05, True, 6.0, 10000)
    kl.update(9.0, 64)  # 9 / 6 - 1 = 0.5, clipped to 0.2
    assert kl.value == pytest.approx(0.05 * (1 + 0.2 * 64 / 10000))
    kl.update(5.4, 64)  # 5.4 / 6 - 1 = -0.1
    assert kl.value == pytest.approx(0.05 * (1 + 0.2 * 64 / 10000) * (1 - 0.1 * 64 / 10000))


def test_builtin_rules_by_hand() -> None:
    from scratchlm.align.rewards import syllables, thou, verse

    assert thou("", "Thou art, and thee I love") == pytest.approx(2 / 6)
    assert thou("", "") == 0.0
    assert [syllables(w) for w in ("love", "summer", "day", "temperate", "able")] == \
        [1, 2, 1, 3, 2]
    # "Shall I compare thee to a summer's day?" is ten syllables (the counter's "summer's"
    # is two).
    assert verse("", "Shall I compare thee to a summer's day?") == 1.0
    assert verse("", "Shall I compare thee\nto a summer's day?") == 0.0
    assert verse("", "Shall I compare") == pytest.approx(0.4)
