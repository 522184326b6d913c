"""Model benchmark: scratchlm vs Hugging Face `transformers`, same weights, same inputs, CPU fp32.

  python bench/bench_model.py            (or `make bench`)

1. Training step (forward + backward + torch.optim.AdamW), tokens/s, GPT-2 and Llama shapes.
2. Greedy generation of 256 new tokens after a 32-token prompt, tokens/s: scratchlm with its KV
   cache vs `transformers`' generate() (which uses its own cache), and scratchlm without cache.
3. Batched generation: 8 prompts of 8 to 64 tokens, 128 new tokens each, generated together
   (scratchlm.generate.generate_batch) vs one at a time.
4. Weight-only int8 (scratchlm.quantize) at batch 1, tokens/s against transformers fp32, with
   each int8 kernel; and its quality cost on the trained demo model (runs/demo/final, or the
   model given as `--model DIR`): bits per byte on the demo's held-out shard and the share of
   greedy tokens equal to fp32's.
Prints Markdown tables (pasted into the README) and writes bench/out/model.json.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import results as results_file
import torch
import transformers

from scratchlm.generate import generate, generate_batch
from scratchlm.model import GPT, ModelConfig
from scratchlm.model.hf import to_hf
from scratchlm.model.logprobs import cross_entropy_sum
from scratchlm.quantize import fbgemm_available, quantize

transformers.logging.set_verbosity_error()
SHAPES = {
    # GPT-2 family, 6 layers x 384 wide (GPT-2's own vocabulary and head)
    "gpt2 6x384": ModelConfig.from_preset("gpt2-124m", n_layer=6, n_head=6, n_embd=384,
                                          block_size=512),
    # Llama family, 6 layers x 384, GQA 6/2, SwiGLU 1024, untied 32k vocabulary
    "llama 6x384": ModelConfig.from_preset("llama-7b", n_layer=6, n_head=6, n_kv_head=2,
                                           n_embd=384, intermediate_size=1024,
                                           block_size=512),
}
# The size `make demo` trains on the CPU: here per-token framework overhead, not weight
# bandwidth, sets the generation speed (generation only).
DEMO = ModelConfig.from_preset("gpt2-124m", n_layer=4, n_head=4, n_embd=256, vocab_size=8192,
                               block_size=512)
BATCH, SEQ, STEPS = 4, 256, 5


def mean_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    loss, count = cross_entropy_sum(logits, targets)
    return loss / count


def train_tokens_per_s(model: torch.nn.Module, hf: bool, idx: torch.Tensor) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        loss = model(idx, labels=idx).loss if hf else mean_loss(model(idx[:, :-1])[0], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm up: allocator, AdamW state
        step()
    t = time.perf_counter()
    for _ in range(STEPS):
        step()
    return STEPS * idx.numel() / (time.perf_counter() - t)


def generate_tokens_per_s(fn, n_new: int) -> tuple[float, torch.Tensor]:
    fn(8)  # warm up
    t = time.perf_counter()
    out = fn(n_new)
    return n_new / (time.perf_counter() - t), out


@torch.inference_mode()
def bench_generation(ours: GPT, hf: torch.nn.Module, vocab: int) -> dict:
    prompt = torch.randint(0, vocab, (1, 32))
    g_ours, out_ours = generate_tokens_per_s(
        lambda n: generate(ours, prompt, n, temperature=0.0), 256)
    g_nocache, _ = generate_tokens_per_s(
        lambda n: generate(ours, prompt, n, temperature=0.0, use_kv_cache=False), 256)
    g_hf, out_hf = generate_tokens_per_s(
        lambda n: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0,
                              eos_token_id=None), 256)
    differ = (out_ours[0] != out_hf[0]).nonzero()
    return {"scratchlm_cache": g_ours, "scratchlm_no_cache": g_nocache, "hf": g_hf,
            "ratio_hf": g_ours / g_hf, "ratio_no_cache": g_ours / g_nocache,
            # greedy tokens that agree before the first disagreement (random weights give
            # near-flat logits, where rounding could flip a choice)
            "same_prefix": int(differ.min()) - 32 if len(differ) else 256}


INT8_KERNELS = (["fbgemm"] if fbgemm_available() else []) + ["int8pack"]
BATCH_PROMPTS, BATCH_NEW, INT8_NEW = 8, 128, 128


@torch.inference_mode()
def bench_batched(model: GPT) -> dict:
    """8 prompts of different lengths: together vs one at a time (greedy, same tokens)."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(8, 65, (BATCH_PROMPTS,), generator=g).tolist()
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
               for n in lengths]
    generate_batch(model, prompts[:2], 4, temperature=0.0)  # warm up
    t = time.perf_counter()
    together = generate_batch(model, prompts, BATCH_NEW, temperature=0.0)
    t_together = time.perf_counter() - t
    t = time.perf_counter()
    alone = [generate(model, torch.tensor([p]), BATCH_NEW, temperature=0.0)[0, len(p):].tolist()
             for p in prompts]
    t_alone = time.perf_counter() - t
    n = BATCH_PROMPTS * BATCH_NEW
    return {"together": n / t_together, "one_at_a_time": n / t_alone,
            "ratio": t_alone / t_together,
            "identical": sum(a == b for a, b in zip(together, alone))}


@torch.inference_mode()
def bench_int8_speed(ours: GPT, hf: torch.nn.Module) -> dict:
    """Greedy batch-1 tokens/s: transformers fp32, scratchlm fp32 and each int8 kernel."""
    prompt = torch.randint(0, ours.config.vocab_size, (1, 32))
    out = {"hf": generate_tokens_per_s(
        lambda n: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0,
                              eos_token_id=None), INT8_NEW)[0]}
    out["fp32"] = generate_tokens_per_s(lambda n: generate(ours, prompt, n, temperature=0.0),
                                        INT8_NEW)[0]
    for kernel in INT8_KERNELS:
        q = quantize(copy.deepcopy(ours), "int8", kernel)
        out[kernel] = generate_tokens_per_s(lambda n, q=q: generate(q, prompt, n,
                                                                    temperature=0.0),
                                            INT8_NEW)[0]
    return out


@torch.inference_mode()
def int8_quality(model_dir: Path) -> dict | None:
    """Bits per byte on the demo's held-out shard and greedy agreement with fp32, per kernel."""
    from scratchlm.data.shards import open_shard
    from scratchlm.eval.perplexity import evaluate_batches, text_windows, token_byte_lengths
    from scratchlm.model.load import load_pretrained

    val = sorted((model_dir.parent / "data").glob("val_*.bin"))
    if not (model_dir / "config.json").is_file() or not val:
        return None
    model, tok, _ = load_pretrained(model_dir)
    ids = [int(t) for t in open_shard(val[0])[:32 * model.config.block_size + 1]]
    lengths = token_byte_lengths(tok, model.config.vocab_size)
    prompts = [ids[i:i + 16] for i in range(0, 16 * 8 * 20, 16 * 20)]  # 8 held-out prompts
    ref_tokens = generate_batch(model, prompts, 64, temperature=0.0)

    def score(m: GPT) -> dict:
        bpb = evaluate_batches(lambda x: m(x)[0],
                               text_windows(ids, model.config.block_size, 8), lengths)["bpb"]
        tokens = generate_batch(m, prompts, 64, temperature=0.0)
        same = sum(next((i for i, (a, b) in enumerate(zip(t, r)) if a != b), len(r))
                   for t, r in zip(tokens, ref_tokens))
        return {"bpb": bpb, "greedy_same": same, "greedy_total": 64 * len(prompts)}

    out = {"fp32": score(model)}
    for kernel in INT8_KERNELS:
        out[kernel] = score(quantize(copy.deepcopy(model), "int8", kernel))
    return out


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "runs" /
                                               "demo" / "final"),
                        help="a trained model for the int8 quality figures")
    args, _ = parser.parse_known_args()
    torch.manual_seed(0)
    results: dict = {"threads": torch.get_num_threads(), "train": {}, "generate": {},
                     "batched": {}, "int8": {}}
    for name, cfg in [*SHAPES.items(), ("gpt2 4x256, 8k vocab (demo size)", DEMO)]:
        ours = GPT(cfg)
        hf = to_hf(ours)  # the same weights in transformers' own model class
        if cfg is not DEMO:
            idx = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1))
            # HF shifts labels inside the model; give both models the same SEQ positions.
            r_hf = train_tokens_per_s(hf, True, idx[:, :SEQ])
            r_ours = train_tokens_per_s(ours, False, idx)
            results["train"][name] = {"scratchlm": r_ours, "hf": r_hf, "ratio": r_ours / r_hf}

        ours = ours.eval()
        hf = to_hf(ours)  # again: training moved the two copies' weights apart
        results["generate"][name] = bench_generation(ours, hf, cfg.vocab_size)
        results["batched"][name] = bench_batched(ours)
        results["int8"][name] = bench_int8_speed(ours, hf)
    results["int8_quality"] = int8_quality(Path(args.model))

    print(f"Training step, fp32 CPU, {results['threads']} threads, batch {BATCH} x {SEQ} "
          f"tokens, AdamW, mean of {STEPS} steps after 2 warm-up steps:\n")
    print("| shape | scratchlm tokens/s | transformers tokens/s | ratio |")
    print("|---|---|---|---|")
    for name, r in results["train"].items():
        print(f"| {name} | {r['scratchlm']:,.0f} | {r['hf']:,.0f} | {r['ratio']:.2f}× |")
    print("\nGreedy generation, 32-token prompt + 256 new tokens, batch 1, tokens/s:\n")
    print("| shape | scratchlm (KV cache) | transformers generate() | ratio | "
          "scratchlm, no cache | cache speed-up | identical first tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results["generate"].items():
        print(f"| {name} | {r['scratchlm_cache']:,.0f} | {r['hf']:,.0f} | {r['ratio_hf']:.2f}× | "
              f"{r['scratchlm_no_cache']:,.0f} | {r['ratio_no_cache']:.2f}× | "
              f"{r['same_prefix']} of 256 |")
    print(f"\nBatched generation: {BATCH_PROMPTS} prompts of 8-64 tokens, {BATCH_NEW} new tokens "
          "each, greedy, tokens/s:\n")
    print("| shape | together (one batch) | one at a time | speed-up | identical outputs |")
    print("|---|---|---|---|---|")
    for name, r in results["batched"].items():
        print(f"| {name} | {r['together']:,.0f} | {r['one_at_a_time']:,.0f} | "
              f"{r['ratio']:.2f}× | {r['identical']} of {BATCH_PROMPTS} |")
    print(f"\nWeight-only int8, greedy, 32-token prompt + {INT8_NEW} new tokens, batch 1, "
          "tokens/s (ratio to transformers fp32):\n")
    print("| shape | transformers fp32 | scratchlm fp32 | "
          + " | ".join(f"scratchlm int8 ({k})" for k in INT8_KERNELS) + " |")
    print("|---|---|---|" + "---|" * len(INT8_KERNELS))
    for name, r in results["int8"].items():
        cells = [f"{r[k]:,.0f} ({r[k] / r['hf']:.2f}×)" for k in ("fp32", *INT8_KERNELS)]
        print(f"| {name} | {r['hf']:,.0f} | " + " | ".join(cells) + " |")
    quality = results["int8_quality"]
    if quality is None:
        print(f"\nint8 quality: skipped, no trained model with a held-out shard at {args.model} "
              "(run `make demo`, or pass --model DIR)")
    else:
        print(f"\nint8 quality on {args.model}: bits per byte on its held-out shard, greedy "
              "tokens equal to fp32's (8 prompts x 64 tokens, up to the first difference):\n")
        print("| weights | bits per byte | greedy tokens equal to fp32 |")
        print("|---|---|---|")
        for k, r in quality.items():
            label = "fp32" if k == "fp32" else f"int8 ({k})"
            print(f"| {label} | {r['bpb']:.4f} | {r['greedy_same']} of {r['greedy_total']} |")
    results_file.save("model", results)
    return results


if __name__ == "__main__":
    main()
