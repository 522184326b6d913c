"""`parallelize`: a plain model and a layout in, a Runtime out: everything the training loop
must not know about the layout.

Order of application (torchtitan's): cut the model to this rank's pipeline stage, split it
over the tensor-parallel ranks, wrap blocks for activation checkpointing, compile, shard over
the data-parallel ranks (ZeRO-2/3), or wrap in DDP (alone or under ZeRO-1). The Runtime then
runs a step's micro-batches (gradient sync on the last one only), settles gradients after the
backward pass (tensor-parallel layouts, hand-averaged data parallelism, a pipeline's tied
head), clips them across shards and stages, and sums figures over data-parallel ranks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable

import torch
import torch.utils.checkpoint

from scratchlm.errors import ScratchError
from scratchlm.model.gpt import GPT, tied_weights
from scratchlm.parallel import DistInfo
from scratchlm.train.objective import TrainModule
from scratchlm.train.optim import build_optimizer, clip_gradients

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def apply_activation_checkpointing(model: GPT) -> GPT:
    """Recompute each block's activations in the backward pass instead of keeping them (Chen
    et al. 2016): in training, a block's forward runs under torch.utils.checkpoint. Applied to
    a plain model in place, parameter names unchanged."""
    for block in model.blocks.values():
        def forward(x, rope=None, cache=None, *rest, plain=block.forward, block=block):
            if block.training and cache is None and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(plain, x, rope, cache, *rest,
                                                         use_reentrant=False)
            return plain(x, rope, cache, *rest)

        block.forward = forward
    return model


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def require_cpu_compiler(device: str) -> None:
    """On a CPU torch.compile's inductor builds C++ kernels with `$CXX` (g++ by default) at the
    first step, where a missing compiler ends the run in a long trace: refuse in one line."""
    if not device.startswith("cpu"):
        return
    cxx = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
    if shutil.which(cxx) is None:
        raise ScratchError(f"train.compile=true on the CPU needs a C++ compiler ({cxx}, or the "
                           "one $CXX names) and none was found: install it (Debian: apt-get "
                           "install g++) or set train.compile=false")


class Runtime:
    """A TrainModule laid out over this job's processes (see `parallelize`)."""

    def __init__(self, module: TrainModule, info: DistInfo, parallel, device: str,
                 precision: str, micro_batches: int, compile: bool = False,
                 activation_checkpointing: bool = False) -> None:
        self.module, self.info, self.device, self.precision = module, info, device, precision
        self.dtype = DTYPES[precision]
        self.zero = parallel.zero if info.dp > 1 else 0
        model = module.model
        if (info.tp > 1 or info.pp > 1) and not module.objective.token_level:
            raise ScratchError(f"{module.objective.name} trains under data parallelism (DDP, "
                               "ZeRO-1/2/3); tensor and pipeline parallelism take token-level "
                               "objectives only: use --parallel.dp")
        module.to(device)
        self.pipeline = None
        if info.pp > 1:
            from scratchlm.parallel.pipeline import cut_stage

            if self.dtype == torch.float16:
                raise ScratchError("fp16 loss scaling does not reach inside pipeline "
                                   "schedules; use --train.precision=bf16 (or fp32) with "
                                   "parallel.pp")
            if parallel.pp_schedule == "1f1b" and micro_batches < info.pp:
                raise ScratchError(
                    f"the 1F1B schedule needs at least as many micro-batches per step as "
                    f"stages ({micro_batches} < {info.pp}); raise the global batch or lower "
                    "train.micro_batch")
            cut_stage(model, info.coord("pp"), info.pp)
        if info.tp > 1:
            from scratchlm.parallel.tensor import apply_tp

            apply_tp(model, info.mesh["tp"], parallel.sequence_parallel)
        if activation_checkpointing:
            apply_activation_checkpointing(model)
        if info.dp > 1 and self.zero >= 2:
            from scratchlm.parallel.fsdp import apply_fsdp

            # The TrainModule is the root: every forward pass that uses the model (the loss,
            # evaluation, samples) goes through it, so its own parameters are gathered.
            apply_fsdp(module, model, info.mesh["dp"], self.zero,
                       None if self.dtype == torch.float32 else self.dtype)
        if info.pp > 1:
            from scratchlm.parallel.pipeline import Pipeline

            self.pipeline = Pipeline(model, info, device, micro_batches,
                                     parallel.pp_schedule, module.objective.token_loss)
        compiled = compile and not self.pipeline
        if compiled:
            require_cpu_compiler(device)
        self.forward: Callable = torch.compile(module) if compiled else module
        # Gradients averaged over data-parallel ranks: by DDP (alone or under ZeRO-1), by FSDP
        # (ZeRO-2/3), or by hand after the backward pass when tensor or pipeline parallelism
        # also runs (DDP's wrapper does not take DTensor parameters or pipeline stages).
        self.average_by_hand = info.dp > 1 and self.zero == 0 and info.tp * info.pp > 1
        if info.dp > 1 and self.zero <= 1 and not self.average_by_hand:
            from scratchlm.parallel.ddp import apply_ddp

            self.forward = apply_ddp(self.forward, device, info.group("dp"))
        # The tied head on the last pipeline stage is the first stage's embedding: count its
        # gradient once in the norm.
        duplicate = {f"model.{n}" for n in tied_weights(model)} \
            if self.pipeline and not self.pipeline.first else set()
        self.norm_params = [p for n, p in module.named_parameters() if n not in duplicate]

    # --------------------------------------------------------------------------------------------

    @property
    def model(self) -> GPT:
        return self.module.model

    @property
    def whole(self) -> bool:
        """The whole model is on this rank (sharded or not): it can generate text."""
        return self.info.tp == self.info.pp == 1

    @property
    def stage_group(self):
        """The pipeline stages, each holding part of the model; None without stages."""
        return self.info.group("pp") if self.pipeline else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.split(":")[0], dtype=self.dtype)

    def build_optimizer(self, groups: list[dict], lr: float, betas: tuple[float, float],
                        eps: float, momentum: float = 0.95) -> torch.optim.Optimizer:
        """The optimizer of `groups` (see train/optim.py), sharded under ZeRO-1: there each
        rank steps whole parameters of its own, so Muon orthogonalises whole matrices."""
        optimizer = build_optimizer(groups, lr, betas, eps, momentum)
        if self.zero == 1:
            from scratchlm.parallel.zero1 import ZeroOneOptimizer

            optimizer = ZeroOneOptimizer(optimizer, self.info.group("dp"))
        return optimizer

    def _sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Data parallel: gradients are averaged over processes once, on the last micro-step."""
        if self.zero >= 2:
            self.module.set_requires_gradient_sync(last)
        elif hasattr(self.forward, "no_sync") and not last:
            return self.forward.no_sync()
        return contextlib.nullcontext()

    def forward_backward(self, batches: list[dict], scale: float,
                         backward: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """Forward and backward over one step's micro-batches, each summed loss multiplied by
        `scale` before `backward`; returns this rank's summed loss (detached)."""
        if self.pipeline:  # the step's micro-batches go through the stages together
            idx = torch.cat([b["idx"] for b in batches]).to(self.device)
            targets = torch.cat([b["targets"] for b in batches]).to(self.device)
            with self.autocast():
                return self.pipeline.train_step(idx, targets, scale)
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            with self._sync(i == len(batches) - 1):
                with self.autocast():
                    loss, _ = self.forward(to_device(batch, self.device))
                backward(loss * scale)
            total += loss.detach().float()
        return total

    def finish_backward(self) -> None:
        """Bring every gradient to where the optimizer expects it."""
        if self.info.tp > 1:
            from scratchlm.parallel.tensor import settle_gradients

            settle_gradients(self.model)
        from scratchlm.parallel.ddp import average_gradients

        if self.average_by_hand:
            average_gradients(list(self.module.parameters()), self.info.group("dp"))

    def clip(self, max_norm: float) -> torch.Tensor:
        return clip_gradients(self.norm_params, max_norm, self.stage_group)

    def sum_over_dp(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of a per-rank figure over the data-parallel ranks (the ranks of one
        tensor-parallel group or one pipeline hold the same value)."""
        if self.info.dp == 1:
            return value
        value = value.to(self.device)
        torch.distributed.all_reduce(value, group=self.info.group("dp"))
        return value

    def call(self, fn: Callable, *args):
        """`fn(model, extras, *args)` run inside the module's forward, where a sharded layout
        (FSDP) has gathered the weights: evaluation and samples go through here."""
        return self.module(args, fn=lambda model, extras, a: fn(model, extras, *a))

    def logits(self, idx: torch.Tensor) -> torch.Tensor | None:
        """Logits of a batch for evaluation: on the last pipeline stage only (None on the
        others), hidden states passed from stage to stage."""
        if self.pipeline:
            return self.pipeline.forward_logits(idx)
        return self.call(lambda model, extras, x: model(x)[0], idx)


def parallelize(module: TrainModule, info: DistInfo, parallel, device: str, precision: str,
                micro_batches: int, compile: bool = False,
                activation_checkpointing: bool = False) -> Runtime:
    """Apply a layout to a plain TrainModule, in place; see Runtime."""
    return Runtime(module, info, parallel, device, precision, micro_batches, compile,
                   activation_checkpointing)
