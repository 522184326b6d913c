"""Pipeline parallelism (GPipe, Huang et al. 2019; 1F1B, Narayanan et al. 2019) through
`torch.distributed.pipelining`.

The blocks are split into pp consecutive stages, one per rank; the first stage also holds the
embeddings, the last the final norm and the head. Each optimizer step's micro-batches flow
through them: GPipe runs every forward, then every backward; 1F1B starts backwards as soon as
the last stage has a micro-batch's loss, so a stage holds at most pp micro-batches of
activations instead of all of them. Either way a stage idles for (pp - 1) / (micro-batches +
pp - 1) of the step (the "bubble"), so use several times more micro-batches than stages.

A stage is the model itself with the other stages' parts removed: parameter names stay those
of the whole model, so checkpoints are gathered and loaded by name. A tied head (GPT-2) lives
on the first and the last stage at once; their gradients are summed after each backward, so
the two copies get the same updates and stay equal.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from scratchlm.model.gpt import GPT, tied_weights
from scratchlm.parallel import DistInfo


def cut_stage(model: GPT, stage: int, stages: int) -> GPT:
    """Keep, in place, the part of `model` that pipeline stage `stage` of `stages` runs."""
    per = model.config.n_layer // stages
    keep = {str(i) for i in range(stage * per, (stage + 1) * per)}
    for name in list(model.blocks):
        if name not in keep:
            model.blocks.pop(name)
    if stage > 0:
        model.tok_emb, model.pos_emb = None, None
    if stage < stages - 1:
        model.norm_f, model.lm_head = None, None
    return model


class _Outputs(nn.Module):
    """The stage as `PipelineStage` wants it: one tensor in, one tensor out."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, hidden = self.model(x)
        return hidden if logits is None else logits  # the last stage: logits


class Pipeline:
    def __init__(self, model: GPT, info: DistInfo, device: str, micro_batches: int,
                 schedule: str, loss_fn) -> None:
        """`loss_fn(logits, targets)` -> (summed loss, count): the objective's token loss."""
        self.model, self.device = model, device
        stage, stages = info.coord("pp"), info.pp
        self.first, self.last = stage == 0, stage == stages - 1
        self.group = info.group("pp")
        ranks = info.mesh.mesh  # (pp, dp, tp) global ranks
        here = (ranks == info.rank).nonzero()[0].tolist()
        self.prev = int(ranks[here[0] - 1, here[1], here[2]]) if not self.first else None
        self.next = int(ranks[here[0] + 1, here[1], here[2]]) if not self.last else None
        self.stage = PipelineStage(_Outputs(model), stage, stages,
                                   torch.device(device), group=self.group)
        make = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
        # Each micro-batch's summed loss times the step's scale (the data-parallel ranks over
        # the global count of items); the schedule must not average over micro-batches too.
        self.scale = 1.0
        self.schedule = make(self.stage, micro_batches, scale_grads=False,
                             loss_fn=lambda logits, y: loss_fn(logits, y)[0] * self.scale)
        # The tied embedding/head pair: a group of the first and last stage of each pipeline.
        self.tied, self.tie_group = None, None
        if tied_weights(model):
            for d in range(ranks.size(1)):
                for t in range(ranks.size(2)):
                    pair = [int(ranks[0, d, t]), int(ranks[-1, d, t])]
                    g = dist.new_group(pair)  # every rank creates every group, in order
                    if info.rank in pair:
                        self.tie_group = g
            if self.first:
                self.tied = model.tok_emb.weight
            elif self.last:
                self.tied = model.lm_head.weight

    def train_step(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
        """Forward and backward of one step's micro-batches (x, y: (micro_batches * B, T)),
        each summed loss times `scale`. Returns the summed loss, on every stage."""
        self.scale = scale
        losses: list[torch.Tensor] = []
        if self.first:
            self.schedule.step(x)
        elif self.last:
            self.schedule.step(target=y, losses=losses)
        else:
            self.schedule.step()
        if self.tied is not None and self.tied.grad is not None:
            dist.all_reduce(self.tied.grad, group=self.tie_group)
        loss = torch.stack(losses).sum().detach().float() / scale if self.last else \
            torch.zeros((), device=self.device)
        dist.all_reduce(loss, group=self.group)  # the last stage's loss, everywhere
        return loss

    @torch.no_grad()
    def forward_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """Logits (B, T, vocab) on the last stage (None elsewhere), passing hidden states from
        stage to stage; for evaluation, one batch at a time."""
        cfg = self.model.config
        if self.first:
            h = x
        else:
            h = torch.empty(x.size(0), x.size(1), cfg.n_embd, device=x.device)
            dist.recv(h, src=self.prev)
        logits, hidden = self.model(h)
        if self.last:
            return logits
        dist.send(hidden.float().contiguous(), dst=self.next)
        return None
