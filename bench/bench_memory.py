"""Memory estimator vs measured peak: `scratchlm memory`'s figures against what forward +
backward really allocate, counted by scratchlm.memory.PeakMemory, fp32 on the CPU.

  python bench/bench_memory.py            (or `make bench`)
"""

from __future__ import annotations

import torch

from scratchlm.memory import estimate_memory, training_peak_bytes
from scratchlm.model import GPT, ModelConfig
from scratchlm.parallel.runtime import apply_activation_checkpointing

B, T = 8, 256


def main() -> None:
    print(f"4 layers x 256 wide, 8k vocabulary, batch {B} x {T} tokens; activations + "
          "gradients:\n")
    print("| model | activation checkpointing | measured peak | estimate | difference |")
    print("|---|---|---|---|---|")
    for label, preset in [("GPT-2 family", "gpt2-tiny"), ("Llama family (GQA 4/2)", "llama-tiny")]:
        for checkpointing in (False, True):
            torch.manual_seed(0)
            cfg = ModelConfig.from_preset(preset, n_layer=4, n_embd=256, n_head=4,
                                          vocab_size=8192, block_size=T)
            model = GPT(cfg)
            if checkpointing:
                apply_activation_checkpointing(model)
            idx = torch.randint(0, cfg.vocab_size, (B, T))
            peak = training_peak_bytes(model, idx)
            est = estimate_memory(cfg, "fp32", micro_batch=B, seq=T,
                                  activation_checkpointing=checkpointing)
            predicted = est.activations + est.gradients
            print(f"| {label} | {'on' if checkpointing else 'off'} | {peak / 1e6:.1f} MB "
                  f"| {predicted / 1e6:.1f} MB | {100 * (predicted / peak - 1):+.1f}% |")


if __name__ == "__main__":
    main()
