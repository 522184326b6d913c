"""Pretraining benchmark, on this machine's CPU.

  python bench/bench_pretrain.py [--sections budget,gpt2,side,ablation,profile] [--threads N]
        side: [--shapes cpu,baby] [--compile] [--steps 20] [--repeats 3] [--baby-batch 64]
        ablation: [--ablation-budget 60 | --ablation-steps N] [--vocab 1024 (the baseline's)]
        budget, ablation: [--recipe YAML] [--set=--K=V]
        budget: [--corpora shakespeare,austen] [--former]
  (or `make bench`)

1. budget: quality per compute: configs/shakespeare-10min.yaml (or --recipe) trained for its
   10-minute budget on the first 90% of Tiny Shakespeare (tokenizer included), validation bits
   per byte on the last 10% (nanoGPT's split); `--corpora shakespeare,austen` adds the same
   recipe on the six Austen novels (joined in name order, the same 90/10 cut), a text the
   recipe was not tuned on; `--former` runs the recipe as it was before issue 17's levers
   beside it (FORMER below).
2. gpt2: throughput and MFU of gpt2-124m shapes (GPT-2's own tokenizer, the built-in corpus),
   fp32, against the measured fp32 matmul peak.
3. side: tokens/s side by side with nanoGPT's model and training step (written down below as
   a small reference, `NanoGPT`), on the same character-level batches of Tiny Shakespeare,
   fp32, at nanoGPT's CPU recipe shape (4 layers, 128 wide, block 64, batch 12) and its
   baby-GPT shape (6 layers, 384 wide, 6 heads, block 256, batch 64): each timed run is
   `--steps` steps after warm-up, runs alternate between the two, median of `--repeats`.
   scratchlm's row is its real training step (Trainer.train_step: clipping, schedule, AdamW
   fused, its host syncs); data loading is left out of both. `--compile` adds the
   torch.compile rows of both. Beside them, dropout alone at the baby shape's sizes (rate 0.2,
   forward and backward): PyTorch's F.dropout against scratchlm's CPU masks.
4. ablation: the former 10-minute recipe at a short budget (`--ablation-budget` seconds, or a
   fixed `--ablation-steps`, which a busy machine cannot skew) with each lever of issue 17
   switched on alone (the budget's shape too: context, vocabulary, tokens a step), and today's
   recipe; best validation bits per byte, all rows in one run of the bench, on one tokenizer
   and one set of shards per vocabulary size (the baseline's `--vocab`, today's recipe its
   own), so that they are comparable.
5. profile (not part of `make bench`): at nanoGPT's CPU recipe shape, where a training step's
   time goes on each side (torch.profiler: matrix multiplies, attention, GELU, layer norm, the
   optimizer step, the rest), and candidate levers timed alone against what the step runs:
   q, k and v as one matmul, attention written out, oneDNN's matmul instead of MKL's.
Prints Markdown; writes bench/out/pretrain.json. Figures on a shared machine are only as good
as its load: the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import results as results_file
import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.config import Config, load_config
from scratchlm.model.config import ModelConfig
from scratchlm.model.dropout import dropout
from scratchlm.model.gpt import GPT
from scratchlm.model.logprobs import cross_entropy_sum
from scratchlm.train.objective import Objective
from scratchlm.train.pretrain import ensure_data, ensure_tokenizer, run_pretraining
from scratchlm.train.trainer import Trainer
from scratchlm.utils import data_dir

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "shakespeare-10min.yaml"


# ------------------------------------------------------------------------------------------------
# nanoGPT's model and step, written down from its architecture (Karpathy, nanoGPT model.py):
# fused c_attn q/k/v, flash SDPA, exact GELU MLP, LayerNorm with optional bias, learned
# positions, head tied to the token embedding; AdamW with decay on >= 2-D weights, fused only
# on CUDA (so the per-tensor loop on a CPU), clip 1.0.


class NanoLayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.dropout = n_head, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training
                                           else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class NanoBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1 = NanoLayerNorm(n_embd, bias)
        self.attn = NanoAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = NanoLayerNorm(n_embd, bias)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.drop(self.c_proj(F.gelu(self.c_fc(self.ln_2(x)))))


class NanoGPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        C = cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, C)
        self.wpe = nn.Embedding(cfg.block_size, C)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(NanoBlock(C, cfg.n_head, cfg.dropout, cfg.bias)
                               for _ in range(cfg.n_layer))
        self.ln_f = NanoLayerNorm(C, cfg.bias)
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                               ignore_index=-1)

    def configure_optimizers(self, lr: float, betas: tuple[float, float], weight_decay: float
                             ) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


def nanogpt_step(model: NanoGPT, optimizer: torch.optim.Optimizer, batch: dict,
                 step_fn=None) -> None:
    """nanoGPT's train.py step with one micro-step: forward, backward, clip, step, zero."""
    loss = (model if step_fn is None else step_fn)(batch["idx"], batch["targets"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------
# the same batches for both


class FixedBatches:
    """Cycles through a list of {"idx", "targets"} micro-batches (the Batches protocol)."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches, self.i = batches, 0

    def next_batch(self) -> dict:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


class FixedObjective(Objective):
    """Next-token loss on FixedBatches; no validation, no samples."""

    name = "pretraining"
    token_level = True

    def __init__(self, batches: list[dict]) -> None:
        super().__init__()
        self.fixed = batches

    def batches(self, micro_batch: int, seed: int, rank: int, world_size: int) -> FixedBatches:
        return FixedBatches(self.fixed)

    def token_loss(self, logits, targets):
        return cross_entropy_sum(logits, targets)


def char_batches(n: int, batch: int, block: int, seed: int = 0) -> tuple[list[dict], int]:
    """`n` micro-batches of Tiny Shakespeare as characters (nanoGPT's shakespeare_char
    encoding: one id per distinct character), and the vocabulary size."""
    text = (data_dir() / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text[:200_000]], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(len(ids) - block - 1, (batch,), generator=g)
        rows = torch.stack([ids[s:s + block + 1] for s in start.tolist()])
        out.append({"idx": rows[:, :-1].contiguous(), "targets": rows[:, 1:].contiguous()})
    return out, len(chars)


SHAPES = {  # nanoGPT's recipes: (n_layer, n_head, n_embd, block_size, batch, dropout, lr)
    "cpu": ("cpu recipe (4 x 128, block 64, batch 12)", (4, 4, 128, 64, 12, 0.0, 1e-3)),
    "baby": ("baby GPT (6 x 384, block 256, batch {b})", (6, 6, 384, 256, 64, 0.2, 1e-3)),
}


def timed(step, batches: list[dict], warmup: int, steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of `steps` calls of step(batch) after
    `warmup` untimed ones. On a busy machine CPU time is the steadier figure: it leaves out
    the time other processes hold the cores (with one thread; with more, OpenMP threads
    spinning at a barrier count too)."""
    for i in range(warmup):
        step(batches[i % len(batches)])
    t, c = time.perf_counter(), time.process_time()
    for i in range(steps):
        step(batches[(warmup + i) % len(batches)])
    return time.perf_counter() - t, time.process_time() - c


def scratchlm_trainer(cfg_model: ModelConfig, batch: int, lr: float, batches: list[dict],
                      compile: bool, out: Path) -> Trainer:
    """scratchlm's loop on the fixed batches: nanoGPT's shape and optimizer settings (AdamW,
    betas 0.9/0.99, decay 0.1, clip 1.0), fp32 on the CPU."""
    cfg = load_config(Config, None, [
        f"--train.micro_batch={batch}", f"--train.lr={lr}", "--train.beta2=0.99",
        "--train.warmup_steps=0", "--train.eval_every=0", "--train.sample_tokens=0",
        "--train.checkpoint_every=0", "--train.precision=fp32", "--train.device=cpu",
        f"--train.compile={str(compile).lower()}", "--train.max_steps=100000"])
    cfg.model = cfg_model
    torch.manual_seed(0)
    return Trainer(cfg.train, cfg.parallel, GPT(cfg_model), FixedObjective(batches), out, cfg,
                   progress=False)


def nanogpt_and_optimizer(model_cfg: ModelConfig, lr: float
                          ) -> tuple[NanoGPT, torch.optim.Optimizer]:
    """nanoGPT's model (seed 0, as scratchlm_trainer's) and its AdamW at the settings both sides
    share (betas 0.9/0.99, decay 0.1)."""
    torch.manual_seed(0)
    nano = NanoGPT(model_cfg)
    return nano, nano.configure_optimizers(lr, (0.9, 0.99), 0.1)


def time_nanogpt(model_cfg: ModelConfig, lr: float, batches: list[dict], compiled: bool,
                 args) -> tuple[float, float]:
    """nanoGPT's tokens per second and per CPU second on `batches`."""
    nano, opt = nanogpt_and_optimizer(model_cfg, lr)
    fwd = torch.compile(nano) if compiled else nano
    wall, cpu = timed(lambda b: nanogpt_step(nano, opt, b, fwd), batches, args.warmup,
                      args.steps)
    tokens = args.steps * batches[0]["idx"].numel()
    return tokens / wall, tokens / cpu


def time_scratchlm(model_cfg: ModelConfig, lr: float, batches: list[dict], compiled: bool,
                   args, out: Path) -> tuple[float, float, float, str]:
    """scratchlm's tokens per second and per CPU second, MFU, and the peak it was measured
    against, on `batches`."""
    batch, block = batches[0]["idx"].shape
    trainer = scratchlm_trainer(model_cfg, batch, lr, batches, compiled, out)
    wall, cpu = timed(lambda b: trainer.train_step(), batches, args.warmup, args.steps)
    tokens = args.steps * batch * block
    mfu = min(1.0, trainer.flops_per_token(block) * tokens / wall / trainer.peak)
    return tokens / wall, tokens / cpu, mfu, trainer.peak_info["how"]


def nano_model_config(shape: str, vocab: int) -> ModelConfig:
    """nanoGPT's architecture at one of its SHAPES in scratchlm's terms: GPT-2 parts without
    biases, its exact GELU."""
    n_layer, n_head, n_embd, block, _, dropout, _ = SHAPES[shape][1]
    return ModelConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head,
                       n_embd=n_embd, pos_emb="learned", norm="layernorm", mlp="gelu_exact",
                       bias=False, tie_embeddings=True, dropout=dropout)


def side_by_side(args, tmp: Path) -> list[dict]:
    rows = []
    for key in args.shapes.split(","):
        label, (_, _, _, block, batch, _, lr) = SHAPES[key]
        if key == "baby":
            batch = args.baby_batch
            label = label.format(b=batch)
        batches, vocab = char_batches(8, batch, block)
        model_cfg = nano_model_config(key, vocab)
        for compiled in [False, True] if args.compile else [False]:
            ours, theirs, ours_cpu, theirs_cpu, mfu, peak = [], [], [], [], [], ""
            for rep in range(args.repeats):
                # One after the other, the order alternating: a load that comes and goes on a
                # shared machine falls on both sides alike.
                if rep % 2 == 0:
                    theirs.append(time_nanogpt(model_cfg, lr, batches, compiled, args))
                *rates, m, peak = time_scratchlm(model_cfg, lr, batches, compiled, args,
                                                 tmp / f"side-{len(rows)}-{rep}")
                ours.append(rates)
                mfu.append(m)
                if rep % 2 == 1:
                    theirs.append(time_nanogpt(model_cfg, lr, batches, compiled, args))
            ours, ours_cpu = (list(x) for x in zip(*ours))
            theirs, theirs_cpu = (list(x) for x in zip(*theirs))
            med = statistics.median
            row = {"shape": label, "compiled": compiled, "nanogpt_tok_s": theirs,
                   "scratchlm_tok_s": ours, "ratio": med(ours) / med(theirs),
                   "nanogpt_tok_cpu_s": theirs_cpu, "scratchlm_tok_cpu_s": ours_cpu,
                   "cpu_ratio": med(ours_cpu) / med(theirs_cpu), "scratchlm_mfu": med(mfu),
                   "peak": peak, "load_average": os.getloadavg()[0]}
            rows.append(row)
            print(f"  {label}{' compiled' if compiled else ''}: {row['ratio']:.2f}x, "
                  f"{row['cpu_ratio']:.2f}x per CPU second (load {row['load_average']:.1f})",
                  flush=True)
    return rows


def alternating_ms(fns: dict, repeats: int, calls: int) -> dict[str, float]:
    """{name: milliseconds a call of fns[name]()}: each run of `calls` calls after one untimed
    call, the functions taking turns, the median of `repeats` runs each (a load that comes and
    goes falls on all alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            fn()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t) / calls * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def dropout_kernels(repeats: int = 5, calls: int = 20) -> list[dict]:
    """Milliseconds of one dropout's forward and backward (rate 0.2), F.dropout against
    scratchlm's, at the baby GPT's sizes (batch 8): the residual stream and the attention
    weights; median of `repeats` runs of `calls` calls, the two alternating."""
    rows = []
    for name, shape in (("residual stream, 8 x 256 x 384", (8, 256, 384)),
                        ("attention weights, 8 x 6 x 256 x 256", (8, 6, 256, 256))):
        x = torch.randn(shape, requires_grad=True)
        grad = torch.randn(shape)
        fns = {side: (lambda fn=fn, x=x, grad=grad: fn(x, 0.2).backward(grad))
               for side, fn in (("torch", F.dropout), ("scratchlm", dropout))}
        rows.append({"tensor": name, **alternating_ms(fns, repeats, calls)})
    return rows


# Where a step's time goes: ops grouped by name (self time), and the optimizer step whole.
PROFILE_GROUPS = {"matrix multiplies": ("aten::mm", "aten::bmm", "aten::addmm"),
                  "attention (SDPA)": ("scaled_dot_product",),
                  "GELU": ("aten::gelu",), "layer norm": ("layer_norm",)}


def step_profile(batches: list[dict], cfg: ModelConfig, steps: int = 20) -> list[dict]:
    """The share of each group of PROFILE_GROUPS, the optimizer step and the rest in `steps`
    training steps of each side on `batches` of nanoGPT's CPU recipe shape, `cfg` (see
    cpu_shape_levers; torch.profiler, one process)."""
    from torch.profiler import ProfilerActivity, profile

    batch, lr = batches[0]["idx"].size(0), SHAPES["cpu"][1][6]
    nano, opt = nanogpt_and_optimizer(cfg, lr)
    with tempfile.TemporaryDirectory() as out:
        trainer = scratchlm_trainer(cfg, batch, lr, batches, False, Path(out))
        sides = {"nanoGPT": lambda b: nanogpt_step(nano, opt, b),
                 "scratchlm": lambda b: trainer.train_step()}
        rows = []
        for side, step in sides.items():
            for i in range(5):
                step(batches[i % len(batches)])
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for i in range(steps):
                    step(batches[i % len(batches)])
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            shares = {g: sum(e.self_cpu_time_total for e in events
                             if any(k in e.key for k in keys)) / total
                      for g, keys in PROFILE_GROUPS.items()}
            shares["optimizer step"] = sum(e.cpu_time_total for e in events
                                           if e.key.startswith("Optimizer.step")) / total
            shares["the rest"] = 1.0 - sum(shares.values())
            rows.append({"side": side, "ms_per_step": total / steps / 1e3, **shares})
    return rows


def cpu_shape_levers(batches: list[dict], cfg: ModelConfig, repeats: int = 7,
                     calls: int = 100) -> list[dict]:
    """Milliseconds of what a step at nanoGPT's CPU recipe shape runs (batch 12, context 64,
    width 128, 4 heads) against a candidate, the two alternating, median of `repeats` runs of
    `calls` calls: q, k and v as three matmuls or one (forward and backward); attention through
    SDPA or written out with baddbmm and a cached causal mask (forward and backward); and at
    each of the step's matmul shapes, MKL's fp32 matmul (what F.linear runs) or oneDNN's
    (forward only); and a whole training step of scratchlm with the attention written out
    (`model.attention=manual`) or through SDPA, 20 steps a run, on `batches` (`cfg`: nanoGPT's
    model at that shape)."""
    _, n_head, C, T, B, _, lr = SHAPES["cpu"][1]
    hd = C // n_head
    x, w3 = torch.randn(B, T, C, requires_grad=True), torch.randn(3 * C, C, requires_grad=True)
    ws = [torch.randn(C, C, requires_grad=True) for _ in range(3)]
    g = torch.randn(B, T, 3 * C)
    gs = [part.contiguous() for part in g.split(C, -1)]
    q, k, v = (torch.randn(B * n_head, T, hd, requires_grad=True) for _ in range(3))
    go = torch.randn(B * n_head, T, hd)
    mask = torch.full((T, T), float("-inf")).triu(1).expand(B * n_head, T, T)

    def three() -> None:
        torch.autograd.backward([F.linear(x, w) for w in ws], gs)

    def sdpa() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(go)

    def written_out() -> None:
        att = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=1 / math.sqrt(hd))
        torch.bmm(att.softmax(-1), v).backward(go)

    # (what, today's name and call, the candidate's name and call, calls a run)
    pairs = [("q, k, v projections, forward + backward", "three matmuls", three, "one matmul",
              lambda: F.linear(x, w3).backward(g), calls),
             ("attention, 48 heads x 64 x 32, forward + backward", "SDPA", sdpa,
              "written out", written_out, calls)]
    for M, K, N in ((B * T, C, 3 * C), (B * T, C, 4 * C), (B * T, 4 * C, C), (C, B * T, 4 * C)):
        a, w = torch.randn(M, K), torch.randn(N, K)
        pairs.append((f"matmul {M} x {K} x {N}, forward", "MKL", lambda a=a, w=w: a @ w.t(),
                      "oneDNN", lambda a=a, w=w: torch.ops.mkldnn._linear_pointwise(
                          a, w, None, "none", [], ""), calls))
    with tempfile.TemporaryDirectory() as out:
        fused, manual = (scratchlm_trainer(c, B, lr, batches, False, Path(out) / c.attention)
                         for c in (cfg, replace(cfg, attention="manual")))
        pairs.append(("a training step of scratchlm", "SDPA", fused.train_step,
                      "written out", manual.train_step, 20))
        rows = []
        for what, now_name, now, alt_name, alt, n in pairs:
            ms = alternating_ms({"now": now, "candidate": alt}, repeats, n)
            rows.append({"what": what, "now": now_name, "candidate": alt_name,
                         "now_ms": ms["now"], "candidate_ms": ms["candidate"]})
    return rows


# ------------------------------------------------------------------------------------------------
# the recipe: a 10-minute budget, and the levers' ablation


def corpus_text(corpus: str) -> str:
    """Tiny Shakespeare, or the six Austen novels of ../shared/data joined in name order."""
    if corpus == "shakespeare":
        return (data_dir() / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    if corpus == "austen":
        novels = sorted((data_dir() / "corpus" / "austen").glob("*.txt"))
        return "\n\n".join(f.read_text(encoding="utf-8") for f in novels)
    raise SystemExit(f"unknown corpus {corpus!r}: choose shakespeare or austen")


def corpus_split(tmp: Path, corpus: str = "shakespeare") -> list[str]:
    """The first 90% of the text to train on (tokenizer included), the last 10% held out:
    nanoGPT's split of Tiny Shakespeare; for Austen the held-out part is most of the last
    novel by name (Sense and Sensibility)."""
    text = corpus_text(corpus)
    cut = int(len(text) * 0.9)
    (tmp / "train.txt").write_text(text[:cut], encoding="utf-8")
    (tmp / "val.txt").write_text(text[cut:], encoding="utf-8")
    return [f"--data.inputs=[{tmp / 'train.txt'}]", f"--data.val_inputs=[{tmp / 'val.txt'}]"]


def best_bpb(run: Path) -> tuple[float | None, list]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["time_s"], r["val_bpb"]) for r in rows if "val_bpb" in r]
    return (min(b for *_, b in curve) if curve else None), curve


def budget_run(tmp: Path, recipe: Path, corpus: str, overrides: list[str], label: str) -> dict:
    cfg = load_config(Config, recipe, corpus_split(tmp, corpus) + overrides)
    summary = run_pretraining(cfg, tmp / "run", progress=False)
    summary["best_bpb"], summary["curve"] = best_bpb(tmp / "run")
    summary.update(recipe=label, corpus=corpus, overrides=overrides,
                   load_average=os.getloadavg()[0])
    print(f"  {label} on {corpus}: {summary['best_bpb']:.3f} bits/byte, "
          f"{summary['steps']} steps", flush=True)
    return summary


# The recipe before issue 17's levers (AdamW, SwiGLU, tied head, warm-up + cosine over 900
# steps, on the clock; context 256, dropout on the attention weights too), as overrides of
# today's: the ablation's baseline and `--former`.
# Its shape apart: in the ablation an override of the caller's (`--set`) must win over it.
FORMER_SHAPE = ["--model.block_size=256", "--train.micro_batch=16", "--model.attn_dropout=null"]
FORMER_LEVERS = ["--train.optimizer=adamw", "--train.schedule=cosine", "--model.qk_norm=false",
                 "--model.mlp=swiglu", "--model.tie_embeddings=true", "--train.head_lr=0",
                 "--train.max_steps=900", "--train.warmup_fraction=0",
                 "--train.warmup_steps=50"]
FORMER_VOCAB = 1024  # its tokenizer size; in the ablation the baseline's `--vocab` default
FORMER = FORMER_LEVERS + FORMER_SHAPE + [f"--tokenizer.vocab_size={FORMER_VOCAB}"]
# Each lever of issue 17 switched on alone over the former recipe (its lrs: nanochat's and
# modded-nanogpt's small-model settings, not tuned here); the last row is today's recipe.
LEVERS = {
    "baseline (former recipe: AdamW, warmup + cosine)": [],
    "Muon for block matrices (muon_lr 0.02)": ["--train.optimizer=muon"],
    "warmup-stable-decay (last 30% linear)": ["--train.schedule=wsd",
                                              "--train.decay_fraction=0.3"],
    "QK-norm": ["--model.qk_norm=true"],
    "ReLU² MLP": ["--model.mlp=relu2"],
    "logit soft-cap 15": ["--model.logit_softcap=15"],
    "zero-init output projections": ["--model.zero_init=true"],
    "untied head, head_lr 0.004": ["--model.tie_embeddings=false", "--train.head_lr=0.004"],
    "no dropout on attention weights (fused SDPA)": ["--model.attn_dropout=0"],
}


def shape_levers(base: Config, vocab: int) -> dict[str, list[str]]:
    """The budget's shape, relative to the baseline's: half and a quarter of the context (the
    same tokens a step in more rows), twice the vocabulary (more bytes a token, a larger
    head), half the tokens a step (twice the steps)."""
    block, tokens, micro = (base.model.block_size, base.train.global_batch_tokens,
                            base.train.micro_batch)
    return {
        f"context {block // 2} (same tokens a step)": [f"--model.block_size={block // 2}"],
        f"context {block // 4} (same tokens a step)": [f"--model.block_size={block // 4}"],
        f"tokenizer {2 * vocab:,}": [f"--tokenizer.vocab_size={2 * vocab}"],
        f"{tokens // 2:,} tokens a step": [
            f"--train.global_batch_tokens={tokens // 2}",
            f"--train.micro_batch={min(micro, tokens // 2 // block)}"],
    }


def ablation(args, tmp: Path) -> list[dict]:
    """Every row on the same tokenizer and shards (one set per vocabulary size), each for
    `args.ablation_budget` seconds."""
    split = corpus_split(tmp)
    prepared: dict[int, list[str]] = {}

    def data(vocab: int) -> list[str]:
        """The tokenizer and shards of a vocabulary size, built once."""
        if vocab not in prepared:
            flags = split + [f"--tokenizer.vocab_size={vocab}"]
            base = load_config(Config, args.recipe, flags)
            tok_dir = ensure_tokenizer(base, tmp / f"vocab-{vocab}", progress=False)
            shards = ensure_data(base, tmp / f"vocab-{vocab}", tok_dir, progress=False)
            prepared[vocab] = flags + [f"--tokenizer.path={tok_dir}", f"--data.shards={shards}"]
        return prepared[vocab]

    # A fixed number of steps instead of the budget compares the levers per step, which a
    # busy machine cannot skew (tokens/s is then the separate question).
    length = [f"--train.max_steps={args.ablation_steps}", "--train.time_budget_s=0"] \
        if args.ablation_steps else [f"--train.time_budget_s={args.ablation_budget}"]
    common = [f"--train.eval_every={args.eval_every}", "--train.eval_batches=20", *args.set]
    rows = []
    base = load_config(Config, args.recipe,
                       data(args.vocab) + FORMER_SHAPE + common + FORMER_LEVERS)
    levers = {**LEVERS, **shape_levers(base, args.vocab)}
    # (shape, flags): the shape before the caller's --set, the levers after it; today's
    # recipe runs in its own shape.
    own_vocab = load_config(Config, args.recipe, list(args.set)).tokenizer.vocab_size
    rows_flags = {**{name: (FORMER_SHAPE, FORMER_LEVERS + flags)
                     for name, flags in levers.items()},
                  f"today's recipe ({args.recipe.name})": (
                      [], [f"--tokenizer.vocab_size={own_vocab}"])}
    for i, (name, (shape, flags)) in enumerate(rows_flags.items()):
        vocab = next((int(f.split("=")[1]) for f in flags
                      if f.startswith("--tokenizer.vocab_size=")), args.vocab)
        # The run's length last: FORMER's max_steps must not override it.
        cfg = load_config(Config, args.recipe, data(vocab) + shape + common + flags + length)
        summary = run_pretraining(cfg, tmp / f"ablation-{i}", progress=False)
        bpb, curve = best_bpb(tmp / f"ablation-{i}")
        rows.append({"lever": name, "flags": shape + flags, "best_bpb": bpb,
                     "steps": summary["steps"],
                     "tokens_per_s": summary["tokens_per_s"], "curve": curve,
                     "load_average": os.getloadavg()[0]})
        print(f"  {name}: {bpb if bpb is None else round(bpb, 3)} bits/byte, "
              f"{summary['steps']} steps", flush=True)
    return rows


def throughput_run(tmp: Path) -> dict:
    from scratchlm.tokenizer import from_gpt2

    gpt2 = data_dir() / "gpt2"
    from_gpt2(gpt2 / "encoder.json", gpt2 / "vocab.bpe").save(tmp / "gpt2-tok")
    cfg = load_config(Config, None, [
        f"--tokenizer.path={tmp / 'gpt2-tok'}", "--data.inputs=[builtin]",
        "--model.block_size=512", "--train.max_steps=6", "--train.micro_batch=4",
        "--train.global_batch_tokens=2048", "--train.eval_every=0", "--train.eval_batches=1",
        "--train.sample_tokens=0", "--train.checkpoint_every=0", "--train.warmup_steps=1"])
    return run_pretraining(cfg, tmp / "gpt2", progress=False)


# ------------------------------------------------------------------------------------------------


def report(results: dict, args) -> None:
    if "budget" in results:
        print("\nQuality per compute (the recipe's time budget; first 90% / last 10%):\n")
        print("| recipe | corpus | steps | tokens | wall time | best val bits/byte "
              "| load average |")
        print("|---|---|---|---|---|---|---|")
        for b in results["budget"]:
            print(f"| {b['recipe']} | {b['corpus']} | {b['steps']} | {b['tokens']:,} | "
                  f"{b['seconds']:.0f} s | **{b['best_bpb']:.3f}** | {b['load_average']:.1f} |")
    if "gpt2_124m" in results:
        g = results["gpt2_124m"]
        print("\ngpt2-124m shapes, fp32, CPU, 4 x 512 tokens per step:\n")
        print("| parameters | tokens/s | MFU | peak used |")
        print("|---|---|---|---|")
        print(f"| {g['parameters'] / 1e6:.1f}M | {g['tokens_per_s']:,.0f} | {g['mfu']:.1%} | "
              f"{g['peak_flops_measured']} |")
    if "side" in results:
        print(f"\nSide by side with nanoGPT's model and step, fp32, "
              f"{torch.get_num_threads()} threads, the same character batches, "
              f"median of {args.repeats} x {args.steps} steps:\n")
        print("| shape | mode | nanoGPT tokens/s | scratchlm tokens/s | scratchlm / nanoGPT "
              "| the same per CPU second | scratchlm MFU | load average |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results["side"]:
            print(f"| {r['shape']} | {'compiled' if r['compiled'] else 'eager'} | "
                  f"{statistics.median(r['nanogpt_tok_s']):,.0f} | "
                  f"{statistics.median(r['scratchlm_tok_s']):,.0f} | {r['ratio']:.2f}x | "
                  f"{r['cpu_ratio']:.2f}x | {r['scratchlm_mfu']:.1%} | "
                  f"{r['load_average']:.1f} |")
        print(f"\nMFU peak: {results['side'][0]['peak']}")
        print("\nDropout alone (rate 0.2, forward + backward, ms; median of 5 x 20 calls):\n")
        print("| tensor | F.dropout | scratchlm | ratio |")
        print("|---|---|---|---|")
        for r in results["dropout"]:
            print(f"| {r['tensor']} | {r['torch']:.2f} | {r['scratchlm']:.2f} "
                  f"| {r['torch'] / r['scratchlm']:.1f}x |")
    if "profile" in results:
        print("\nWhere a step's time goes at nanoGPT's CPU recipe shape (torch.profiler, 20 "
              "steps a side, share of the profiled time):\n")
        groups = [*PROFILE_GROUPS, "optimizer step", "the rest"]
        print("| side | ms a step, profiled | " + " | ".join(groups) + " |")
        print("|---|---|" + "---|" * len(groups))
        for r in results["profile"]:
            print(f"| {r['side']} | {r['ms_per_step']:.1f} | "
                  + " | ".join(f"{r[g]:.1%}" for g in groups) + " |")
        print("\nCandidate levers at that shape (ms a call, median of 7 runs of 100 calls, "
              "20 for the training step, the two alternating):\n")
        print("| what | today | ms | candidate | ms | today / candidate |")
        print("|---|---|---|---|---|---|")
        for r in results["levers"]:
            print(f"| {r['what']} | {r['now']} | {r['now_ms']:.3f} | {r['candidate']} | "
                  f"{r['candidate_ms']:.3f} | {r['now_ms'] / r['candidate_ms']:.2f}x |")
    if "ablation" in results:
        length = f"{args.ablation_steps} steps" if args.ablation_steps else \
            f"{args.ablation_budget:g} s (schedule on the clock)"
        changed = f", with {' '.join(args.set)}" if args.set else ""
        print(f"\nAblation: configs/shakespeare-10min.yaml{changed}, {length} per row, "
              f"baseline vocabulary {args.vocab}, best validation bits/byte on the held-out 10%:\n")
        print("| lever | best val bits/byte | steps | tokens/s | load average |")
        print("|---|---|---|---|---|")
        for r in results["ablation"]:
            bpb = "—" if r["best_bpb"] is None else f"{r['best_bpb']:.3f}"
            print(f"| {r['lever']} | {bpb} | {r['steps']} | {r['tokens_per_s']:,.0f} | "
                  f"{r['load_average']:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default="budget,gpt2,side,ablation",
                   help="comma-separated: budget, gpt2, side, ablation, profile")
    p.add_argument("--skip-budget", action="store_true", help="leave out the 10-minute run")
    p.add_argument("--compile", action="store_true", help="side: add torch.compile rows")
    p.add_argument("--steps", type=int, default=20, help="side: timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="side: untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="side: runs per row (median)")
    p.add_argument("--baby-batch", type=int, default=64, help="side: baby GPT's batch")
    p.add_argument("--shapes", default="cpu,baby", help="side: cpu, baby or both")
    p.add_argument("--ablation-budget", type=float, default=60.0,
                   help="ablation: seconds per row")
    p.add_argument("--ablation-steps", type=int, default=0,
                   help="ablation: a fixed number of steps per row instead of the budget")
    p.add_argument("--recipe", type=Path, default=RECIPE,
                   help="budget, ablation: the recipe (default configs/shakespeare-10min.yaml)")
    p.add_argument("--former", action="store_true",
                   help="budget: also run the recipe as it was before issue 17's levers")
    p.add_argument("--corpora", default="shakespeare",
                   help="budget: comma-separated corpora, shakespeare and/or austen")
    p.add_argument("--set", action="append", default=[], metavar="--SECTION.KEY=VALUE",
                   help="budget, ablation: an override of the recipe for every run "
                        "(repeatable), e.g. --set=--model.n_layer=2 for a smaller shape")
    p.add_argument("--eval-every", type=int, default=50, help="ablation: steps per eval")
    p.add_argument("--vocab", type=int, default=FORMER_VOCAB,
                   help="ablation: the baseline's tokenizer size (today's row keeps its own)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0 = torch's default); 1 keeps a busy machine's "
                        "OpenMP threads from waiting on each other")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    unknown = sorted(sections - {"budget", "gpt2", "side", "ablation", "profile"})
    if unknown:
        p.error(f"--sections: no section {unknown[0]!r}; choose from budget, gpt2, side, "
                "ablation, profile")
    if args.skip_budget:
        sections.discard("budget")
    results: dict = {"load_average_start": os.getloadavg()[0], "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "side" in sections:
            results["side"] = side_by_side(args, tmp)
            results["dropout"] = dropout_kernels()
        if "profile" in sections:
            _, _, _, block, batch, _, _ = SHAPES["cpu"][1]
            batches, vocab = char_batches(8, batch, block)
            cfg = nano_model_config("cpu", vocab)
            results["profile"] = step_profile(batches, cfg)
            results["levers"] = cpu_shape_levers(batches, cfg)
        if "ablation" in sections:
            results["ablation"] = ablation(args, tmp)
        if "budget" in sections:
            results["budget"] = []
            label = args.recipe.name + "".join(f" {o}" for o in args.set)
            variants = {label: args.set}
            if args.former:
                variants["former recipe" + label.removeprefix(args.recipe.name)] = \
                    FORMER + args.set
            for i, corpus in enumerate(args.corpora.split(",")):
                for j, (name, overrides) in enumerate(variants.items()):
                    (tmp / f"budget-{i}-{j}").mkdir()
                    results["budget"].append(budget_run(tmp / f"budget-{i}-{j}", args.recipe,
                                                        corpus, overrides, name))
        if "gpt2" in sections:
            results["gpt2_124m"] = throughput_run(tmp)
    report(results, args)
    results_file.save("pretrain", results)


if __name__ == "__main__":
    main()
