"""What a stage hands the one training loop: an objective.

The loop (train/trainer.py) owns everything a stage should not have to write again:
micro-batches and accumulation, mixed precision, clipping, the schedule, the optimizer,
non-finite steps, checkpoints and exact resume, metrics, progress, plots, every parallel
layout. An objective supplies what differs:

- `batches(...)`: its training batches, rank-aware and resumable (`state_dict`);
- `loss(model, extras, batch)`: the loss of a batch as a *sum* plus the number of items it
  covers (unmasked tokens, examples, pairs). The loop divides the summed gradient by the count
  over the whole global batch (every micro-batch, every data-parallel rank), as torchtitan's
  `global_valid_tokens` and TRL's `num_items_in_batch` do, so accumulation and data
  parallelism give the gradient of one big batch whatever the padding;
- `evaluate(runtime)`: validation metrics (a "loss" among them picks the best checkpoint);
- `sample(model, step)`: a text sample at each evaluation, if it has one;
- `param_groups(module)`: what trains and with which weight decay;
- `extras`: modules of its own (a classification head, a value head) trained with the model
  and saved beside it as NAME.safetensors;
- `step_metrics()`: figures of its own for the step just taken (PPO's KL, clip fraction),
  logged beside the loss;
- `finish(runtime, out, summary)`: its final outputs (test metrics, plots, label maps).

A new stage is one file with one Objective subclass; pretraining is one (train/pretrain.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from scratchlm.data.loader import ExampleLoader
from scratchlm.model.gpt import GPT
from scratchlm.train.optim import param_groups


class Batches(Protocol):
    def next_batch(self) -> dict: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Objective:
    name = "training"
    """Shown on the progress bar and the loss plot."""
    token_level = False
    """True when the loss is `token_loss` of the model's logits alone (no extras): such an
    objective also runs under tensor and pipeline parallelism."""

    def __init__(self) -> None:
        self.extras: dict[str, nn.Module] = {}

    # --- training data ----------------------------------------------------------------------

    def batches(self, micro_batch: int, seed: int, rank: int, world_size: int) -> Batches:
        """This data-parallel rank's training batches, `micro_batch` items each."""
        raise NotImplementedError

    def global_batch(self, train_cfg) -> int:
        """Items per optimizer step over all ranks (0 = one micro-batch on each)."""
        return train_cfg.global_batch

    def train_size(self) -> int | None:
        """Training items per epoch, when the stage has a fixed set (for train.epochs)."""
        return None

    def count(self, batch: dict) -> int:
        """The number of items the loss of `batch` covers, known before its forward pass."""
        return int((batch["targets"] != -100).sum())

    def tokens(self, batch: dict) -> int:
        """Positions a forward pass over `batch` computes (for tokens/s and MFU)."""
        return batch["idx"].numel()

    # --- the loss ----------------------------------------------------------------------------

    def loss(self, model: GPT, extras: nn.ModuleDict, batch: dict
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, items counted) of one micro-batch."""
        logits, _ = model(batch["idx"])
        return self.token_loss(logits, batch["targets"])

    def token_loss(self, logits: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """For token-level objectives: the summed loss of logits against targets (the
        pipeline's last stage computes it from its logits)."""
        raise NotImplementedError

    # --- what else a stage decides ------------------------------------------------------------

    def param_groups(self, module: TrainModule, weight_decay: float) -> list[dict]:
        """Optimizer groups over the parameters that train (requires_grad); a group's
        "lr_scale" multiplies the scheduled learning rate."""
        return param_groups(module, weight_decay)

    def evaluate(self, runtime) -> dict[str, float]:
        """Validation metrics; {} when the stage has no validation data."""
        return {}

    def sample(self, model: GPT, step: int) -> str:
        return ""

    def step_metrics(self) -> dict[str, float]:
        """Figures of the step just taken, logged with it (the objective gathers them during
        `loss` and resets them here)."""
        return {}

    def finish(self, runtime, out: Path, summary: dict) -> None:
        """Final outputs, after the model is saved (every rank calls it; rank 0 writes)."""

    def state_dict(self) -> dict:
        """Stage state to resume besides the batches (a KL controller, say)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TrainModule(nn.Module):
    """The model and the objective's extra modules as one module, whose forward is the
    objective's loss: the unit that parallel layouts wrap (DDP must see the whole loss
    computation inside one forward call), compile and checkpoint. Parameter names are
    "model.*" and "extras.NAME.*"."""

    def __init__(self, model: GPT, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.extras = nn.ModuleDict(objective.extras)
        self.objective = objective

    def forward(self, batch: dict, fn=None):
        """The objective's loss of `batch`, or `fn(model, extras, batch)` (evaluation through
        the same wrapper)."""
        return (fn or self.objective.loss)(self.model, self.extras, batch)


class ExampleObjective(Objective):
    """An objective over a fixed set of examples per split (classification, SFT, reward
    models, DPO): the training split drawn in seeded epochs by an ExampleLoader, each
    micro-batch made by `collate`."""

    def __init__(self, data: dict[str, list]) -> None:
        super().__init__()
        self.data = data

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        """A micro-batch of tensors from a list of examples."""
        raise NotImplementedError

    def batches(self, micro_batch: int, seed: int, rank: int, world_size: int) -> Batches:
        return ExampleLoader(self.data["train"], self.collate, micro_batch, seed, rank,
                             world_size)

    def train_size(self) -> int:
        return len(self.data["train"])
