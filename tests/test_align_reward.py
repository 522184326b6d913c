"""The reward model: the loss and figures of a batch against TRL's RewardTrainer, training on
the built-in pairs, export to transformers with the same scores, data parallelism."""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

from scratchlm.align.reward import RewardModel, bradley_terry, pair_metrics
from scratchlm.cli import main
from scratchlm.errors import ScratchError
from scratchlm.templates import alpaca_messages

transformers.logging.set_verbosity_error()


@pytest.mark.parametrize("center", [0.0, 0.01])
def test_bradley_terry_equals_trls_reward_loss(center: float) -> None:
    pytest.importorskip("trl")
    from trl import RewardTrainer

    chosen = torch.tensor([1.5, -0.2, 0.3, 2.0])
    rejected = torch.tensor([0.5, 0.4, -1.0, 2.5])
    t = object.__new__(RewardTrainer)
    t.model = SimpleNamespace(training=True)
    t.args = SimpleNamespace(center_rewards_coefficient=center or None)
    t.accelerator = SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x)
    t._metrics, t._total_train_tokens, t._tp_size = {"train": defaultdict(list)}, 0, 1
    logits = torch.cat([chosen, rejected])[:, None]  # (2B, 1): chosen rows, then rejected
    inputs = {"input_ids": torch.zeros(8, 3, dtype=torch.long),
              "attention_mask": torch.ones(8, 3, dtype=torch.long)}
    theirs = t.compute_loss(lambda **kw: SimpleNamespace(logits=logits), inputs)
    assert (bradley_terry(chosen, rejected, center) / 4).item() == pytest.approx(theirs.item())
    ours = pair_metrics(chosen, rejected)
    assert ours["accuracy"] == t._metrics["train"]["accuracy"][0] == 0.5
    assert ours["margin"] == pytest.approx(t._metrics["train"]["margin"][0])


def reward_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["align", "reward", "--model", str(model), "--data", "builtin:continue", "--out",
            str(out), "--quiet", "--train.max_steps=40", "--train.epochs=0", "--train.lr=1e-3",
            "--train.eval_every=20", "--reward.max_length=96", *extra]


@pytest.mark.slow
def test_reward_model_learns_held_out_pairs_and_exports_to_hf(sft_model: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "rm"
    assert main(reward_args(sft_model, out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # Word salad against the real line, on plays never trained on: far above chance (50%).
    assert metrics["test"]["accuracy"] > 0.6 and metrics["test"]["margin"] > 0, metrics["test"]
    assert (out / "curves.png").stat().st_size > 5000
    rm = RewardModel(out)
    prompts = [alpaca_messages("Continue this speech with its next line.",
                               "HAMLET:\nTo be, or not to be"),
               alpaca_messages("Say hi.")]
    responses = ["that is the question:", "hi"]
    ours = rm.score(prompts, responses)
    # Hugging Face's sequence classifier on the same, right-padded ids, finds the last real
    # token itself (the padding token is <|endoftext|>).
    assert main(["convert", "--to-hf", str(out), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert hf.config.num_labels == 1
    rows = [rm.encode(p, r) for p, r in zip(prompts, responses)]
    T = max(map(len, rows))
    ids = torch.tensor([r + [rm.pad_id] * (T - len(r)) for r in rows])
    with torch.no_grad():
        theirs = hf(ids, attention_mask=(ids != rm.pad_id).long()).logits[:, 0]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert abs(ours[0] - ours[1]).item() > 1e-3  # two different scores, both matched
    # It is no classifier: `scratchlm classify` refuses it rather than print a probability.
    assert main(["classify", "--model", str(out), "hello"]) == 2


def test_a_model_that_is_not_a_reward_model_is_refused(sft_model: Path) -> None:
    with pytest.raises(ScratchError, match="is not a reward model"):
        RewardModel(sft_model)


@pytest.mark.distributed
def test_ddp_equals_one_process(sft_model: Path, tmp_path: Path) -> None:
    """Two processes on the same global batch of 8 pairs: every step's loss equals one
    process's to 1e-5, and so do the final head and model."""
    from safetensors.torch import load_file
    from test_align_data import write_pairs

    from helpers import SCRATCHLM, losses, torchrun

    pairs = write_pairs(tmp_path / "pairs.jsonl", 80)
    args = ["align", "reward", "--model", str(sft_model), "--data", str(pairs),
            "--reward.split=[0.6, 0.2, 0.2]", "--quiet", "--train.max_steps=6",
            "--train.epochs=0", "--train.lr=1e-3",
            "--train.micro_batch=2", "--train.global_batch=8", "--train.eval_every=3",
            "--reward.max_length=80"]
    subprocess.run(SCRATCHLM + args + ["--out", str(tmp_path / "one")], check=True,
                   capture_output=True)
    torchrun(*args, "--out", str(tmp_path / "two"), "--parallel.dp=2")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == 6 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)
    for name in ("model.safetensors", "classifier.safetensors"):
        a = load_file(str(tmp_path / "one" / "final" / name))
        b = load_file(str(tmp_path / "two" / "final" / name))
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=5e-4, rtol=1e-3)
