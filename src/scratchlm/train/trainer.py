"""The training loop every stage reuses.

One optimizer step: `accumulation` micro-batches forward and backward (the loss of each divided
by their number, so the summed gradient is the mean over the global batch), unscale (fp16),
clip the global norm, set this step's learning rate, AdamW step. Steps whose loss or gradient
is not finite are skipped and counted; too many in a row stop the run, its last good
checkpoint intact. Evaluation, samples, metrics, checkpoints and the loss plot happen here too.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from scratchlm.config import Config, save_config
from scratchlm.data.loader import TokenLoader, iter_eval_windows
from scratchlm.errors import ScratchError
from scratchlm.eval.perplexity import evaluate_batches, token_byte_lengths
from scratchlm.memory import held_bytes
from scratchlm.model.checkpoint import save_model
from scratchlm.model.gpt import GPT
from scratchlm.parallel import DistInfo, barrier, mean_over_ranks, parallelize, print0
from scratchlm.parallel.ddp import average_gradients
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.metrics import MetricsLogger, memory_gb, peak_flops, plot_losses
from scratchlm.train.optim import build_optimizer, clip_gradients
from scratchlm.train.schedule import lr_at
from scratchlm.utils import atomic_write_text

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ScratchError(f"train.device is {name!r} but no CUDA device is available; "
                           "use --train.device=cpu")
    return name


def resolve_precision(name: str, device: str) -> str:
    """auto: bf16 on a GPU that supports it, else fp32 (bf16 matmuls are slow on most CPUs)."""
    if name == "auto":
        return "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    return name


class Trainer:
    def __init__(self, cfg: Config, model: GPT, tokenizer, data_dir: Path, out: Path,
                 fingerprint: str, resume: bool = False, progress: bool = True,
                 dist: DistInfo | None = None) -> None:
        t = cfg.train
        self.cfg, self.tokenizer, self.data_dir, self.out = cfg, tokenizer, data_dir, out
        self.dist = dist or DistInfo()
        self.main = self.dist.is_main
        self.progress = progress and self.main
        self.device = resolve_device(t.device)
        if self.device == "cuda" and self.dist.world_size > 1:
            self.device = f"cuda:{self.dist.local_rank}"
        self.precision = resolve_precision(t.precision, self.device)
        info = self.dist
        self.zero = cfg.parallel.zero if info.dp > 1 else 0
        self.model = model.to(self.device)
        self.model.checkpointing = t.activation_checkpointing
        block = model.config.block_size
        per_micro = t.micro_batch * block * info.dp  # one micro-batch on every data-parallel rank
        target = t.global_batch_tokens or per_micro
        if target % per_micro:
            raise ScratchError(
                f"train.global_batch_tokens ({target}) must be a multiple of micro_batch x "
                f"block_size x data-parallel ranks ({t.micro_batch} x {block} x {info.dp} = "
                f"{per_micro})")
        self.accumulation = target // per_micro
        self.tokens_per_step = target
        # Ranks of one tensor-parallel group or one pipeline read the same batches.
        self.loader = TokenLoader(data_dir, "train", block, t.micro_batch, seed=t.seed,
                                  rank=info.coord("dp"), world_size=info.dp,
                                  tokenizer_fingerprint=fingerprint)
        self.n_params = model.num_params()
        self.flops_per_step = model.flops_per_token(block) * self.tokens_per_step
        # Pipeline stage, tensor-parallel split, FSDP shards: before the optimizer sees them.
        self.pipeline = parallelize(model, info, cfg.parallel, self.device,
                                    DTYPES[self.precision], self.accumulation)
        self.optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)
        if self.zero == 1:
            from scratchlm.parallel.zero1 import ZeroOneOptimizer

            self.optimizer = ZeroOneOptimizer(self.optimizer, info.group("dp"))
        self.scaler = torch.amp.GradScaler(self.device.split(":")[0],
                                           enabled=self.precision == "fp16")
        self.forward = torch.compile(model) if t.compile and not self.pipeline else model
        # Gradients averaged over data-parallel ranks: by DDP (alone or under ZeRO-1), by FSDP
        # (ZeRO-2/3), or by hand after the backward pass when tensor or pipeline parallelism
        # also runs (DDP's wrapper does not take DTensor parameters or pipeline stages).
        self.average_by_hand = info.dp > 1 and self.zero == 0 and info.tp * info.pp > 1
        if info.dp > 1 and self.zero <= 1 and not self.average_by_hand:
            from scratchlm.parallel.ddp import apply_ddp

            self.forward = apply_ddp(self.forward, self.device, info.group("dp"))
        # The tied head on the last pipeline stage is the first stage's embedding: count its
        # gradient once in the norm.
        self.norm_params = [p for n, p in model.named_parameters()
                            if not (self.pipeline and n == "lm_head.weight" and
                                    model.config.tie_embeddings and not self.pipeline.first)]
        self.byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
        # MFU counts every process's device: the peak of one, measured, times their number.
        self.peak = peak_flops(self.device, DTYPES[self.precision]) * info.world_size
        self.step, self.tokens_seen = 0, 0
        self.held: dict[str, int] | None = None
        self.best_val, self.best_step = math.inf, -1
        self.bad_in_row, self.skipped = 0, 0
        self.logger = MetricsLogger(out, resume) if self.main else None
        if resume:
            self._resume()

    # --------------------------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.split(":")[0], dtype=DTYPES[self.precision])

    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns its metrics."""
        t = self.cfg.train
        total = torch.zeros((), device=self.device)
        if self.pipeline:  # the step's micro-batches go through the stages together
            xs, ys = zip(*(self.loader.next_batch() for _ in range(self.accumulation)))
            with self.autocast():
                total = self.pipeline.train_step(torch.cat(xs).to(self.device),
                                                 torch.cat(ys).to(self.device))
        for micro in range(0 if self.pipeline else self.accumulation):
            x, y = self.loader.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # Data parallel: gradients are averaged over processes once, on the last micro-step.
            last = micro == self.accumulation - 1
            if self.zero >= 2:
                self.model.set_requires_gradient_sync(last)
            sync = self.forward.no_sync() if hasattr(self.forward, "no_sync") and not last \
                else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    _, loss = self.forward(x, y)
                loss = loss / self.accumulation
                self.scaler.scale(loss).backward()
            total += loss.detach()
        if self.dist.tp > 1:
            from scratchlm.parallel.tensor import settle_gradients

            settle_gradients(self.model)
        if self.average_by_hand:
            average_gradients(list(self.model.parameters()), self.dist.group("dp"))
        # The loss of the whole global batch, on every rank (tensor-parallel and pipeline
        # ranks of one data-parallel group hold the same value).
        total = mean_over_ranks(total)
        self.scaler.unscale_(self.optimizer)  # no-op unless fp16
        grad_norm = clip_gradients(self.norm_params, t.grad_clip if t.grad_clip > 0 else math.inf,
                                   self.dist.group("pp") if self.pipeline else None)
        lr = lr_at(self.step, t.lr, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_value, norm_value = total.item(), grad_norm.item()
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        if finite or self.precision == "fp16":
            # fp16: an overflowed gradient is the scaler's to handle (it skips the step and
            # lowers the scale); only a non-finite loss counts against the run.
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.precision == "fp16" and self.scaler.get_scale() < scale
        else:
            skipped = True
        if self.held is None:  # what this rank holds at its fullest: gradients still there
            self.held = held_bytes(self.model, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        if skipped:
            self.skipped += 1
        bad = not math.isfinite(loss_value) or (not finite and self.precision != "fp16")
        self.bad_in_row = self.bad_in_row + 1 if bad else 0
        return {"loss": loss_value, "lr": lr, "grad_norm": norm_value, "skipped": self.skipped}

    @torch.no_grad()
    def evaluate(self) -> dict:
        cfg = self.model.config
        batches = iter_eval_windows(self.data_dir, cfg.block_size, self.cfg.train.micro_batch,
                                    self.cfg.train.eval_batches)
        autocast = self.autocast() if self.precision != "fp32" else None
        if self.pipeline:
            return evaluate_batches(self.model, batches, self.byte_lengths, self.device, autocast,
                                    self.pipeline.forward_logits, self.dist.group("pp"))
        return evaluate_batches(self.model, batches, self.byte_lengths, self.device, autocast)

    def sample(self) -> str:
        from scratchlm.generate import generate_text

        n = min(self.cfg.train.sample_tokens, self.model.config.block_size - 1)
        if n <= 0:
            return ""
        text = generate_text(self.model, self.tokenizer, "<|endoftext|>", n, temperature=0.8,
                             top_k=50, seed=self.step, stop_at_eot=True)
        self.model.train()
        return text

    # --------------------------------------------------------------------------------------------

    @property
    def stage_group(self):
        return self.dist.group("pp") if self.pipeline else None

    def _state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "best_val": self.best_val,
                "best_step": self.best_step, "skipped": self.skipped,
                "loader": self.loader.state_dict(), "scaler": self.scaler.state_dict(),
                "config": asdict(self.cfg)}

    def save(self) -> None:
        """Every rank helps gather the whole state (sharded under FSDP); rank 0 writes."""
        model_state, opt_state = ckpt.gather_state(self.model, self.optimizer, self.stage_group)
        if self.main:
            ckpt.save_checkpoint(self.out, self.step, self.model, model_state, opt_state,
                                 self.tokenizer, self.cfg, self._state())
            ckpt.prune(self.out, self.cfg.train.keep_last, {self.best_step})
        barrier()

    def _resume(self) -> None:
        """Continue from the newest checkpoint that loads; a damaged one, or one of another
        model, is reported and the one before it tried."""
        for path in reversed(ckpt.list_checkpoints(self.out)):
            try:
                state = ckpt.load_checkpoint(path, self.model, self.optimizer)
                self.loader.load_state_dict(state["loader"])
            except ScratchError as e:
                print0(f"[train] cannot resume from {path.name}: {e}; trying an older one")
                continue
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.best_val, self.best_step = state["best_val"], state["best_step"]
            self.skipped = state["skipped"]
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            if self.logger:
                self.logger.truncate(self.step)
            print0(f"[train] resumed from {path} (step {self.step})")
            return
        print0(f"[train] no checkpoint to resume in {self.out / 'checkpoints'}; starting at 0")

    def run(self) -> dict:
        t = self.cfg.train
        if self.step >= t.max_steps:
            print0(f"[train] already at step {self.step} of {t.max_steps}")
        self.model.train()
        start = time.perf_counter()
        bar = tqdm(total=t.max_steps, initial=self.step, desc="pretraining", unit="step",
                   disable=not self.progress)
        last_val: dict = {}
        while self.step < t.max_steps:
            t0 = time.perf_counter()
            row = self.train_step()
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            self.step += 1
            self.tokens_seen += self.tokens_per_step
            row.update(step=self.step, tokens=self.tokens_seen,
                       tokens_per_s=self.tokens_per_step / dt,
                       mfu=self.flops_per_step / dt / self.peak,
                       memory_gb=memory_gb(self.device), time_s=time.perf_counter() - start)
            if self.bad_in_row >= t.max_bad_steps:
                bar.close()
                good = ckpt.list_checkpoints(self.out)
                raise ScratchError(
                    f"loss or gradients were not finite for {self.bad_in_row} steps in a row "
                    f"(at step {self.step}); lower train.lr or use fp32/bf16. Last good "
                    f"checkpoint: {good[-1] if good else 'none'}")
            out_of_time = t.time_budget_s and time.perf_counter() - start >= t.time_budget_s
            done = self.step >= t.max_steps or out_of_time
            if (t.eval_every and self.step % t.eval_every == 0) or done:
                last_val = self.evaluate()
                row.update(val_loss=last_val["loss"], val_ppl=last_val["ppl"],
                           val_bpb=last_val["bpb"])
                if last_val["loss"] < self.best_val:
                    self.best_val, self.best_step = last_val["loss"], self.step
                # Under FSDP every rank must run the forward passes (they gather the weights).
                # Samples need the whole model in one place: none under tensor or pipeline
                # parallelism, whose ranks each hold part of it.
                whole = self.dist.tp == self.dist.pp == 1
                sample = self.sample() if whole and (self.main or self.zero >= 2) else ""
                if sample and self.progress:
                    tqdm.write(f"[step {self.step}] val loss {last_val['loss']:.3f}, "
                               f"bpb {last_val['bpb']:.3f} | {sample[:200]!r}")
            if self.logger:
                self.logger.log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}",
                            tok_s=f"{row['tokens_per_s']:,.0f}", mfu=f"{row['mfu']:.1%}")
            # No checkpoint in a streak of non-finite steps: the last one written stays the
            # last good one.
            if ((t.checkpoint_every and self.step % t.checkpoint_every == 0) or done) \
                    and not self.bad_in_row:
                self.save()
            if out_of_time:
                print0(f"[train] time budget of {t.time_budget_s:.0f} s reached at step "
                      f"{self.step}")
                break
        bar.close()
        return self.finish(last_val, time.perf_counter() - start)

    def finish(self, last_val: dict, seconds: float) -> dict:
        model_state = ckpt.gather_model_state(self.model, self.stage_group)
        # Per-rank memory, the largest over ranks (pipeline stages differ): bytes of weights,
        # gradients and optimizer state held, and the peak memory of the process or device.
        held = dict(self.held or {}, peak=int(memory_gb(self.device) * 1e9))
        largest = torch.tensor(list(held.values()), dtype=torch.float64, device=self.device)
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
        per_rank = {k: int(v) for k, v in zip(held, largest.tolist())}
        if not self.main:
            barrier()
            return {"steps": self.step, "val": last_val}
        final = self.out / "final"
        save_model(self.model, final, self.tokenizer, state=model_state)
        save_config(self.cfg, final / "run.yaml")
        rows = self.logger.rows()
        self.logger.close()
        plot_losses(rows, self.out / "loss.png", f"pretraining: {self.model.config.n_layer} "
                    f"layers x {self.model.config.n_embd}")
        train_rows = [r for r in rows if "tokens_per_s" in r]
        steady = train_rows[len(train_rows) // 5:] or train_rows  # leave out warm-up steps
        summary = {
            "steps": self.step, "tokens": self.tokens_seen, "seconds": seconds,
            "final_train_loss": rows[-1]["loss"] if rows else None,
            "val": last_val, "best_val_loss": self.best_val, "best_step": self.best_step,
            "skipped_steps": self.skipped,
            "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / max(len(steady), 1),
            "mfu": sum(r["mfu"] for r in steady) / max(len(steady), 1),
            "peak_flops": self.peak, "precision": self.precision, "device": self.device,
            "parameters": self.n_params, "per_rank_bytes": per_rank,
            "layout": {"dp": self.dist.dp, "tp": self.dist.tp, "pp": self.dist.pp,
                       "zero": self.zero},
        }
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        barrier()
        return summary
