"""`scratchlm scaling sweep`: an IsoFLOP grid of pretraining runs (Hoffmann et al. 2022,
approach 2). For each compute budget C, each model size whose run fits it is trained for
D = C / (FLOPs per token) tokens, with its cosine schedule ending at D, as a normal pretraining
run; every run shares one tokenizer and one set of shards.

SWEEP/
  sweep.yaml        the resolved base config and the sweep settings
  tokenizer/, data/ built once (unless the base config points at existing ones)
  runs/C3e11-2x64/  a pretraining run directory per (budget, size)
  sweep.json        one record per finished run: N, D, both FLOP counts, validation loss

A finished run is skipped when the sweep runs again; an interrupted one resumes from its last
checkpoint. FLOPs are counted both ways and both recorded: 6 N D (Chinchilla's C = 6ND, N all
parameters, the tied embedding included since it is also the output layer) and the model's own
count (scratchlm.memory.flops_per_token: 6 N plus attention's 12 n_layer d T per token);
`sweep.flops` says which one turns a budget into tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from scratchlm.config import Config, save_config, to_dict
from scratchlm.errors import ScratchError
from scratchlm.memory import count_params, flops_per_token
from scratchlm.model.config import ModelConfig

RESULTS = "sweep.json"


@dataclass
class SweepConfig:
    budgets: list[float] = field(default_factory=lambda: [2.5e11, 5e11, 1e12, 2e12])
    """Compute budgets in FLOPs; each gets every size in `sizes` whose run fits it."""
    sizes: list[str] = field(default_factory=lambda: [
        "1x32", "2x32", "2x48", "2x64", "3x64", "3x96", "4x96", "4x128"])
    """Model shapes as LAYERSxWIDTH; heads of head_dim channels, a SwiGLU (or GELU) MLP of
    8/3 (4) times the width; everything else is the base config's model section."""
    head_dim: int = 16
    """Channels per attention head (a narrower model has one head)."""
    flops: Literal["model", "6nd"] = "model"
    """What turns a budget into tokens: the model's own FLOPs per token (6N + attention) or
    Chinchilla's 6N. Both counts are recorded either way."""
    min_steps: int = 20
    """Fewest optimizer steps a run may have; a budget too small for the smallest size is
    refused."""
    tokens_per_param: list[float] = field(default_factory=lambda: [0.5, 400.0])
    """The range of D / N a run may have: sizes far too large or too small for a budget are
    left out of it."""

    def __post_init__(self) -> None:
        if not self.budgets or any(not b > 0 for b in self.budgets):
            raise ScratchError("sweep.budgets must be positive FLOP counts")
        if len(self.tokens_per_param) != 2 or not 0 < self.tokens_per_param[0] < \
                self.tokens_per_param[1]:
            raise ScratchError("sweep.tokens_per_param must be [low, high] with 0 < low < high")
        if self.min_steps < 1 or self.head_dim < 2:
            raise ScratchError("sweep.min_steps must be >= 1 and sweep.head_dim >= 2")
        for size in self.sizes:
            parse_size(size)


@dataclass
class ScalingConfig(Config):
    """`scratchlm scaling sweep`: the base pretraining config of every run, and the sweep."""

    sweep: SweepConfig = field(default_factory=SweepConfig)
    """The IsoFLOP grid: budgets, sizes, how FLOPs are counted."""


@dataclass(frozen=True)
class PlannedRun:
    name: str
    budget: float
    size: str
    config: Config  # the run's own pretraining config
    params: int
    tokens: int
    steps: int
    flops_per_token_model: float
    flops_per_token_6n: float


def parse_size(size: str) -> tuple[int, int]:
    """"4x128" -> (4 layers, width 128)."""
    try:
        layers, width = (int(x) for x in size.lower().split("x"))
    except ValueError:
        raise ScratchError(f"sweep size {size!r} must be LAYERSxWIDTH, e.g. 2x64") from None
    if layers < 1 or width < 1:
        raise ScratchError(f"sweep size {size!r}: layers and width must be positive")
    return layers, width


def shape(base: ModelConfig, size: str, head_dim: int, vocab_size: int) -> ModelConfig:
    layers, width = parse_size(size)
    if width >= head_dim and width % head_dim:
        raise ScratchError(f"sweep size {size!r}: the width must be a multiple of "
                           f"sweep.head_dim ({head_dim}) or below it (one head)")
    n_head = max(1, width // head_dim)
    # 4x for the one-matrix MLPs (GELU, ReLU²), Llama's 8/3 for SwiGLU's two, rounded to 16:
    # the same parameters per layer either way.
    inner = 16 * math.ceil(8 * width / 3 / 16) if base.mlp == "swiglu" else 4 * width
    return dataclasses.replace(base, n_layer=layers, n_embd=width, n_head=n_head,
                               n_kv_head=None, head_dim=None, intermediate_size=inner,
                               vocab_size=vocab_size)


def _budget_name(budget: float) -> str:
    """2.5e11 -> "C2.5e11"."""
    exponent = math.floor(math.log10(budget))
    return f"C{budget / 10 ** exponent:.3g}e{exponent}"


def tokens_per_step(cfg: Config) -> int:
    return cfg.train.global_batch_tokens or \
        cfg.train.global_batch * cfg.model.block_size or \
        cfg.train.micro_batch * cfg.model.block_size


def plan_sweep(cfg: ScalingConfig, vocab_size: int) -> list[PlannedRun]:
    """Every run of the grid, checked before anything is trained."""
    sweep, per_step = cfg.sweep, tokens_per_step(cfg)
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config)}
    vocab = -(-vocab_size // cfg.train.pad_vocab_multiple) * cfg.train.pad_vocab_multiple
    shapes = {s: shape(cfg.model, s, sweep.head_dim, vocab) for s in sweep.sizes}
    smallest = min(shapes, key=lambda s: count_params(shapes[s]))
    runs: list[PlannedRun] = []
    for budget in sorted(sweep.budgets):
        chosen = []
        for size, model in shapes.items():
            n = count_params(model)
            per_model = flops_per_token(model, model.block_size)
            per_token = per_model if sweep.flops == "model" else 6 * n
            steps = round(budget / per_token / per_step)
            if size == smallest and steps < sweep.min_steps:
                need = sweep.min_steps * per_step * per_token
                raise ScratchError(
                    f"budget {budget:.3g} FLOPs trains the smallest size ({size}, {n:,} "
                    f"parameters) for only {steps} steps of {per_step:,} tokens; raise the "
                    f"budget to at least {need:.3g} or lower sweep.min_steps")
            low, high = sweep.tokens_per_param
            if steps < sweep.min_steps or not low <= steps * per_step / n <= high:
                continue
            # Validation once, at the end (on the base's train.eval_batches).
            train = dataclasses.replace(cfg.train, max_steps=steps, eval_every=0,
                                        sample_tokens=0, keep_last=1, time_budget_s=0.0)
            run_cfg = Config(**{**base, "model": model, "train": train})
            chosen.append(PlannedRun(f"{_budget_name(budget)}-{size}", budget, size, run_cfg,
                                     n, steps * per_step, steps, per_model, 6.0 * n))
        if len(chosen) < 3:
            raise ScratchError(
                f"budget {budget:.3g} FLOPs fits only {len(chosen)} of the sizes "
                f"({', '.join(r.size for r in chosen) or 'none'}); an IsoFLOP parabola needs "
                "3: add sizes or widen sweep.tokens_per_param")
        runs += chosen
    return runs


def record(run: PlannedRun, summary: dict, run_dir: Path) -> dict:
    """What the fits need of a finished run, with both FLOP counts."""
    val = summary.get("val") or {}
    if "loss" not in val:
        raise ScratchError(f"{run_dir}: the run has no validation loss; the sweep needs "
                           "data.val_fraction > 0")
    layers, width = parse_size(run.size)
    tokens = summary.get("tokens", run.tokens)
    return {"name": run.name, "budget": run.budget, "size": run.size, "n_layer": layers,
            "n_embd": width, "params": run.params, "tokens": tokens,
            "steps": summary["steps"], "flops_6nd": 6.0 * run.params * tokens,
            "flops_model": run.flops_per_token_model * tokens,
            "flops_per_token_model": run.flops_per_token_model,
            "flops_per_token_6n": run.flops_per_token_6n, "loss": val["loss"],
            "bpb": val.get("bpb"), "seconds": summary.get("seconds"),
            "run": str(run_dir)}


def _stamp(cfg: ScalingConfig) -> dict:
    return to_dict(cfg)


def _check_sweep_dir(cfg: ScalingConfig, out: Path) -> None:
    """Refuse a sweep directory made with other settings: its runs would mix two grids."""
    import yaml

    if out.exists() and not out.is_dir():
        raise ScratchError(f"--out {out} is a file; give a directory for the sweep")
    saved = out / "sweep.yaml"
    if saved.is_file() and yaml.safe_load(saved.read_text()) != \
            yaml.safe_load(yaml.safe_dump(_stamp(cfg))):
        raise ScratchError(f"{out} holds a sweep with other settings; use another --out, or "
                           "the same config and budgets to continue it")


def read_results(sweep_dir: str | Path) -> list[dict]:
    path = Path(sweep_dir) / RESULTS
    if not path.is_file():
        raise ScratchError(f"{path}: no sweep results; run `scratchlm scaling sweep --out "
                           f"{sweep_dir}` first")
    return json.loads(path.read_text(encoding="utf-8"))["runs"]


def run_sweep(cfg: ScalingConfig, out: Path, progress: bool = True) -> list[dict]:
    """Train every run of the grid that is not finished yet; returns all records."""
    from scratchlm.tokenizer import BPETokenizer
    from scratchlm.train.pretrain import check_data, ensure_data, ensure_tokenizer, run_pretraining
    from scratchlm.train.trainer import run_finished
    from scratchlm.utils import atomic_write_text

    out = Path(out)
    vocab = BPETokenizer.load(cfg.tokenizer.path).vocab_size if cfg.tokenizer.path \
        else cfg.tokenizer.vocab_size
    runs = plan_sweep(cfg, vocab)
    _check_sweep_dir(cfg, out)
    check_data(cfg, out)  # inputs the pipeline cannot prepare: refused before the tokenizer
    save_config(cfg, out / "sweep.yaml")
    tok_dir = ensure_tokenizer(cfg, out, progress)
    data_dir = ensure_data(cfg, out, tok_dir, progress)
    if BPETokenizer.load(tok_dir).vocab_size != vocab:
        raise ScratchError(f"{tok_dir}: the tokenizer has another vocabulary size than "
                           "tokenizer.vocab_size; use another --out")
    records = []
    for i, run in enumerate(runs, 1):
        run_dir = out / "runs" / run.name
        done = run_finished(run_dir)
        if done and done.get("steps", 0) >= run.steps:
            print(f"[sweep] {i}/{len(runs)} {run.name}: finished, skipped")
        else:
            print(f"[sweep] {i}/{len(runs)} {run.name}: {run.params:,} parameters, "
                  f"{run.tokens:,} tokens ({run.steps} steps), {run.budget:.3g} FLOPs")
            done = run_pretraining(run.config, run_dir, resume=run_dir.exists(),
                                   progress=progress, prepared=(tok_dir, data_dir))
        records.append(record(run, done, run_dir))
        atomic_write_text(out / RESULTS, json.dumps(
            {"flops": cfg.sweep.flops, "runs": records}, indent=2))
    return records
