"""DPO: the loss and figures of a batch against TRL's DPOTrainer on the same log-probs,
training on the built-in pairs, the stored reference log-probs, a live reference, bad input,
data parallelism and SIGKILL-resume."""

from __future__ import annotations

import json
import math
import subprocess
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from scratchlm.align.data import Pair, collate_pairs, encode_pairs
from scratchlm.align.dpo import DPOObjective, dpo_loss
from scratchlm.cli import main
from scratchlm.config import DPOSection
from scratchlm.model.logprobs import IGNORE, sequence_logprobs, token_logprobs
from scratchlm.templates import alpaca_messages, get_template
from scratchlm.tokenizer import BPETokenizer

PAIRS = [Pair(alpaca_messages("Continue the line.", "To be, or not to be"),
              "that is the question", "question that the is"),
         Pair(alpaca_messages("Say hi."), "hi", "go away, you"),
         Pair(alpaca_messages("Name a play by Shakespeare, please."), "Hamlet, or Macbeth",
              "no")]


class FixedModel:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def __call__(self, idx: torch.Tensor):
        return self.logits, None


def trl_dpo(loss_type: str, beta: float, smoothing: float, batch: dict,
            per_token: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """TRL's DPOTrainer._compute_loss with the model's forward replaced by given per-token
    log-probs (precomputed reference log-probs, one process)."""
    from trl import DPOTrainer

    t = object.__new__(DPOTrainer)
    t.model = SimpleNamespace(training=True)
    t.accelerator = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x,
                                    gather=lambda x: x)
    t.aux_loss_enabled, t.ld_alpha, t.precompute_ref_logps = False, None, True
    t.f_divergence_type, t.loss_types, t.loss_weights = "reverse_kl", [loss_type], [1.0]
    t.beta, t.label_smoothing, t.use_weighting = beta, smoothing, False
    t._metrics, t._total_train_tokens, t._tp_size = {"train": defaultdict(list)}, 0, 1
    # TRL's layout: ids (2B, T + 1), completion_mask on them; log_probs (2B, T) of the shifted
    # labels, 0 off the completion: our targets grid is that shifted grid.
    targets = batch["targets"]
    ids = torch.cat([batch["idx"], batch["idx"][:, -1:]], dim=1)
    completion = torch.cat([torch.zeros(len(ids), 1, dtype=torch.long),
                            (targets != IGNORE).long()], dim=1)
    zeros = torch.zeros(targets.shape)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                              is_top1=zeros.bool())
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "completion_mask": completion, "ref_chosen_logps": batch["ref_chosen"],
              "ref_rejected_logps": batch["ref_rejected"]}
    loss = t._compute_loss(lambda **kwargs: outputs, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in t._metrics["train"].items()}


@pytest.mark.parametrize("loss, reduction, smoothing, trl_loss", [
    ("sigmoid", "sum", 0.0, "sigmoid"), ("ipo", "sum", 0.0, "ipo"),
    ("sigmoid", "mean", 0.0, "sigmoid_norm")])
def test_loss_and_figures_equal_trls_on_the_same_logprobs(
        loss: str, reduction: str, smoothing: float, trl_loss: str, tiny_run: Path) -> None:
    pytest.importorskip("trl")
    tok = BPETokenizer.load(tiny_run / "final")
    encoded, _ = encode_pairs(PAIRS, get_template("alpaca"), tok, 128, 64)
    for p, (c, r) in zip(encoded, [(-30.0, -35.0), (-12.0, -9.0), (-20.0, -41.0)]):
        p.ref_chosen, p.ref_rejected = c, r
    batch = collate_pairs(encoded, tok.eot_id)
    torch.manual_seed(0)
    logits = torch.randn(*batch["idx"].shape, tok.vocab_size) * 2
    section = DPOSection(beta=0.1, loss=loss, reduction=reduction, label_smoothing=smoothing)
    objective = DPOObjective({"train": encoded}, section, tok.eot_id, None, {})
    ours, count = objective.loss(FixedModel(logits), {}, batch)
    figures = objective.step_metrics()
    per_token = token_logprobs(logits, batch["targets"])
    theirs, metrics = trl_dpo(trl_loss, 0.1, smoothing, batch, per_token)
    assert count == 3
    assert (ours / count).item() == pytest.approx(theirs.item(), rel=1e-6)
    if reduction == "sum":  # TRL logs summed log-probs and rewards; "mean" differs there
        for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies",
                     "rewards/margins", "logps/chosen", "logps/rejected"):
            assert figures[name] == pytest.approx(metrics[name], rel=1e-6, abs=1e-7), name
    assert 0 < figures["rewards/accuracies"] < 1  # both outcomes occur in the batch


def test_dpo_loss_written_out() -> None:
    c, r = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])
    beta = 0.1
    want = [-torch.nn.functional.logsigmoid(torch.tensor(beta * (a - b))).item()
            for a, b in zip(c.tolist(), r.tolist())]
    assert dpo_loss(c, r, beta).tolist() == pytest.approx(want, rel=1e-6)
    assert dpo_loss(c, r, beta, "ipo").tolist() == pytest.approx(
        [(1.5 - 5) ** 2, (-2 - 5) ** 2], rel=1e-6)
    # Conservative DPO (Mitchell 2023): TRL 1.x's sigmoid loss no longer takes label
    # smoothing, so the written-out formula is the reference.
    eps = 0.1
    want = [-(1 - eps) * math.log(1 / (1 + math.exp(-beta * (a - b))))
            - eps * math.log(1 / (1 + math.exp(beta * (a - b))))
            for a, b in zip(c.tolist(), r.tolist())]
    assert dpo_loss(c, r, beta, "sigmoid", eps).tolist() == pytest.approx(want, rel=1e-6)


SPLIT = "--dpo.split=[0.6, 0.1, 0.3]"


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    from test_align_data import write_pairs

    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 160)


def dpo_args(model: Path, out: Path, data: Path, *extra: str) -> list[str]:
    return ["align", "dpo", "--model", str(model), "--data", str(data), "--out",
            str(out), "--quiet", "--train.max_steps=24", "--train.epochs=0", "--train.lr=1e-3",
            "--train.micro_batch=8", "--train.eval_every=12", "--dpo.sample_prompts=2",
            "--dpo.max_new_tokens=8", "--dpo.max_length=96", SPLIT, *extra]


@pytest.mark.slow
def test_dpo_moves_held_out_rewards_and_stores_the_reference(sft_model: Path,
                                                             pairs_file: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "dpo"
    assert main(dpo_args(sft_model, out, pairs_file)) == 0
    held = json.loads((out / "metrics.json").read_text())
    before, after = held["before"], held["after"]
    assert before["rewards/accuracies"] == 0 and before["rewards/margins"] == 0  # π = π_ref
    assert after["rewards/accuracies"] > 0.6 and after["rewards/margins"] > 0.05, after
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and "val_rewards/accuracies" in rows[11]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
            "logps/rejected"} <= set(rows[0])
    # The stored reference log-probs are the starting model's.
    from scratchlm.align.data import pair_splits
    from scratchlm.model.load import load_pretrained
    from scratchlm.templates import load_template

    stored = json.loads((out / "reference_logps.json").read_text())
    model, tok, _ = load_pretrained(sft_model)
    splits, _ = pair_splits(str(pairs_file), [0.6, 0.1, 0.3], 123, "error", "dpo")
    encoded, _ = encode_pairs(splits["val"][:4], load_template(sft_model), tok, 96, 48)
    batch = collate_pairs(encoded, tok.eot_id)
    with torch.no_grad():
        logps = sequence_logprobs(model(batch["idx"])[0], batch["targets"])
    assert logps.tolist() == pytest.approx(
        [c for c, _ in stored["val"][:4]] + [r for _, r in stored["val"][:4]], abs=1e-4)
    table = (out / "responses.md").read_text()
    assert table.startswith("| prompt | chosen | rejected | before | after |")
    assert len(table.splitlines()) == 4
    assert (out / "final" / "template.json").is_file()


def test_a_live_reference_gives_the_precomputed_losses(sft_model: Path, pairs_file: Path,
                                                       tmp_path: Path) -> None:
    from helpers import losses

    args = ["--train.max_steps=3", "--train.eval_every=0", "--dpo.sample_prompts=0"]
    assert main(dpo_args(sft_model, tmp_path / "stored", pairs_file, *args)) == 0
    assert main(dpo_args(sft_model, tmp_path / "live", pairs_file, *args,
                         "--dpo.reference=live")) == 0
    assert losses(tmp_path / "live") == pytest.approx(losses(tmp_path / "stored"), abs=1e-5)
    assert not (tmp_path / "live" / "reference_logps.json").exists()


def bad_pairs(tmp_path: Path, kind: str) -> Path:
    rows = [{"prompt": f"Say {w}.", "chosen": w, "rejected": w[::-1] + "?"}
            for w in ("hi", "yes", "no", "thanks", "farewell", "anon", "good", "morrow")] * 3
    if kind == "identical":
        rows[4] = {"prompt": "Say so.", "chosen": "so", "rejected": "so"}
    if kind == "empty":
        rows[2] = {"prompt": "Say so.", "chosen": "so", "rejected": ""}
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind, message", [
    ("identical", "record 5 has the same chosen and rejected response (1 such record(s)), "
                  "which teaches nothing; remove them or pass --dpo.identical=drop"),
    ("empty", "record 3: the rejected response is empty"),
    ("tokenizer", "has another tokenizer than the policy"),
    ("batch", "fewer than one global batch"),  # refused by the loop, after the reference ran
])
def test_bad_input_is_one_line_and_writes_nothing(kind: str, message: str, sft_model: Path,
                                                  tiny_run: Path, tmp_path: Path,
                                                  capsys) -> None:
    out = tmp_path / "out"
    args = dpo_args(sft_model, out, bad_pairs(tmp_path, kind))
    if kind == "tokenizer":  # the base model lacks the chat tokens the SFT model added
        args += ["--ref-model", str(tiny_run)]
    if kind == "batch":
        args += ["--train.micro_batch=64"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_dpo_on_a_lora_model_trains_the_whole_model(tiny_run: Path, pairs_file: Path,
                                                    tmp_path: Path) -> None:
    """A LoRA SFT run (its base frozen while it trained) loads as a plain model for DPO, its
    adapters folded in, every parameter trainable."""
    from scratchlm.config import SFTConfig, load_config
    from scratchlm.finetune.sft import run_sft

    cfg = load_config(SFTConfig, None, [
        f"--sft.model={tiny_run}", "--sft.data=builtin:continue", "--sft.template=chat",
        "--train.max_steps=2", "--train.epochs=0", "--train.eval_every=0", "--lora.rank=4",
        "--sft.eval_examples=1", "--sft.max_new_tokens=1"])
    run_sft(cfg, tmp_path / "sft", progress=False)
    out = tmp_path / "dpo"
    assert main(dpo_args(tmp_path / "sft", out, pairs_file, "--train.max_steps=2",
                         "--train.eval_every=0")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["trainable_parameters"] == summary["parameters"]


def test_identical_pairs_can_be_dropped(sft_model: Path, tmp_path: Path, capsys) -> None:
    args = dpo_args(sft_model, tmp_path / "out", bad_pairs(tmp_path, "identical"),
                    "--dpo.identical=drop", "--train.max_steps=1", "--train.eval_every=0",
                    "--dpo.sample_prompts=0", "--dpo.split=[0.5, 0.25, 0.25]")
    assert main(args) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert sum(summary["pairs"].values()) == 23


def parity_args(model: Path, data: Path) -> list[str]:
    return ["align", "dpo", "--model", str(model), "--data", str(data), "--quiet", SPLIT,
            "--train.max_steps=6", "--train.epochs=0", "--train.lr=1e-3",
            "--train.micro_batch=2", "--train.global_batch=8", "--train.eval_every=3",
            "--train.checkpoint_every=2", "--dpo.sample_prompts=0", "--dpo.max_length=80"]


@pytest.mark.distributed
def test_ddp_equals_one_process(sft_model: Path, pairs_file: Path, tmp_path: Path) -> None:
    """Two processes on the same global batch of 8 pairs: every step's loss equals one
    process's to 1e-5, and so do the final weights."""
    from safetensors.torch import load_file

    from helpers import SCRATCHLM, losses, torchrun

    args = parity_args(sft_model, pairs_file)
    subprocess.run(SCRATCHLM + args + ["--out", str(tmp_path / "one")], check=True,
                   capture_output=True)
    torchrun(*args, "--out", str(tmp_path / "two"), "--parallel.dp=2")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == 6 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=5e-4, rtol=1e-3)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(sft_model: Path, pairs_file: Path,
                                                      tmp_path: Path) -> None:
    from helpers import losses, sigkill_then_resume

    whole, killed = sigkill_then_resume(parity_args(sft_model, pairs_file), tmp_path, 2,
                                        ["model.safetensors"])
    assert losses(killed) == losses(whole)
