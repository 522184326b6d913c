"""Rollouts on the one training loop, for PPO and GRPO.

The objective's batches come from rollouts of the current policy: when the last rollout has
been used up, the loader samples responses to the next `rollout.batch` training prompts
through the KV cache (scratchlm.generate, every prompt with a generator of its own), scores
them (the reward source), computes the old policy's and the reference's log-probs (and PPO's
values) in batched forward passes, and hands the whole rollout to the objective, which
computes the advantages. Its responses are then served as minibatches of train.global_batch,
`epochs` passes in a seeded order: each minibatch is one optimizer step of the loop.

Data parallelism: each rank samples and scores its slice of the rollout's prompts, then every
rank gathers the whole rollout, so whitening and advantages are over the global batch and
every rank holds the same state. Each response is sampled with a seed drawn from (train.seed,
rollout, its place in the rollout), so what it is does not depend on the number of ranks or
on what shares its batch.

Resume: the rollout in use (token ids, old log-probs, values, advantages, returns) is part of
the loader's state in every checkpoint, and the KL coefficient part of the objective's, so a
resumed run finishes the rollout's remaining minibatches and then samples the next rollout
with the same seeds as a run left alone: the weights are bitwise those of an uninterrupted run
(CPU, fp32).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from scratchlm.align.common import StepMeter, disable_dropout, load_reference, md_cell
from scratchlm.align.data import Messages, Seq, collate_sequences, prompt_splits, resolve_template
from scratchlm.align.rewards import RewardSource
from scratchlm.config import RolloutSection
from scratchlm.errors import ScratchError
from scratchlm.model.gpt import GPT
from scratchlm.model.logprobs import IGNORE, token_logprobs
from scratchlm.parallel import init_distributed, is_main, print0
from scratchlm.templates import Template, save_template
from scratchlm.train.checkpoint import list_checkpoints
from scratchlm.train.objective import Objective
from scratchlm.utils import atomic_write_text

SCORE_BATCH = 16
SAMPLES = 5  # held-out responses shown before and after in responses.md
EVAL_STREAM = 1 << 30  # seeds of held-out samples: apart from every rollout's


@dataclass
class Experience:
    """One sampled response and what the update needs of it, per response token."""

    prompt: int
    """Index of its prompt in the training prompts."""
    prompt_ids: list[int]
    response_ids: list[int]
    ended: bool
    """It ended with a stop token (else it was cut at max_new_tokens)."""
    score: float = 0.0
    entropy: float = 0.0
    """Mean entropy (nats) of the policy's next-token distribution over the response."""
    logps: list[float] = field(default_factory=list)
    """log π_old of each response token, at sampling time."""
    ref_logps: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    advantages: list[float] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)

    @property
    def seq(self) -> Seq:
        return Seq(self.prompt_ids + self.response_ids, len(self.prompt_ids))


def seed_of(seed: int, stream: int, position: int) -> int:
    """A sampling seed for one response, the same whatever else is sampled with it."""
    return int(np.random.default_rng([seed, stream, position]).integers(2 ** 62))


def left_aligned(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (B, L), mask (B, L)) of per-token lists, each row from column 0."""
    L = max(len(r) for r in rows)
    out = torch.zeros(len(rows), L)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    return out, mask


def on_targets(batch: dict, rows: list[list[float]]) -> torch.Tensor:
    """Per-response-token lists placed where `collate_sequences` put the response tokens in
    the targets (B, T)."""
    out = torch.zeros(batch["targets"].shape)
    mask = batch["targets"] != IGNORE
    out[mask] = torch.tensor([v for r in rows for v in r])
    return out


# ------------------------------------------------------------------------------------------------
# the loader


class RolloutLoader:
    """The loop's batches for PPO/GRPO (see the module docstring): rank `rank`'s micro-batches
    of `micro_batch` responses, a new rollout when the last is used up."""

    def __init__(self, objective: RLObjective, micro_batch: int, seed: int, rank: int,
                 world_size: int) -> None:
        self.obj, self.micro, self.seed = objective, micro_batch, seed
        self.rank, self.world = rank, world_size
        prompts = objective.rollout.batch
        if len(objective.prompts["train"]) < prompts:
            raise ScratchError(f"{len(objective.prompts['train'])} training prompts are fewer "
                               f"than one rollout of rollout.batch={prompts}; give more "
                               "prompts or lower rollout.batch")
        if prompts % world_size:
            raise ScratchError(f"rollout.batch ({prompts}) must be a multiple of the "
                               f"data-parallel ranks ({world_size})")
        from scratchlm.data.loader import EpochOrder

        self.prompts = EpochOrder(len(objective.prompts["train"]), prompts // world_size, seed,
                                  rank, world_size)
        self.rollout = -1  # index of the rollout in use
        self.chunk = 0  # micro-batch chunks of it already served (over all ranks)
        self.buffer: list[Experience] = []
        self.stats: dict[str, float] = {}

    @property
    def chunks(self) -> int:
        """Micro-batch chunks (micro_batch x ranks responses) a rollout serves, all epochs."""
        return self.obj.epochs * len(self.buffer) // (self.micro * self.world)

    def next_batch(self) -> dict:
        if not self.buffer or self.chunk >= self.chunks:
            self.rollout, self.chunk = self.rollout + 1, 0
            offset = self.rank * (self.obj.rollout.batch // self.world)
            local = self.obj.sample_rollout(self.prompts.next(), self.rollout, offset)
            self.buffer, self.stats = self.obj.settle(gather(local))
        per_epoch = len(self.buffer) // (self.micro * self.world)
        epoch, k = divmod(self.chunk, per_epoch)
        order = np.random.default_rng([self.seed, self.rollout, epoch]).permutation(
            len(self.buffer))
        start = (k * self.world + self.rank) * self.micro
        self.chunk += 1
        return self.obj.collate([self.buffer[int(i)] for i in order[start:start + self.micro]])

    def state_dict(self) -> dict:
        return {"prompts": self.prompts.state_dict(), "rollout": self.rollout,
                "chunk": self.chunk, "stats": self.stats,
                "buffer": [dataclasses.asdict(e) for e in self.buffer]}

    def load_state_dict(self, state: dict) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self.rollout, self.chunk = state["rollout"], state["chunk"]
        self.stats = state["stats"]
        self.buffer = [Experience(**e) for e in state["buffer"]]


def gather(local: list[Experience]) -> list[Experience]:
    """Every rank's experiences, in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [e for part in parts for e in part]


# ------------------------------------------------------------------------------------------------
# the objective


class RLObjective(Objective):
    """What PPO and GRPO share: prompts, sampling, scoring, the reference, evaluation on
    held-out prompts, figures and plots. A subclass sets `group` (responses per prompt) and
    `epochs`, and supplies `settle` (advantages), `loss`, `count` and its plot panels."""

    group = 1
    epochs = 1
    panels: list[tuple[str, list[str]]] = []

    def __init__(self, policy: GPT, reference: GPT, reward: RewardSource, tokenizer,
                 template: Template, prompts: dict[str, list[Messages]],
                 rollout: RolloutSection, seed: int) -> None:
        super().__init__()
        self.policy, self.reference, self.reward = policy, reference, reward
        self.tokenizer, self.template, self.rollout = tokenizer, template, rollout
        self.prompts, self.seed = prompts, seed
        self.stops = template.stop_ids(tokenizer)
        self.pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0
        block = policy.config.block_size
        self.max_prompt = rollout.max_prompt_length or block - rollout.max_new_tokens
        if self.max_prompt < 1 or self.max_prompt + rollout.max_new_tokens > block:
            raise ScratchError(f"rollout.max_prompt_length ({self.max_prompt}) + "
                               f"rollout.max_new_tokens ({rollout.max_new_tokens}) must fit "
                               f"in the model's context ({block}); lower them")
        self.ids = {split: [self.encode(p) for p in ps] for split, ps in prompts.items()}
        self.meter = StepMeter()
        self.loader: RolloutLoader | None = None
        self.before: dict[str, float] = {}
        self.val_before: dict[str, float] = {}  # the curve's step 0: evaluations are on val
        self.samples: list[dict] = []  # the first held-out responses of the last evaluation
        self.samples_before: list[dict] = []

    def encode(self, prompt: Messages) -> list[int]:
        """Prompt ids ready for the response, cut from the left to max_prompt tokens."""
        ids, _ = self.template.encode(self.tokenizer, prompt, add_generation_prompt=True)
        return ids[-self.max_prompt:]

    # --- sampling and scoring -------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], seeds: list[int]
                 ) -> list[tuple[list[int], bool]]:
        """(response ids, ended) per prompt, sampled through the KV cache in one batch."""
        from scratchlm.generate import Generation, run_all

        r = self.rollout
        gens = [Generation(list(p), r.max_new_tokens, r.temperature, r.top_k, r.top_p, s,
                           stop_ids=self.stops) for p, s in zip(prompt_ids, seeds)]
        was_training = self.policy.training
        run_all(self.policy, gens, max_batch=64)
        self.policy.train(was_training)
        return [(g.tokens, g.finish_reason == "stop") for g in gens]

    @torch.no_grad()
    def forward_scores(self, model: GPT, seqs: list[Seq], value_head: nn.Module | None = None
                       ) -> tuple[list[list[float]], list[list[float]], list[float]]:
        """Per sequence: log-probs of its response tokens, values there (with a value head),
        and the mean entropy of the model's distribution over them."""
        device = next(model.parameters()).device
        logps, values, entropies = [], [], []
        was_training = model.training
        model.eval()
        for i in range(0, len(seqs), SCORE_BATCH):
            batch = {k: v.to(device) for k, v in
                     collate_sequences(seqs[i:i + SCORE_BATCH], self.pad_id).items()}
            logits, hidden = model(batch["idx"])
            mask = batch["targets"] != IGNORE
            lp = token_logprobs(logits, batch["targets"])
            ent = entropy(logits)
            v = value_head(hidden).squeeze(-1).float() if value_head is not None else None
            for row in range(mask.size(0)):
                m = mask[row]
                logps.append(lp[row][m].tolist())
                entropies.append(ent[row][m].mean().item())
                values.append(v[row][m].tolist() if v is not None else [])
        model.train(was_training)
        return logps, values, entropies

    def score(self, prompt_index: list[int], exps: list[Experience]) -> None:
        prompts = [self.prompts["train"][i] for i in prompt_index]
        texts = [self.text(e) for e in exps]
        for e, s in zip(exps, self.reward(prompts, texts)):
            e.score = s - (0.0 if e.ended else self.rollout.missing_eos_penalty)

    def text(self, e: Experience) -> str:
        ids = e.response_ids[:-1] if e.ended else e.response_ids
        return self.tokenizer.decode(ids)

    def value_head(self) -> nn.Module | None:
        return None

    def sample_rollout(self, prompt_index, rollout: int, offset: int) -> list[Experience]:
        """This rank's experiences of a rollout: `group` responses to each of its prompts
        (`offset`: the place of its first prompt in the rollout)."""
        index = [int(i) for i in prompt_index for _ in range(self.group)]
        seeds = [seed_of(self.seed, rollout, (offset * self.group) + k)
                 for k in range(len(index))]
        responses = self.generate([self.ids["train"][i] for i in index], seeds)
        exps = [Experience(i, self.ids["train"][i], r, ended) for i, (r, ended)
                in zip(index, responses)]
        seqs = [e.seq for e in exps]
        logps, values, entropies = self.forward_scores(self.policy, seqs, self.value_head())
        ref, _, _ = self.forward_scores(self.reference, seqs)
        for e, lp, v, rl, h in zip(exps, logps, values, ref, entropies):
            e.logps, e.values, e.ref_logps, e.entropy = lp, v, rl, h
        self.score(index, exps)
        return exps

    # --- what subclasses supply -------------------------------------------------------------

    def settle(self, exps: list[Experience]) -> tuple[list[Experience], dict[str, float]]:
        """Advantages (and returns) of a whole rollout; its figures."""
        raise NotImplementedError

    def collate(self, exps: list[Experience]) -> dict[str, torch.Tensor]:
        batch = collate_sequences([e.seq for e in exps], self.pad_id)
        for name in ("logps", "ref_logps", "advantages", "returns", "values"):
            if getattr(exps[0], name):
                batch[name] = on_targets(batch, [getattr(e, name) for e in exps])
        return batch

    # --- the loop's interface ----------------------------------------------------------------

    def batches(self, micro_batch: int, seed: int, rank: int, world_size: int
                ) -> RolloutLoader:
        self.loader = RolloutLoader(self, micro_batch, seed, rank, world_size)
        return self.loader

    def step_metrics(self) -> dict[str, float]:
        return {**(self.loader.stats if self.loader else {}), **self.meter.means()}

    def held_out(self, split: str) -> dict[str, float]:
        """Mean reward, KL to the reference (nats per response) and length of responses
        sampled for held-out prompts (the same seeds every time; split over ranks)."""
        n = self.rollout.eval_prompts or len(self.ids[split])
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        mine = list(range(rank, min(n, len(self.ids[split])), world))
        totals = torch.zeros(4, dtype=torch.float64)
        if mine:
            ids = [self.ids[split][i] for i in mine]
            responses = self.generate(ids, [seed_of(self.seed, EVAL_STREAM, i) for i in mine])
            exps = [Experience(i, p, r, ended) for i, p, (r, ended) in
                    zip(mine, ids, responses)]
            seqs = [e.seq for e in exps]
            logps, _, _ = self.forward_scores(self.policy, seqs)
            ref, _, _ = self.forward_scores(self.reference, seqs)
            texts = [self.text(e) for e in exps]
            scores = self.reward([self.prompts[split][i] for i in mine], texts)
            self.samples = [{"prompt": self.prompts[split][i][-1]["content"], "response": t,
                             "reward": s} for i, t, s in zip(mine, texts, scores)][:SAMPLES]
            totals += torch.tensor([sum(scores), sum(sum(a) - sum(b) for a, b in
                                                     zip(logps, ref)),
                                    sum(len(e.response_ids) for e in exps), len(exps)],
                                   dtype=torch.float64)
        if dist.is_initialized():
            device = next(self.policy.parameters()).device
            totals = totals.to(device)
            dist.all_reduce(totals)
        reward, kl, length, count = totals.tolist()
        return {"reward": reward / count, "kl": kl / count, "length": length / count}

    def evaluate(self, runtime) -> dict[str, float]:
        return self.held_out("val")

    def measure_before(self, split: str) -> None:
        self.before = self.held_out(split)
        self.samples_before = self.samples
        self.val_before = (self.held_out("val") if split != "val" and self.ids["val"]
                           else self.before)

    def state_dict(self) -> dict:
        return {"before": self.before, "val_before": self.val_before,
                "samples_before": self.samples_before}

    def load_state_dict(self, state: dict) -> None:
        self.before = state.get("before", {})
        self.val_before = state.get("val_before", self.val_before)
        self.samples_before = state.get("samples_before", [])

    def finish(self, runtime, out: Path, summary: dict) -> None:
        split = "test" if self.ids["test"] else "val"
        summary["held_out"] = {"split": split, "before": self.before,
                               "after": self.held_out(split), "val_before": self.val_before}
        summary["prompts"] = {k: len(v) for k, v in self.ids.items()}
        if not is_main():
            return
        save_template(self.template, out / "final")
        atomic_write_text(out / "metrics.json", json.dumps(summary["held_out"], indent=2))
        write_samples(out / "responses.md", self.samples_before, self.samples)
        from scratchlm.train.metrics import plot_curves

        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        plot_curves(rows, out / "rl.png", f"{self.name}: reward {self.reward.name}",
                    self.panels)


def write_samples(path: Path, before: list[dict], after: list[dict]) -> None:
    """A Markdown table of held-out responses (rank 0's first prompts) before and after."""
    lines = ["| prompt | before | reward | after | reward |", "|---|---|---|---|---|"]
    lines += [f"| {md_cell(b['prompt'])} | {md_cell(b['response'])} | {b['reward']:.3f} | "
              f"{md_cell(a['response'])} | {a['reward']:.3f} |" for b, a in zip(before, after)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, T) entropy of the next-token distribution at each position, in nats."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


# ------------------------------------------------------------------------------------------------
# the stage


def run_rl(cfg, section, make_objective, out: Path, resume: bool, progress: bool,
           tag: str) -> dict:
    """Set up and run PPO or GRPO (`make_objective(policy, reference, reward, tokenizer,
    template, prompts)` builds the objective). The held-out reward of the starting policy is
    measured before anything is written, which also tries the reward source."""
    from scratchlm.model.load import load_pretrained
    from scratchlm.train.trainer import Trainer, resolve_device, start_run

    if not section.model:
        raise ScratchError("no model: pass --model DIR (an SFT model, a run or a Hugging Face "
                           "directory)")
    if cfg.parallel.zero >= 2 or cfg.parallel.tp > 1 or cfg.parallel.pp > 1:
        raise ScratchError(f"{tag.upper()} samples rollouts from the whole model on every "
                           "rank: use data parallelism with --parallel.zero=0 or 1")
    if (done := start_run(out, resume, cfg.train.max_steps)) is not None:
        return done
    prompts = prompt_splits(section.data, section.split, section.seed)
    for split in ("train", "val"):
        if not prompts[split]:
            raise ScratchError(f"the {split} split has no prompts; give more prompts or "
                               f"change {tag}.split")
    device = resolve_device(cfg.train.device)
    policy, tokenizer, source = load_pretrained(section.model, tokenizer=section.tokenizer)
    dist_info = init_distributed(device, cfg.parallel, policy.config)
    if dist_info.world_size > 1 and device.startswith("cuda"):
        device = f"cuda:{dist_info.local_rank}"
    template = resolve_template(section.template, source)
    disable_dropout(policy)
    reference = load_reference(section.ref_model, policy, tokenizer, tag).to(device)
    policy.to(device)
    reward = RewardSource(section.reward_model, section.reward, device, tag)
    torch.manual_seed(cfg.train.seed)  # the value head's initialisation
    objective = make_objective(policy, reference, reward, tokenizer, template, prompts)
    items = cfg.rollout.batch * objective.group
    minibatch = cfg.train.global_batch or cfg.train.micro_batch * dist_info.dp
    if items % minibatch:
        raise ScratchError(f"a rollout of {items} responses must split into minibatches of "
                           f"train.global_batch ({minibatch}); change rollout.batch or "
                           "train.global_batch")
    split = "test" if objective.ids["test"] else "val"
    if not (resume and list_checkpoints(out)):  # a resumed run has them in its checkpoint
        objective.measure_before(split)  # before the layout wraps the policy
    trainer = Trainer(cfg.train, cfg.parallel, policy, objective, out, cfg, tokenizer, resume,
                      progress, dist_info)
    b = objective.before
    print0(f"[{tag}] {source}: {template.name} template, reward {reward.name}; prompts "
           + ", ".join(f"{k} {len(v):,}" for k, v in prompts.items())
           + f"; held-out ({split}) before: reward {b['reward']:.3f}, length "
           f"{b['length']:.1f}; {trainer.max_steps} steps of {trainer.global_batch} responses, "
           f"{math.ceil(trainer.max_steps * trainer.global_batch / (items * objective.epochs))}"
           f" rollouts of {items}")
    return trainer.run()
