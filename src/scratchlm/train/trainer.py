"""The one training loop, for every stage; a stage hands it an Objective (train/objective.py).

One optimizer step: the step's micro-batches are drawn first and the items their losses cover
counted over every data-parallel rank; each micro-batch's summed loss is then scaled by
(data-parallel ranks / that global count) and back-propagated, so the summed gradient is the
mean over the global batch whatever the padding or masking (the ranks' gradients are averaged,
hence the factor). Then unscale (fp16), clip the global norm, set this step's learning rate,
optimizer step. Steps whose loss or gradient is not finite are skipped and counted; too many
in a row stop the run, its last good checkpoint intact. Evaluation, samples, metrics,
checkpoints and the loss plot happen here too. The layout is the Runtime's business
(scratchlm.parallel.runtime): nothing here branches on it.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from scratchlm.config import TrainConfig, save_config
from scratchlm.errors import ScratchError
from scratchlm.memory import flops_per_token, held_bytes
from scratchlm.model.checkpoint import save_extras, save_model
from scratchlm.model.gpt import GPT
from scratchlm.parallel import DistInfo, barrier, print0
from scratchlm.parallel.runtime import parallelize
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.metrics import (
    MetricsLogger,
    matmul_shapes,
    measured_peak,
    memory_gb,
    plot_losses,
)
from scratchlm.train.objective import Objective, TrainModule
from scratchlm.train.optim import recipe_groups
from scratchlm.train.schedule import lr_at, run_position, warmup_length, warmup_position
from scratchlm.utils import atomic_write_text


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ScratchError(f"train.device is {name!r} but no CUDA device is available; "
                           "use --train.device=cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ScratchError(f"train.device must be cpu, cuda, cuda:N or auto, got {name!r}")
    return name


def resolve_precision(name: str, device: str) -> str:
    """auto: bf16 on a GPU that supports it, else fp32 (bf16 matmuls are slow on most CPUs)."""
    if name == "auto":
        return "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    return name


def run_finished(out: Path) -> dict | None:
    """The summary of the finished run in `out`, else None (a damaged summary counts as
    unfinished: the checkpoints decide)."""
    path = out / "summary.json"
    if not path.is_file() or not (out / "final").is_dir():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def start_run(out: Path, resume: bool, max_steps: int | None = None) -> dict | None:
    """Before a stage writes anything into its run directory: refuse to start a new run over
    one that is there (unless resuming), and return the summary of a finished run that
    `--resume` asks to continue when there is nothing left to do (the caller then stops,
    touching nothing). `max_steps` (None when set by epochs): a finished run resumed with
    more steps continues."""
    if out.exists() and not out.is_dir():
        raise ScratchError(f"--out {out} is a file, not a directory; choose a directory")
    has_run = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()) \
        or (out / "final").is_dir()
    if has_run and not resume:
        raise ScratchError(f"{out} already holds a run; pass --resume to continue it, or "
                           "choose another --out")
    done = run_finished(out) if resume else None
    if done is None or max_steps is not None and done.get("steps", 0) < max_steps:
        return None
    print0(f"[train] {out} is finished ({done.get('steps')} steps); nothing to do")
    return done


class Trainer:
    """Trains `model` on `objective` into the run directory `out`.

    Public: `compute_gradients()` (one step's forward and backward, gradients left in place),
    `train_step()` (that, then clipping and the optimizer step), `evaluate()`, `save()`,
    `run()`; `step`, `module`, `optimizer`, `runtime`, `accumulation`, `precision`."""

    def __init__(self, train: TrainConfig, parallel, model: GPT, objective: Objective,
                 out: Path, run_cfg, tokenizer=None, resume: bool = False,
                 progress: bool = True, dist: DistInfo | None = None) -> None:
        self.cfg, self.objective, self.out = train, objective, out
        self.run_cfg, self.tokenizer = run_cfg, tokenizer
        self.dist = dist or DistInfo()
        self.main = self.dist.is_main
        self.progress = progress and self.main
        self.device = resolve_device(train.device)
        if self.device == "cuda" and self.dist.world_size > 1:
            self.device = f"cuda:{self.dist.local_rank}"
        self.precision = resolve_precision(train.precision, self.device)
        dp = self.dist.dp
        per_micro = train.micro_batch * dp  # one micro-batch on every data-parallel rank
        target = objective.global_batch(train) or per_micro
        if target % per_micro:
            raise ScratchError(
                f"the global batch ({target} sequences) must be a multiple of train.micro_batch "
                f"x data-parallel ranks ({train.micro_batch} x {dp} = {per_micro})")
        self.accumulation = target // per_micro
        self.global_batch = target
        self.max_steps = train.max_steps
        if train.epochs and objective.train_size():
            self.max_steps = max(1, math.ceil(train.epochs * objective.train_size() / target))
        # Ranks of one tensor-parallel group or one pipeline read the same batches.
        self.loader = objective.batches(train.micro_batch, train.seed, self.dist.coord("dp"),
                                        dp)
        self.n_params = model.num_params()
        self.flops_per_token = functools.partial(flops_per_token, model.config)
        self.module = TrainModule(model, objective)
        # Counted before a layout shards or splits them (a tied head counted once).
        self.trainable_parameters = sum(p.numel() for p in self.module.parameters()
                                        if p.requires_grad)
        self.runtime = parallelize(self.module, self.dist, parallel, self.device,
                                   self.precision, self.accumulation, train.compile,
                                   train.activation_checkpointing)
        groups = recipe_groups(objective.param_groups(self.module, train.weight_decay),
                               self.module, train)
        self.optimizer = self.runtime.build_optimizer(groups, train.lr, (train.beta1,
                                                      train.beta2), train.eps,
                                                      train.muon_momentum)
        self.scaler = torch.amp.GradScaler(self.device.split(":")[0],
                                           enabled=self.precision == "fp16")
        # MFU counts every process's device: the peak of one, measured (at this model's
        # matmul shapes among others), times their number.
        self.peak_info = measured_peak(self.device, self.runtime.dtype, matmul_shapes(
            model.config, train.micro_batch * model.config.block_size))
        self.peak = self.peak_info["flops"] * self.dist.world_size
        self.step, self.tokens_seen, self.step_flops = 0, 0, 0.0
        # Seconds of training: those of earlier sessions of a resumed run, plus this one's
        # since run() began (read through `clock`, which a test may replace).
        self.clock, self.elapsed_before, self.started = time.perf_counter, 0.0, None
        self.held: dict[str, int] | None = None
        self.best_val, self.best_step = math.inf, -1
        self.best_metrics: dict = {}  # the validation metrics of best_step
        self.final_step = 0  # the step whose weights go to final/ (see run)
        self.bad_in_row, self.skipped = 0, 0
        if self.main:
            out.mkdir(parents=True, exist_ok=True)
        self.logger = MetricsLogger(out, resume) if self.main else None
        if resume:
            self._resume()
        if self.main:  # the run's resolved config, once a resume was not refused (every stage)
            save_config(run_cfg, out / "config.yaml")

    @property
    def model(self) -> GPT:
        return self.module.model

    # --------------------------------------------------------------------------------------------

    def compute_gradients(self) -> tuple[float, int]:
        """Forward and backward over one step's micro-batches; the gradients (of the mean loss
        over the global batch) are left in the parameters. Returns (the mean loss, the
        positions the step computed over all ranks)."""
        batches = [self.loader.next_batch() for _ in range(self.accumulation)]
        # Items the loss covers, positions computed, and their FLOPs (attention at each
        # batch's own length), over every data-parallel rank: one all-reduce.
        counted = torch.tensor([
            sum(self.objective.count(b) for b in batches),
            sum(self.objective.tokens(b) for b in batches),
            sum(self.flops_per_token(b["idx"].shape[-1]) * self.objective.tokens(b)
                for b in batches)], dtype=torch.float64)
        count, tokens, self.step_flops = self.runtime.sum_over_dp(counted).tolist()
        if count <= 0:
            raise ScratchError(f"step {self.step + 1}: no item in the global batch counts "
                               "towards the loss (every target is masked); check the data")
        scale = self.dist.dp / count  # the ranks' gradients are averaged: undo that mean
        total = self.runtime.forward_backward(
            batches, scale, lambda loss: self.scaler.scale(loss).backward())
        self.runtime.finish_backward()
        loss = self.runtime.sum_over_dp(total.double()).item() / count
        return loss, int(tokens)

    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns its metrics."""
        t = self.cfg
        loss_value, tokens = self.compute_gradients()
        self.scaler.unscale_(self.optimizer)  # no-op unless fp16
        grad_norm = self.runtime.clip(t.grad_clip if t.grad_clip > 0 else math.inf)
        position = run_position(self.step, self.max_steps, self.elapsed(), t.time_budget_s)
        lr = lr_at(position, t.lr, warmup_length(t.warmup_steps, t.warmup_fraction,
                                                 self.max_steps),
                   self.max_steps, t.min_lr_ratio, t.schedule, t.decay_fraction, t.decay_shape,
                   warmup_position(self.step, position, t.warmup_fraction))
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        norm_value = grad_norm.item()
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
            self.held = held_bytes(self.module, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        if skipped:
            self.skipped += 1
        bad = not math.isfinite(loss_value) or (not finite and self.precision != "fp16")
        self.bad_in_row = self.bad_in_row + 1 if bad else 0
        return {"loss": loss_value, "lr": lr, "grad_norm": norm_value, "skipped": self.skipped,
                "step_tokens": tokens, **self.objective.step_metrics()}

    def elapsed(self) -> float:
        """Seconds of training so far, across resumed sessions (what the time budget and the
        schedule that follows it count)."""
        running = self.clock() - self.started if self.started is not None else 0.0
        return self.elapsed_before + running

    def evaluate(self) -> dict:
        """The objective's validation metrics ({} when it has no validation data)."""
        was_training = self.module.training
        self.module.eval()
        with torch.no_grad():
            metrics = self.objective.evaluate(self.runtime)
        self.module.train(was_training)
        return metrics

    # --------------------------------------------------------------------------------------------

    def _state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen,
                "best_val": self.best_val if math.isfinite(self.best_val) else None,
                "best_step": self.best_step, "best_metrics": self.best_metrics,
                "skipped": self.skipped, "max_steps": self.max_steps, "elapsed_s": self.elapsed(),
                "loader": self.loader.state_dict(),
                "objective": self.objective.state_dict(), "scaler": self.scaler.state_dict(),
                "config": asdict(self.run_cfg)}

    def save(self) -> None:
        """Every rank helps gather the whole state (sharded under FSDP); rank 0 writes."""
        states = ckpt.gather_state(self.module, self.optimizer, self.runtime.stage_group)
        if self.main:
            ckpt.save_checkpoint(self.out, self.step, self.module, states, self.tokenizer,
                                 self.run_cfg, self._state())
            ckpt.prune(self.out, self.cfg.keep_last, {self.best_step})
        barrier()

    def _resume(self) -> None:
        """Continue from the newest checkpoint that loads; a damaged one is reported and the
        one before it tried. When checkpoints exist but none loads, refuse: nothing is
        deleted or overwritten."""
        failures = []
        for path in reversed(ckpt.list_checkpoints(self.out)):
            try:
                state = ckpt.load_checkpoint(path, self.module, self.optimizer)
                self.loader.load_state_dict(state["loader"])
                self.objective.load_state_dict(state.get("objective", {}))
            except ScratchError as e:
                print0(f"[train] cannot resume from {path.name}: {e}; trying an older one")
                failures.append(f"{path.name}: {e}")
                continue
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.elapsed_before = state.get("elapsed_s", 0.0)
            best = state["best_val"]
            self.best_val = math.inf if best is None else best
            self.best_step, self.skipped = state["best_step"], state["skipped"]
            self.best_metrics = state.get("best_metrics", {})
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            if self.logger:
                self.logger.truncate(self.step)
            print0(f"[train] resumed from {path} (step {self.step})")
            return
        if failures:
            raise ScratchError(f"cannot resume {self.out}: no checkpoint loads ("
                               f"{'; '.join(failures)}); nothing was changed")
        if self.logger:  # rows of steps no checkpoint kept are done again
            self.logger.truncate(0)
        print0(f"[train] no checkpoint to resume in {self.out / 'checkpoints'}; starting at 0")

    def run(self) -> dict:
        t = self.cfg
        self.module.train()
        start = time.perf_counter()
        self.started = self.clock()
        # With a time budget the clock ends the run, not max_steps (a cap): the bar counts the
        # budget's seconds, so its estimate of what is left is the budget's.
        budget = t.time_budget_s
        counted = dict(total=budget, initial=min(self.elapsed(), budget),
                       bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}"
                       "{postfix}]") if budget else dict(total=self.max_steps, initial=self.step)
        bar = tqdm(**counted, desc=self.objective.name, unit="step", disable=not self.progress)
        last_val: dict = {}
        out_of_time = False
        while self.step < self.max_steps:
            t0 = time.perf_counter()
            row = self.train_step()
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            self.step += 1
            tokens = row.pop("step_tokens")
            self.tokens_seen += tokens
            row.update(step=self.step, tokens=self.tokens_seen, tokens_per_s=tokens / dt,
                       mfu=min(1.0, self.step_flops / dt / self.peak),
                       memory_gb=memory_gb(self.device),
                       time_s=self.elapsed())
            if self.bad_in_row >= t.max_bad_steps:
                bar.close()
                good = ckpt.list_checkpoints(self.out)
                raise ScratchError(
                    f"loss or gradients were not finite for {self.bad_in_row} steps in a row "
                    f"(at step {self.step}); lower train.lr or use fp32/bf16. Last good "
                    f"checkpoint: {good[-1] if good else 'none'}")
            out_of_time = t.time_budget_s and self.elapsed() >= t.time_budget_s
            done = self.step >= self.max_steps or out_of_time
            improved = False
            if (t.eval_every and self.step % t.eval_every == 0) or done:
                last_val = self.evaluate()
                row.update({f"val_{k}": v for k, v in last_val.items()})
                if last_val.get("loss", math.inf) < self.best_val:
                    self.best_val, self.best_step = last_val["loss"], self.step
                    self.best_metrics, improved = last_val, True
                # Under FSDP every rank must run the forward passes (they gather the weights).
                sample = self.runtime.call(lambda model, _: self.objective.sample(
                    model, self.step)) if self.runtime.whole and \
                    (self.main or self.runtime.zero >= 2) else ""
                if self.progress and last_val:
                    shown = ", ".join(f"{k} {v:.3f}" for k, v in last_val.items()
                                      if isinstance(v, float))
                    tqdm.write(f"[step {self.step}] val {shown}"
                               + (f" | {sample[:200]!r}" if sample else ""))
            if self.logger:
                self.logger.log(row)
            bar.update(min(row["time_s"], budget) - bar.n if budget else 1)
            bar.set_postfix(step=self.step, loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}",
                            tok_s=f"{row['tokens_per_s']:,.0f}", mfu=f"{row['mfu']:.1%}")
            # No checkpoint in a streak of non-finite steps: the last one written stays the
            # last good one.
            if ((t.checkpoint_every and self.step % t.checkpoint_every == 0) or done
                    or (improved and t.keep_best)) and not self.bad_in_row:
                self.save()
            if out_of_time:
                break
        bar.close()
        if out_of_time:  # after the bar, so the line is not written into it
            print0(f"[train] time budget of {t.time_budget_s:.0f} s reached at step {self.step}")
        self.final_step = self.step
        if t.keep_best and 0 < self.best_step < self.step:
            last_val = self.restore_best(last_val)
        return self.finish(last_val, time.perf_counter() - start)

    def restore_best(self, last_val: dict) -> dict:
        """The best evaluation's weights back in place (through the checkpoint it wrote, so
        under every layout); returns its validation metrics. Where that step wrote none (it
        fell in a streak of non-finite steps) the last step's weights stay."""
        path = ckpt.step_dir(self.out, self.best_step)
        if not path.is_dir():
            print0(f"[train] step {self.best_step} had the lowest validation loss but wrote no "
                   f"checkpoint (non-finite steps); keeping the last step's weights")
            return last_val
        ckpt.load_checkpoint(path, self.module, self.optimizer)
        self.final_step = self.best_step
        print0(f"[train] keeping the weights of step {self.best_step} (validation loss "
               f"{self.best_val:.4f}), not the last step's ({last_val.get('loss', math.nan):.4f})")
        return self.best_metrics

    def finish(self, last_val: dict, seconds: float) -> dict:
        model_state, extras = ckpt.gather_model_state(self.module, self.runtime.stage_group)
        # Per-rank memory, the largest over ranks (pipeline stages differ): bytes of weights,
        # gradients and optimizer state held, and the peak memory of the process or device.
        held = dict(self.held or {}, peak=int(memory_gb(self.device) * 1e9))
        largest = torch.tensor(list(held.values()), dtype=torch.float64, device=self.device)
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
        per_rank = {k: int(v) for k, v in zip(held, largest.tolist())}
        summary: dict = {"steps": self.step}
        if last_val:
            summary["val"] = last_val
        if self.main:
            final = self.out / "final"
            save_model(self.model, final, self.tokenizer, state=model_state)
            save_extras(final, extras)
            save_config(self.run_cfg, final / "run.yaml")
            rows = self.logger.rows()
            self.logger.close()
            cfg = self.model.config
            plot_losses(rows, self.out / "loss.png",
                        f"{self.objective.name}: {cfg.n_layer} layers x {cfg.n_embd}")
            train_rows = [r for r in rows if "tokens_per_s" in r]
            steady = train_rows[len(train_rows) // 5:] or train_rows  # leave out warm-up steps
            summary.update({
                "objective": self.objective.name, "tokens": self.tokens_seen,
                "seconds": seconds, "final_train_loss": rows[-1]["loss"] if rows else None,
                "skipped_steps": self.skipped,
                "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / max(len(steady), 1),
                "mfu": sum(r["mfu"] for r in steady) / max(len(steady), 1),
                "peak_flops": self.peak, "peak_flops_measured": self.peak_info["how"],
                "precision": self.precision, "device": self.device,
                "parameters": self.n_params, "trainable_parameters": self.trainable_parameters,
                "per_rank_bytes": per_rank,
                "layout": {"dp": self.dist.dp, "tp": self.dist.tp, "pp": self.dist.pp,
                           "zero": self.runtime.zero},
            })
            if math.isfinite(self.best_val):
                summary.update(best_val_loss=self.best_val, best_step=self.best_step,
                               final_step=self.final_step)
        self.objective.finish(self.runtime, self.out, summary)
        if self.main:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        barrier()
        return summary
