"""Model benchmark: scratchlm vs Hugging Face `transformers`, same weights, same inputs, CPU fp32.

  python bench/bench_model.py            (or `make bench`)

1. Training step (forward + backward + torch.optim.AdamW), tokens/s, GPT-2 and Llama shapes.
2. Greedy generation of 256 new tokens after a 32-token prompt, tokens/s: scratchlm with its KV
   cache vs `transformers`' generate() (which uses its own cache), and scratchlm without cache.
Prints Markdown tables (pasted into the README) and writes bench/out/model.json.
"""

from __future__ import annotations

import time

import results as results_file
import torch
import transformers

from scratchlm.generate import generate
from scratchlm.model import GPT, ModelConfig
from scratchlm.model.hf import to_hf

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


def train_tokens_per_s(model: torch.nn.Module, hf: bool, idx: torch.Tensor) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        loss = model(idx, labels=idx).loss if hf else model(idx[:, :-1], idx[:, 1:])[1]
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


def main() -> dict:
    torch.manual_seed(0)
    results: dict = {"threads": torch.get_num_threads(), "train": {}, "generate": {}}
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
    results_file.save("model", results)
    return results


if __name__ == "__main__":
    main()
