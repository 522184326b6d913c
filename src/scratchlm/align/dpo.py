"""Direct preference optimisation (Rafailov et al. 2023): the policy is trained on preference
pairs directly, with the reference model's log-probs standing in for a reward model.

`scratchlm align dpo --model SFT --data FILE|builtin:NAME --out DIR` -> RUN/
  final/                 the policy, its tokenizer and template.json
  reference_logps.json   the reference's log-probs of every pair, computed before training
  metrics.json           held-out (test) figures before and after training
  responses.md, .jsonl   greedy answers to held-out prompts before and after
  curves.png, loss.png, metrics.jsonl/.csv, summary.json, checkpoints/

With Δ = (log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r)) per pair:
- sigmoid: -(1 - ε) log σ(βΔ) - ε log σ(-βΔ) (ε: conservative DPO's label smoothing);
- ipo: (Δ' - 1/(2β))², Δ' taken on per-token log-ratios (sum / response length), as TRL
  computes IPO with the IPO authors' normalisation.
A response's log-probability is the sum over its tokens (dpo.reduction=sum, the default: the
paper's likelihood ratio and TRL's, so β means what it means there) or their mean (the book's
chapter). Metrics carry TRL's names: rewards/chosen and rewards/rejected (β times each side's
log-ratio), rewards/accuracies (how often the chosen reward is the larger), rewards/margins,
logps/chosen, logps/rejected.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.align.common import StepMeter, disable_dropout, load_reference, md_cell
from scratchlm.align.data import (
    EncodedPair,
    Pair,
    collate_pairs,
    encode_pairs,
    length_limits,
    pair_splits,
    resolve_template,
)
from scratchlm.config import DPOConfig, DPOSection
from scratchlm.errors import ScratchError
from scratchlm.model.gpt import GPT
from scratchlm.model.logprobs import IGNORE, sequence_logprobs
from scratchlm.parallel import init_distributed, is_main, print0
from scratchlm.templates import Template, save_template
from scratchlm.train.objective import ExampleObjective
from scratchlm.utils import atomic_write_text

EVAL_BATCH = 8
REFERENCE_FILE = "reference_logps.json"


def dpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    """(B,) the loss of each pair from its two log-ratios log π - log π_ref (for ipo, per
    token)."""
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * delta) \
            - label_smoothing * F.logsigmoid(-beta * delta)
    if loss_type == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {loss_type!r}")


def response_logps(model: GPT, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's response (2B,), its number of tokens (2B,))."""
    logits, _ = model(batch["idx"])
    return sequence_logprobs(logits, batch["targets"], "sum"), \
        (batch["targets"] != IGNORE).sum(-1)


class DPOObjective(ExampleObjective):
    name = "DPO"

    def __init__(self, data: dict[str, list[EncodedPair]], section: DPOSection, pad_id: int,
                 reference: GPT | None, stats: dict) -> None:
        super().__init__(data)
        self.section, self.pad_id, self.stats = section, pad_id, stats
        self.reference = reference  # held only with dpo.reference=live
        self.meter = StepMeter()
        self.before: dict = {}
        self.samples: tuple[list[Pair], list[str]] = ([], [])
        self.tokenizer = self.template = None

    def collate(self, pairs: list[EncodedPair]) -> dict[str, torch.Tensor]:
        return collate_pairs(pairs, self.pad_id)

    def count(self, batch: dict) -> int:
        return len(batch["ref_chosen"])

    def reduce(self, summed: torch.Tensor, n: torch.Tensor, per_token: bool = False
               ) -> torch.Tensor:
        """A response's log-prob as the loss wants it: summed, or per token."""
        return summed / n.clamp(min=1) if per_token or self.section.reduction == "mean" \
            else summed

    def pair_terms(self, model: GPT, batch: dict) -> dict[str, torch.Tensor]:
        """Losses (B,) and the figures of each pair of a batch."""
        s = self.section
        logps, n = response_logps(model, batch)
        if self.reference is not None:
            self.reference.to(batch["idx"].device)
            with torch.no_grad():
                ref, _ = response_logps(self.reference, batch)
        else:
            ref = torch.cat([batch["ref_chosen"], batch["ref_rejected"]]).to(logps.device)
        per_token = s.loss == "ipo"
        ratios = self.reduce(logps, n, per_token) - self.reduce(ref, n, per_token)
        chosen, rejected = ratios.chunk(2)
        losses = dpo_loss(chosen, rejected, s.beta, s.loss, s.label_smoothing)
        # Rewards are β times the log-ratios in the configured reduction, as TRL logs them.
        rewards = (self.reduce(logps, n) - self.reduce(ref, n)).detach() * s.beta
        policy = self.reduce(logps, n).detach()
        return {"loss": losses, "chosen": rewards.chunk(2)[0], "rejected": rewards.chunk(2)[1],
                "logps_chosen": policy.chunk(2)[0], "logps_rejected": policy.chunk(2)[1]}

    def loss(self, model: GPT, extras: nn.ModuleDict, batch: dict
             ) -> tuple[torch.Tensor, int]:
        t = self.pair_terms(model, batch)
        for name, value in pair_figures(t).items():
            self.meter.add(name, value * len(t["loss"]), len(t["loss"]))
        return t["loss"].sum(), len(t["loss"])

    def step_metrics(self) -> dict[str, float]:
        return self.meter.means()

    def _terms_fn(self, model: GPT, extras: nn.ModuleDict, batch: dict) -> dict:
        return self.pair_terms(model, batch)

    @torch.no_grad()
    def split_metrics(self, runtime, pairs: list[EncodedPair]) -> dict[str, float]:
        parts: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(pairs), EVAL_BATCH):
            batch = {k: v.to(runtime.device) for k, v in
                     self.collate(pairs[i:i + EVAL_BATCH]).items()}
            with runtime.autocast():
                terms = runtime.call(self._terms_fn, batch)
            for k, v in terms.items():
                parts.setdefault(k, []).append(v.float().cpu())
        return pair_figures({k: torch.cat(v) for k, v in parts.items()})

    def evaluate(self, runtime) -> dict[str, float]:
        return self.split_metrics(runtime, self.data["val"])

    def measure_before(self, runtime, prompts: list[Pair]) -> None:
        """Held-out figures and sample answers of the policy as it starts."""
        was_training = runtime.module.training
        runtime.module.eval()
        self.before = self.split_metrics(runtime, self.data["test"] or self.data["val"])
        pairs = prompts[:self.section.sample_prompts]
        replies = self.answers(runtime, pairs)
        runtime.module.train(was_training)
        self.samples = (pairs, replies)

    def answers(self, runtime, pairs: list[Pair]) -> list[str]:
        """Greedy answers to the pairs' prompts (every rank runs the forward passes, as a
        sharded layout needs; the answers are used on rank 0)."""
        if not runtime.whole or not pairs:
            return []
        return runtime.call(lambda model, _: answer(model, self.tokenizer, self.template,
                                                    pairs, self.section.max_new_tokens))

    def state_dict(self) -> dict:
        pairs, replies = self.samples
        return {"before": self.before, "samples": [
            {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "reply": r}
            for p, r in zip(pairs, replies)]}

    def load_state_dict(self, state: dict) -> None:
        self.before = state.get("before", {})
        rows = state.get("samples", [])
        self.samples = ([Pair(r["prompt"], r["chosen"], r["rejected"]) for r in rows],
                        [r["reply"] for r in rows])

    def finish(self, runtime, out: Path, summary: dict) -> None:
        runtime.module.eval()
        held_out = self.data["test"] or self.data["val"]
        after = self.split_metrics(runtime, held_out)
        summary["held_out"] = {"before": self.before, "after": after, "pairs": len(held_out)}
        summary["pairs"] = {k: len(v) for k, v in self.data.items()}
        summary["length"] = self.stats
        pairs, before = self.samples
        replies = self.answers(runtime, pairs)
        if not is_main():
            return
        save_template(self.template, out / "final")
        atomic_write_text(out / "metrics.json", json.dumps(summary["held_out"], indent=2))
        write_responses(out, pairs, before, replies)
        from scratchlm.train.metrics import plot_curves

        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        plot_curves(rows, out / "curves.png", f"DPO ({self.section.loss}, β "
                    f"{self.section.beta:g})",
                    [("loss", ["loss", "val_loss"]),
                     ("rewards/accuracies", ["rewards/accuracies", "val_rewards/accuracies"]),
                     ("rewards (β log-ratio)", ["rewards/chosen", "rewards/rejected",
                                                "rewards/margins", "val_rewards/margins"])])


def pair_figures(t: dict[str, torch.Tensor]) -> dict[str, float]:
    """Means over pairs, under TRL's names (plus `loss`)."""
    chosen, rejected = t["chosen"], t["rejected"]
    return {"loss": t["loss"].mean().item(),
            "rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
            "rewards/accuracies": (chosen > rejected).float().mean().item(),
            "rewards/margins": (chosen - rejected).mean().item(),
            "logps/chosen": t["logps_chosen"].mean().item(),
            "logps/rejected": t["logps_rejected"].mean().item(),
            # How often the policy itself prefers the chosen response (no reference): the
            # one of these figures that is not 0 before training.
            "logps/accuracies": (t["logps_chosen"] > t["logps_rejected"]).float().mean().item()}


@torch.no_grad()
def reference_logps(model: GPT, pairs: list[EncodedPair], pad_id: int, device: str) -> None:
    """Fill in each pair's reference log-probs (summed over its response's tokens)."""
    model.to(device)
    for i in range(0, len(pairs), EVAL_BATCH):
        chunk = pairs[i:i + EVAL_BATCH]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
        logps, _ = response_logps(model, batch)
        chosen, rejected = logps.float().cpu().chunk(2)
        for p, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
            p.ref_chosen, p.ref_rejected = c, r


def answer(model: GPT, tokenizer, template: Template, pairs: list[Pair], max_new_tokens: int
           ) -> list[str]:
    from scratchlm.finetune.sft import respond

    return respond(model, tokenizer, template, [p.prompt for p in pairs], max_new_tokens)


def write_responses(out: Path, pairs: list[Pair], before: list[str], after: list[str]) -> None:
    rows = [{"prompt": p.prompt[-1]["content"], "chosen": p.chosen, "rejected": p.rejected,
             "before": b, "after": a} for p, b, a in zip(pairs, before, after)]
    atomic_write_text(out / "responses.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    lines = ["| prompt | chosen | rejected | before | after |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(md_cell(r[k]) for k in ("prompt", "chosen", "rejected", "before",
                                                        "after")) + " |" for r in rows]
    atomic_write_text(out / "responses.md", "\n".join(lines) + "\n")


def stored_reference(out: Path, data: dict[str, list[EncodedPair]]) -> bool:
    """Load the reference log-probs a run wrote before (resuming it); False if there are none
    or they are of other pairs."""
    path = out / REFERENCE_FILE
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())
    if {k: len(v) for k, v in saved.items()} != {k: len(v) for k, v in data.items()}:
        raise ScratchError(f"{path} holds reference log-probs of other pairs; resume with the "
                           "data and settings the run started with")
    for split, pairs in data.items():
        for p, (c, r) in zip(pairs, saved[split]):
            p.ref_chosen, p.ref_rejected = c, r
    return True


# ------------------------------------------------------------------------------------------------
# the stage


def run_dpo(cfg: DPOConfig, out: Path, resume: bool = False, progress: bool = True) -> dict:
    """Train cfg.dpo.model on preference pairs with DPO into `out`."""
    from scratchlm.model.load import load_pretrained
    from scratchlm.train.trainer import Trainer, resolve_device, start_run

    section = cfg.dpo
    if not section.model:
        raise ScratchError("no model: pass --model DIR (an SFT model, a run or a Hugging Face "
                           "directory)")
    if (done := start_run(out, resume, None if cfg.train.epochs else cfg.train.max_steps)) \
            is not None:
        return done
    splits, identical = pair_splits(section.data, section.split, section.seed,
                                    section.identical, "dpo")
    model, tokenizer, source = load_pretrained(section.model, tokenizer=section.tokenizer)
    template = resolve_template(section.template, source)
    device = resolve_device(cfg.train.device)
    dist = init_distributed(device, cfg.parallel, model.config)
    if dist.world_size > 1 and device.startswith("cuda"):
        device = f"cuda:{dist.local_rank}"
    max_length, max_prompt = length_limits(section.max_length, section.max_prompt_length,
                                           model.config.block_size, "dpo")
    data, stats = {}, {}
    for split, pairs in splits.items():
        data[split], stats[split] = encode_pairs(pairs, template, tokenizer, max_length,
                                                 max_prompt)
    for split in ("train", "val"):
        if not data[split]:
            raise ScratchError(f"the {split} split has no pairs; give more pairs or change "
                               "dpo.split")
    disable_dropout(model)
    reference = load_reference(section.ref_model, model, tokenizer, "dpo").to(device)
    pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0
    print0(f"[dpo] {source}: {template.name} template, {section.loss} loss, β {section.beta}, "
           f"{section.reduction} of token log-probs; pairs "
           + ", ".join(f"{k} {len(v):,}" for k, v in data.items())
           + (f"; {identical} identical pair(s) dropped" if identical else "")
           + f"; over {max_length} tokens: "
           + ", ".join(f"{k} {s['cut']} cut, {s['dropped']} dropped" for k, s in stats.items()))
    live = section.reference == "live"
    computed = not live and not (resume and stored_reference(out, data))
    if computed:
        for pairs in data.values():
            reference_logps(reference, pairs, pad_id, device)
    objective = DPOObjective(data, section, pad_id, reference if live else None, stats)
    objective.tokenizer, objective.template = tokenizer, template
    del reference
    trainer = Trainer(cfg.train, cfg.parallel, model, objective, out, cfg, tokenizer, resume,
                      progress, dist)
    if computed and dist.is_main:  # only once the loop has accepted the run: nothing written
        atomic_write_text(out / REFERENCE_FILE, json.dumps(  # by a run refused at its start
            {k: [[p.ref_chosen, p.ref_rejected] for p in v] for k, v in data.items()}))
    if not objective.before:  # a new run (a resumed one kept them in its checkpoint)
        objective.measure_before(trainer.runtime, splits["test"] or splits["val"])
    b = objective.before
    print0(f"[dpo] held-out before: rewards/accuracies {b['rewards/accuracies']:.3f}, "
           f"margin {b['rewards/margins']:.3f}, policy prefers chosen "
           f"{b['logps/accuracies']:.1%}; {trainer.max_steps} steps of "
           f"{trainer.global_batch} pairs")
    return trainer.run()
