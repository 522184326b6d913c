"""The reward model: an SFT model with a scalar head read at the last real token, trained on
preference pairs with the Bradley–Terry loss -log σ(r_chosen - r_rejected) (Ouyang et al.
2022; TRL's RewardTrainer).

`scratchlm align reward --model SFT --data FILE|builtin:NAME --out DIR` -> RUN/
  final/          the model, classifier.safetensors (the one-output head), classifier.json
                  (kind "reward", pad id, length), template.json, the tokenizer;
                  `scratchlm convert --to-hf` exports it as a one-label
                  ...ForSequenceClassification whose logit is the score
  metrics.json    loss, pairwise accuracy and mean margin on train, val and test (held out)
  curves.png, loss.png, metrics.jsonl/.csv, summary.json, checkpoints/

The head is classification's (scratchlm.finetune.classify: a bias-free linear layer on the
final hidden state, `pool`, `class_logits`), with one output. The score is read at the
response's last token, before its end-of-turn token: that is where a Hugging Face sequence
classifier reads when the padding token is <|endoftext|> (the last non-padding token), as TRL's
reward models do (they append EOS and pad with it), and it scores a response cut at a length
limit and one that ended on the same footing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.align.common import StepMeter, disable_dropout
from scratchlm.align.data import (
    EncodedPair,
    Messages,
    Seq,
    encode_pairs,
    fit,
    length_limits,
    pair_splits,
    resolve_template,
    split_turn,
)
from scratchlm.config import RewardConfig, RewardSection
from scratchlm.errors import ScratchError
from scratchlm.finetune.classify import (
    HEAD,
    class_logits,
    classifier_meta,
    load_head,
    new_head,
    set_trainable,
)
from scratchlm.model.gpt import GPT
from scratchlm.parallel import init_distributed, is_main, print0
from scratchlm.templates import Template, save_template
from scratchlm.train.objective import ExampleObjective
from scratchlm.utils import atomic_write_text

EVAL_BATCH = 16
KIND = "reward"


def scored_ids(seq: Seq, end_id: int | None) -> list[int]:
    """The tokens a reward model reads: prompt and response without its end-of-turn token."""
    if end_id is not None and len(seq.ids) > 1 and seq.ids[-1] == end_id:
        return seq.ids[:-1]
    return seq.ids


def collate_scored(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids (N, T) and lengths (N,), as classification collates them."""
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = torch.tensor(r)
    return {"idx": idx, "lengths": torch.tensor([len(r) for r in rows])}


def scores(model: GPT, head: nn.Module, batch: dict) -> torch.Tensor:
    """(N,) the scalar reward of each row, read at its last real token."""
    return class_logits(model, head, batch, "last")[:, 0]


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, center: float = 0.0
                  ) -> torch.Tensor:
    """Summed -log σ(r_c - r_r) over pairs, plus center * (r_c + r_r)² (TRL's reward
    centring, which pins the scores' free offset near zero)."""
    loss = -F.logsigmoid(chosen - rejected).sum()
    if center:
        loss = loss + center * ((chosen + rejected) ** 2).sum()
    return loss


class RewardObjective(ExampleObjective):
    name = "reward model"

    def __init__(self, model: GPT, data: dict[str, list[EncodedPair]], section: RewardSection,
                 template: Template, tokenizer, limits: tuple[int, int], stats: dict) -> None:
        super().__init__(data)
        self.section, self.stats = section, stats
        self.template, self.limits = template, limits
        self.pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0
        self.end_id = tokenizer.special_tokens.get(template.end)
        self.extras = {HEAD: new_head(model, 1)}
        set_trainable(model, section.trainable, section.last_blocks)
        self.meter = StepMeter()

    def collate(self, pairs: list[EncodedPair]) -> dict[str, torch.Tensor]:
        """2B rows: the B chosen sequences, then the B rejected ones."""
        rows = [scored_ids(p.chosen, self.end_id) for p in pairs] + \
            [scored_ids(p.rejected, self.end_id) for p in pairs]
        return collate_scored(rows, self.pad_id)

    def count(self, batch: dict) -> int:
        return len(batch["lengths"]) // 2

    def tokens(self, batch: dict) -> int:
        return batch["idx"].numel()

    def loss(self, model: GPT, extras: nn.ModuleDict, batch: dict
             ) -> tuple[torch.Tensor, int]:
        chosen, rejected = scores(model, extras[HEAD], batch).chunk(2)
        with torch.no_grad():
            n = len(chosen)
            self.meter.add("accuracy", (chosen > rejected).sum(), n)
            self.meter.add("margin", (chosen - rejected).sum(), n)
            self.meter.add("mean_reward", (chosen + rejected).sum(), 2 * n)
        return bradley_terry(chosen, rejected, self.section.center_rewards), n

    def step_metrics(self) -> dict[str, float]:
        return self.meter.means()

    def _scores_fn(self, model: GPT, extras: nn.ModuleDict, batch: dict) -> torch.Tensor:
        return scores(model, extras[HEAD], batch)

    @torch.no_grad()
    def pair_scores(self, runtime, pairs: list[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) scores of every pair, through the laid-out module."""
        out = []
        for i in range(0, len(pairs), EVAL_BATCH):
            batch = {k: v.to(runtime.device) for k, v in
                     self.collate(pairs[i:i + EVAL_BATCH]).items()}
            with runtime.autocast():
                out.append(torch.stack(runtime.call(self._scores_fn, batch).float()
                                       .chunk(2), dim=1).cpu())
        both = torch.cat(out)
        return both[:, 0], both[:, 1]

    def split_metrics(self, runtime, split: str) -> dict:
        chosen, rejected = self.pair_scores(runtime, self.data[split])
        return pair_metrics(chosen, rejected)

    def evaluate(self, runtime) -> dict[str, float]:
        m = self.split_metrics(runtime, "val")
        return {k: m[k] for k in ("loss", "accuracy", "margin")}

    def finish(self, runtime, out: Path, summary: dict) -> None:
        runtime.module.eval()
        metrics = {s: self.split_metrics(runtime, s) for s in self.data if self.data[s]}
        summary["metrics"] = metrics
        summary["pairs"] = {k: len(v) for k, v in self.data.items()}
        summary["length"] = self.stats
        if not is_main():
            return
        write_reward_meta(out / "final", self.template, self.pad_id, *self.limits)
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        from scratchlm.train.metrics import plot_curves

        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        plot_curves(rows, out / "curves.png", "reward model",
                    [("Bradley-Terry loss", ["loss", "val_loss"]),
                     ("pairwise accuracy", ["accuracy", "val_accuracy"]),
                     ("margin r_chosen - r_rejected", ["margin", "val_margin"])])


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Mean Bradley–Terry loss, pairwise accuracy (r_c > r_r), mean margin and mean score."""
    n = len(chosen)
    return {"loss": bradley_terry(chosen, rejected).item() / n,
            "accuracy": (chosen > rejected).float().mean().item(),
            "margin": (chosen - rejected).mean().item(),
            "mean_reward": torch.cat([chosen, rejected]).mean().item(), "pairs": n}


def write_reward_meta(directory: Path, template: Template, pad_id: int, max_length: int,
                      max_prompt_length: int) -> None:
    """classifier.json (read by `convert --to-hf` and `RewardModel`) and template.json."""
    meta = {"kind": KIND, "labels": ["reward"], "pooling": "last", "pad_id": pad_id,
            "max_length": max_length, "max_prompt_length": max_prompt_length}
    atomic_write_text(directory / "classifier.json", json.dumps(meta, indent=2))
    save_template(template, directory)


# ------------------------------------------------------------------------------------------------
# the stage


def run_reward(cfg: RewardConfig, out: Path, resume: bool = False, progress: bool = True
               ) -> dict:
    """Train a reward model from cfg.reward.model on preference pairs into `out`."""
    from scratchlm.model.load import load_pretrained
    from scratchlm.train.trainer import Trainer, resolve_device, start_run

    section = cfg.reward
    if not section.model:
        raise ScratchError("no model: pass --model DIR (an SFT model, a run or a Hugging Face "
                           "directory)")
    if (done := start_run(out, resume, None if cfg.train.epochs else cfg.train.max_steps)) \
            is not None:
        return done
    splits, identical = pair_splits(section.data, section.split, section.seed,
                                    section.identical, "reward")
    model, tokenizer, source = load_pretrained(section.model, tokenizer=section.tokenizer)
    template = resolve_template(section.template, source)
    dist = init_distributed(resolve_device(cfg.train.device), cfg.parallel, model.config)
    max_length, max_prompt = length_limits(section.max_length, section.max_prompt_length,
                                           model.config.block_size, "reward")
    data, stats = {}, {}
    for split, pairs in splits.items():
        data[split], stats[split] = encode_pairs(pairs, template, tokenizer, max_length,
                                                 max_prompt)
    for split in ("train", "val"):
        if not data[split]:
            raise ScratchError(f"the {split} split has no pairs; give more pairs or change "
                               "reward.split")
    print0(f"[reward] {source}: {template.name} template; pairs "
           + ", ".join(f"{k} {len(v):,}" for k, v in data.items())
           + (f"; {identical} identical pair(s) dropped" if identical else "")
           + f"; over {max_length} tokens: "
           + ", ".join(f"{k} {s['cut']} cut, {s['dropped']} dropped" for k, s in stats.items()))
    disable_dropout(model)
    torch.manual_seed(cfg.train.seed)  # the head's initialisation
    objective = RewardObjective(model, data, section, template, tokenizer,
                                (max_length, max_prompt), stats)
    trainer = Trainer(cfg.train, cfg.parallel, model, objective, out, cfg, tokenizer, resume,
                      progress, dist)
    trainable = trainer.trainable_parameters
    print0(f"[reward] training {trainable:,} parameters ({section.trainable}), "
           f"{trainer.max_steps} steps of {trainer.global_batch} pairs")
    return trainer.run()


# ------------------------------------------------------------------------------------------------
# using a trained reward model


class RewardModel:
    """A reward model trained by `align reward`, loaded from its run or model directory, that
    scores (prompt, response) pairs rendered with its own template."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        from scratchlm.model.load import load_pretrained
        from scratchlm.templates import load_template

        self.model, self.tokenizer, d = load_pretrained(path, device)
        meta = classifier_meta(d)
        if meta.get("kind") != KIND:
            raise ScratchError(f"{d} is not a reward model (no classifier.json of kind "
                               f"'reward'); train one with `scratchlm align reward`")
        self.head = load_head(d, self.model, 1).to(device)
        self.template = load_template(d)
        self.pad_id = meta["pad_id"]
        self.max_length, self.max_prompt_length = meta["max_length"], meta["max_prompt_length"]
        self.end_id = self.tokenizer.special_tokens.get(self.template.end)
        self.device = device

    def encode(self, prompt: Messages, response: str) -> list[int]:
        p, r = split_turn(self.template, self.tokenizer, prompt, response)
        p, r, _ = fit(p, r, self.max_length, self.max_prompt_length)
        return scored_ids(Seq(p + r, len(p)), self.end_id)

    @torch.no_grad()
    def score(self, prompts: list[Messages], responses: list[str]) -> torch.Tensor:
        """(N,) scores of each prompt's response, on the CPU."""
        rows = [self.encode(p, r) for p, r in zip(prompts, responses)]
        out = []
        for i in range(0, len(rows), EVAL_BATCH):
            batch = {k: v.to(self.device) for k, v in
                     collate_scored(rows[i:i + EVAL_BATCH], self.pad_id).items()}
            out.append(scores(self.model, self.head, batch).cpu())
        return torch.cat(out) if out else torch.zeros(0)
