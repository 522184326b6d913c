"""Every GPU check in one call, for a session that has a CUDA device (bench/ README tables).

  python bench/gpu_checks.py            (not part of `make bench`: it needs a GPU)

1. Pretraining throughput and MFU of gpt2-124m shapes (context 1024, GPT-2's tokenizer, the
   built-in corpus) in bf16 with fused attention, eager and torch.compile, against a measured
   bf16 matmul peak; and fp16 with loss scaling, eager.
2. The memory estimator against torch.cuda.max_memory_allocated for a training step, bf16.
3. Greedy generation with the KV cache vs transformers' generate() on the GPU.
Prints Markdown; writes bench/out/gpu.json.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import results as results_file
import torch

from scratchlm.config import Config, load_config
from scratchlm.memory import estimate_memory
from scratchlm.model import GPT, ModelConfig
from scratchlm.model.logprobs import cross_entropy_sum
from scratchlm.tokenizer import from_gpt2
from scratchlm.train.pretrain import run_pretraining
from scratchlm.utils import data_dir


def pretrain(tmp: Path, name: str, *overrides: str) -> dict:
    cfg = load_config(Config, None, [
        f"--tokenizer.path={tmp / 'gpt2-tok'}", "--data.inputs=[builtin]",
        f"--data.shards={tmp / 'shards'}" if (tmp / "shards" / "manifest.json").is_file()
        else "--data.val_fraction=0.05",
        "--train.device=cuda", "--train.max_steps=30", "--train.micro_batch=16",
        "--train.global_batch_tokens=16384", "--train.eval_every=0", "--train.eval_batches=2",
        "--train.sample_tokens=0", "--train.checkpoint_every=0", "--train.warmup_steps=5",
        *overrides])
    summary = run_pretraining(cfg, tmp / name, progress=False)
    if not (tmp / "shards").exists():
        (tmp / name / "data").rename(tmp / "shards")
    return summary


def memory_check() -> list[dict]:
    rows = []
    for preset, batch, seq in [("gpt2-124m", 8, 1024), ("llama-tiny", 8, 128)]:
        cfg = ModelConfig.from_preset(preset)
        model = GPT(cfg).cuda()
        opt = torch.optim.AdamW(model.parameters(), fused=True)
        idx = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
        for _ in range(2):  # the second step has optimizer state in place
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, count = cross_entropy_sum(model(idx)[0], idx)
                loss = loss / count
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        measured = torch.cuda.max_memory_allocated()
        # The trainer keeps fp32 weights and gradients under autocast: count them so.
        est = estimate_memory(cfg, "fp32", micro_batch=batch, seq=seq)
        bf16 = estimate_memory(cfg, "bf16", micro_batch=batch, seq=seq)
        predicted = est.weights + est.gradients + est.optimizer + bf16.activations
        rows.append({"model": preset, "batch": batch, "seq": seq, "measured": measured,
                     "estimate": predicted})
        del model, opt
        torch.cuda.empty_cache()
    return rows


@torch.inference_mode()
def generation_check() -> dict:
    import transformers

    from scratchlm.generate import generate
    from scratchlm.model.hf import to_hf

    transformers.logging.set_verbosity_error()
    cfg = ModelConfig.from_preset("gpt2-124m")
    ours = GPT(cfg).cuda().eval()
    hf = to_hf(ours).cuda().eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 32), device="cuda")
    timings = {}
    for name, fn in [("scratchlm", lambda n: generate(ours, prompt, n, temperature=0.0)),
                     ("transformers", lambda n: hf.generate(
                         prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, pad_token_id=0,
                         eos_token_id=None))]:
        fn(8)
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn(256)
        torch.cuda.synchronize()
        timings[name] = 256 / (time.perf_counter() - t)
    return timings


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine")
    results: dict = {"device": torch.cuda.get_device_name()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gpt2 = data_dir() / "gpt2"
        from_gpt2(gpt2 / "encoder.json", gpt2 / "vocab.bpe").save(tmp / "gpt2-tok")
        results["bf16_eager"] = pretrain(tmp, "bf16", "--train.precision=bf16")
        results["bf16_compile"] = pretrain(tmp, "bf16c", "--train.precision=bf16",
                                           "--train.compile=true")
        results["fp16_eager"] = pretrain(tmp, "fp16", "--train.precision=fp16")
    results["memory"] = memory_check()
    results["generation"] = generation_check()
    print(f"\n{results['device']}, gpt2-124m, 16 x 1024 tokens per step:\n")
    print("| precision | compile | tokens/s | MFU | measured peak |")
    print("|---|---|---|---|---|")
    for key in ("bf16_eager", "bf16_compile", "fp16_eager"):
        r = results[key]
        print(f"| {r['precision']} | {'yes' if 'compile' in key else 'no'} | "
              f"{r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['peak_flops'] / 1e12:.0f} TFLOP/s |")
    print("\n| model | batch x seq | max_memory_allocated | estimate | difference |")
    print("|---|---|---|---|---|")
    for r in results["memory"]:
        print(f"| {r['model']} | {r['batch']} x {r['seq']} | {r['measured'] / 1e9:.2f} GB | "
              f"{r['estimate'] / 1e9:.2f} GB | {100 * (r['estimate'] / r['measured'] - 1):+.1f}% |")
    g = results["generation"]
    ratio = g["scratchlm"] / g["transformers"]
    print(f"\nGreedy generation, 256 tokens, gpt2-124m: scratchlm {g['scratchlm']:,.0f} tok/s, "
          f"transformers {g['transformers']:,.0f} tok/s ({ratio:.2f}×)")
    results_file.save("gpu", results)


if __name__ == "__main__":
    main()
