"""Training metrics: tokens/s, MFU against a measured peak, memory, logs and the loss plot."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import resource
import time
from functools import cache
from pathlib import Path

import torch

from scratchlm.utils import atomic_path, atomic_write_text

# Best of 5 trials of 0.2 s each per shape: one 0.5 s trial of a 1024^2 matmul read anywhere
# from 74 to 111 GFLOP/s on a shared 2-core machine; the best of several is stable, and each
# shape is timed once per machine (cached), so the second costs nothing.
PEAK_TRIALS, PEAK_TRIAL_S = 5, 0.2


def matmul_shapes(cfg, tokens: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of the forward matmuls a model of config `cfg` runs on a micro-batch of
    `tokens` positions: the fused q/k/v projection, attention output, MLP in and out, head
    (the backward pass runs the same products transposed)."""
    C, heads = cfg.n_embd, cfg.n_head * cfg.head_dim
    qkv = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    return sorted({(tokens, C, qkv), (tokens, heads, C), (tokens, C, cfg.intermediate_size),
                   (tokens, cfg.intermediate_size, C), (tokens, C, cfg.vocab_size)})


def _machine(device: str, dtype: torch.dtype) -> str:
    """What a measured peak belongs to: the processor, the threads torch uses, the dtype."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        info = Path("/proc/cpuinfo")
        lines = info.read_text().splitlines() if info.is_file() else []
        name = next((ln.split(":", 1)[1].strip() for ln in lines
                     if ln.startswith("model name")), platform.processor() or "cpu")
        name += f", {torch.get_num_threads()} threads"
    return f"{name} | {str(dtype).removeprefix('torch.')} | torch {torch.__version__}"


def peak_cache_path() -> Path:
    """Where measured peaks are kept: $SCRATCHLM_CACHE/peak_flops.json, else under
    ~/.cache/scratchlm."""
    root = os.environ.get("SCRATCHLM_CACHE") or Path.home() / ".cache" / "scratchlm"
    return Path(root) / "peak_flops.json"


def measure_matmul(device: str, dtype: torch.dtype, shape: tuple[int, int, int],
                   trials: int = PEAK_TRIALS, seconds: float = PEAK_TRIAL_S) -> float:
    """FLOP/s of an (m, k) @ (k, n) matmul: the best of `trials` timings, each of as many
    products as fill `seconds` (at least 3). The best, not the mean: other work on a shared
    machine only ever slows a trial down."""
    m, k, n = shape
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(trials):
        sync()
        reps, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds or reps < 3:
            a @ b
            reps += 1
            if reps % 8 == 0:
                sync()
        sync()
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t))
    return best


def measured_peak(device: str, dtype: torch.dtype, shapes=()) -> dict:
    """The peak FLOP/s MFU is measured against, and how it was measured: the best rate of a
    large square matmul and of `shapes` (see `matmul_shapes`) of `dtype` on `device`, each the
    best of several trials (`measure_matmul`). Rates are kept per machine in
    `peak_cache_path()` and only shapes not measured before are timed, so the peak is the
    machine's best seen so far: stable from run to run, and it only rises."""
    square = 4096 if device.startswith("cuda") else 1024
    return _measured_peak(device, dtype, tuple(sorted({(square,) * 3, *map(tuple, shapes)})))


@cache
def _measured_peak(device: str, dtype: torch.dtype, shapes: tuple) -> dict:
    path, machine = peak_cache_path(), _machine(device, dtype)
    entry = _read_json(path).get(machine, {})
    rates = dict(entry.get("shapes", {}))
    missing = [s for s in shapes if "x".join(map(str, s)) not in rates]
    for s in missing:
        rates["x".join(map(str, s))] = measure_matmul(device, dtype, s)
    if missing:
        entry = {"shapes": rates, "trials": f"best of {PEAK_TRIALS} x {PEAK_TRIAL_S} s",
                 "measured": time.strftime("%Y-%m-%d %H:%M"),
                 "load_average": os.getloadavg()[0]}
        with contextlib.suppress(OSError):  # an unwritable home only costs a new measurement
            latest = _read_json(path)  # another process may have added other machines
            latest[machine] = entry
            atomic_write_text(path, json.dumps(latest, indent=1))
    shape, flops = max(rates.items(), key=lambda kv: kv[1])
    where, kind = machine.split(" | ")[:2]
    return {"flops": flops,
            "how": f"best {kind} matmul rate on {where}: "
                   f"{flops / 1e9:,.1f} GFLOP/s at {shape}, the best of {len(rates)} shapes "
                   f"({entry.get('trials')}, measured {entry.get('measured')}, "
                   f"cached in {path})"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def peak_flops(device: str, dtype: torch.dtype, shapes=()) -> float:
    """The peak FLOP/s of `measured_peak`: a measured peak, not a datasheet one, so that CPU
    and GPU figures mean the same."""
    return measured_peak(device, dtype, shapes)["flops"]


def memory_gb(device: str) -> float:
    """Peak memory so far: allocated tensors on a GPU, resident set size of the process on
    the CPU (which includes the Python runtime and libraries)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


class MetricsLogger:
    """One JSON object per line in metrics.jsonl, the same rows in metrics.csv, and TensorBoard
    scalars when the `tensorboard` package is installed."""

    def __init__(self, out: Path, resume: bool) -> None:
        self.jsonl = out / "metrics.jsonl"
        self.csv = out / "metrics.csv"
        if not resume:
            self.jsonl.unlink(missing_ok=True)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except (ImportError, ModuleNotFoundError):
            pass

    def log(self, row: dict) -> None:
        with self.jsonl.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def rows(self, upto_step: int | None = None) -> list[dict]:
        if not self.jsonl.is_file():
            return []
        rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line]
        return [r for r in rows if upto_step is None or r["step"] <= upto_step]

    def truncate(self, step: int) -> None:
        """Drop rows after `step`: a resumed run redoes them."""
        rows = self.rows(step)
        tmp = self.jsonl.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.jsonl)

    def close(self) -> None:
        rows = self.rows()
        columns = list(dict.fromkeys(k for r in rows for k in r))  # in order of first use
        with atomic_path(self.csv) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        if self.tb is not None:
            self.tb.close()


def plot_losses(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """Train loss per step and validation loss per evaluation, as a PNG."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(*zip(*train), lw=1, alpha=0.8, label="train")
    if val:
        ax.plot(*zip(*val), "o-", lw=1.5, label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(rows: list[dict], path: Path, title: str,
                panels: list[tuple[str, list[str]]]) -> Path | None:
    """One panel per (y label, metric keys) of the logged rows against the step, side by
    side (a metric absent from every row is left out; a panel with none is not drawn)."""
    panels = [(label, [k for k in keys if any(k in r for r in rows)]) for label, keys in panels]
    panels = [(label, keys) for label, keys in panels if keys]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), dpi=120,
                             squeeze=False)
    for ax, (label, keys) in zip(axes[0], panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*points), "o-" if len(points) < 30 else "-", lw=1.2, ms=3,
                    label=key.replace("_", " "))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
