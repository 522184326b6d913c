"""Pretraining benchmark, on this machine's CPU.

  python bench/bench_pretrain.py [--skip-budget]      (or `make bench`)

1. Quality per compute: configs/shakespeare-10min.yaml trained for a 10-minute budget on the
   first 90% of Tiny Shakespeare (tokenizer included), validation bits per byte on the last 10%.
2. Throughput and MFU of gpt2-124m shapes (GPT-2's own tokenizer, the built-in corpus), fp32,
   against a measured fp32 matmul peak.
Prints Markdown (pasted into the README); writes bench/out/pretrain.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import results as results_file

from scratchlm.config import Config, load_config
from scratchlm.train.pretrain import run_pretraining
from scratchlm.utils import data_dir

ROOT = Path(__file__).resolve().parents[1]


def budget_run(tmp: Path) -> dict:
    text = (data_dir() / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    (tmp / "train.txt").write_text(text[:cut], encoding="utf-8")
    (tmp / "val.txt").write_text(text[cut:], encoding="utf-8")
    cfg = load_config(Config, ROOT / "configs" / "shakespeare-10min.yaml",
                      [f"--data.inputs=[{tmp / 'train.txt'}]",
                       f"--data.val_inputs=[{tmp / 'val.txt'}]"])
    summary = run_pretraining(cfg, tmp / "run", progress=False)
    rows = [json.loads(line) for line in
            (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    summary["curve"] = [(r["step"], r["time_s"], r["val_bpb"]) for r in rows if "val_bpb" in r]
    return summary


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


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "--skip-budget" not in sys.argv:
            results["budget"] = budget_run(Path(tmp))
        results["gpt2_124m"] = throughput_run(Path(tmp))
    if "budget" in results:
        b = results["budget"]
        print("\nQuality per compute (configs/shakespeare-10min.yaml, 10-minute budget):\n")
        print("| steps | tokens | wall time | val loss (nats/token) | val bits/byte |")
        print("|---|---|---|---|---|")
        print(f"| {b['steps']} | {b['tokens']:,} | {b['seconds']:.0f} s | {b['val']['loss']:.3f} "
              f"| **{b['val']['bpb']:.3f}** |")
        print("\nValidation bits/byte during the run: " + ", ".join(
            f"{bpb:.3f} at {t:.0f} s" for _, t, bpb in b["curve"]))
    g = results["gpt2_124m"]
    print("\ngpt2-124m shapes, fp32, CPU, 4 x 512 tokens per step (mean of the steps after "
          "the first):\n")
    print("| parameters | tokens/s | MFU | measured fp32 peak |")
    print("|---|---|---|---|")
    print(f"| {g['parameters'] / 1e6:.1f}M | {g['tokens_per_s']:,.0f} | {g['mfu']:.1%} | "
          f"{g['peak_flops'] / 1e9:.0f} GFLOP/s |")
    results_file.save("pretrain", results)


if __name__ == "__main__":
    main()
