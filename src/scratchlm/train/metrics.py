"""Training metrics: tokens/s, MFU against a measured peak, memory, logs and the loss plot."""

from __future__ import annotations

import csv
import json
import os
import resource
import time
from functools import cache
from pathlib import Path

import torch

CSV_COLUMNS = ["step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gb",
               "val_loss", "val_ppl", "val_bpb", "skipped", "time_s"]


@cache
def peak_flops(device: str, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in `dtype` on `device`: the ceiling MFU is measured
    against (a measured peak, not a datasheet one, so CPU and GPU figures mean the same)."""
    n = 4096 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    reps, t = 0, time.perf_counter()
    while time.perf_counter() - t < 0.5 or reps < 3:
        a @ b
        reps += 1
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


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
        with self.csv.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows())
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
