"""Every parallel layout on 2 CPU processes (gloo) against one process, same model and batch.

  python bench/bench_parallel.py        (part of `make bench`; about 4 minutes)

Model: Llama-style, 4 layers x 256 wide, 8 heads, context 256, vocabulary 2,048 (tiny-cpu's
tokenizer, the built-in corpus); 8,192 tokens per optimizer step, 20 steps, fp32. Reports
steady-state tokens/s and, per rank (the largest over ranks), the bytes of weights, gradients
and AdamW state it holds and its peak resident memory. Prints Markdown (pasted into the
README); writes bench/out/parallel.json.

On 2 cores, 2 processes share the cores one process already uses (torch runs a thread per
core), so no layout is faster than one process here: the table shows what each layout costs in
communication and what it saves in memory, not the speed-up it gives on separate devices.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import results as results_file

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--model.n_layer=4", "--model.n_embd=256", "--model.n_head=8",
         "--model.block_size=256", "--train.micro_batch=4", "--train.global_batch_tokens=8192",
         "--train.max_steps=20", "--train.eval_every=0", "--train.eval_batches=1",
         "--train.checkpoint_every=0", "--train.sample_tokens=0", "--train.warmup_steps=2"]
LAYOUTS = {
    "1 process": [],
    "DDP": ["--parallel.dp=2"],
    "ZeRO-1": ["--parallel.dp=2", "--parallel.zero=1"],
    "ZeRO-2 (FSDP2)": ["--parallel.dp=2", "--parallel.zero=2"],
    "ZeRO-3 (FSDP2)": ["--parallel.dp=2", "--parallel.zero=3"],
    "TP + sequence parallel": ["--parallel.tp=2"],
    "TP": ["--parallel.tp=2", "--parallel.sequence_parallel=false"],
    "PP, 1F1B": ["--parallel.pp=2"],
    "PP, GPipe": ["--parallel.pp=2", "--parallel.pp_schedule=gpipe"],
}


def run(out: Path, flags: list[str], prepared: list[str]) -> dict:
    args = ["-m", "scratchlm", "pretrain", "--config", "tiny-cpu", "--quiet", "--out", str(out),
            *prepared, *MODEL, *flags]
    if flags:
        exe = Path(sys.executable).parent / "torchrun"
        cmd = [str(exe), "--standalone", "--nproc_per_node=2", *args]
    else:
        cmd = [sys.executable, *args]
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        first = run(Path(tmp) / "prep", [], [])  # builds the tokenizer and shards once
        prepared = [f"--tokenizer.path={Path(tmp) / 'prep' / 'tokenizer'}",
                    f"--data.shards={Path(tmp) / 'prep' / 'data'}"]
        for name, flags in LAYOUTS.items():
            results[name] = first if not flags else run(Path(tmp) / name.replace(" ", "_"),
                                                        flags, prepared)
            print(f"{name}: {results[name]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
    base = results["1 process"]
    mb = 1e6
    print(f"Model: {base['parameters'] / 1e6:.2f}M parameters, 8,192 tokens per step, fp32, "
          "2 processes on 2 CPU cores (gloo)\n")
    print("| layout | tokens/s | vs 1 process | weights / rank | gradients / rank "
          "| AdamW state / rank | peak RSS / rank | final loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        held, speed = r["per_rank_bytes"], r["tokens_per_s"]
        print(f"| {name} | {speed:,.0f} | {speed / base['tokens_per_s']:.2f}x"
              f" | {held['weights'] / mb:.2f} MB | {held['gradients'] / mb:.2f} MB"
              f" | {held['optimizer'] / mb:.2f} MB | {held['peak'] / mb:,.0f} MB"
              f" | {r['final_train_loss']:.4f} |")
    results_file.save("parallel", results)


if __name__ == "__main__":
    main()
