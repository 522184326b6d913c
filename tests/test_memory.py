"""The memory estimator against what training really allocates."""

from __future__ import annotations

import pytest
import torch

from scratchlm.memory import activation_elements, estimate_memory, training_peak_bytes
from scratchlm.model import GPT, ModelConfig
from scratchlm.model.logprobs import cross_entropy_sum
from scratchlm.parallel.runtime import apply_activation_checkpointing

SHAPES = [("gpt2-tiny", {}), ("gpt2-tiny", {"attention": "manual"}),
          ("gpt2-tiny", {"n_kv_head": 2}), ("llama-tiny", {}), ("llama-tiny", {"n_kv_head": 4}),
          ("llama-tiny", {"n_kv_head": 1, "attention": "manual"})]


def saved_bytes(model: GPT, idx: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward (parameters left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cross_entropy_sum(model(idx)[0], idx)
    return sum(seen.values())


@pytest.mark.parametrize("preset, kw", SHAPES)
def test_activation_count_matches_saved_tensors(preset: str, kw: dict) -> None:
    cfg = ModelConfig.from_preset(preset, n_layer=3, **kw)
    B, T = 4, 96
    measured = saved_bytes(GPT(cfg).train(), torch.randint(0, cfg.vocab_size, (B, T)))
    per_layer, outside = activation_elements(cfg, T)
    predicted = 4 * B * T * (cfg.n_layer * per_layer + outside)
    assert abs(predicted / measured - 1) < 0.03


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimate_matches_measured_peak(preset: str, checkpointing: bool) -> None:
    """Peak bytes allocated during forward + backward (activations, loss gradients, parameter
    gradients) against the estimate; weights and AdamW state are counted exactly."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, n_layer=4, n_embd=256, n_head=4, vocab_size=8192,
                                  block_size=256)
    model = GPT(cfg)
    if checkpointing:
        apply_activation_checkpointing(model)
    B, T = 4, 256
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    peak = training_peak_bytes(model, idx)
    est = estimate_memory(cfg, "fp32", micro_batch=B, seq=T,
                          activation_checkpointing=checkpointing)
    assert abs((est.activations + est.gradients) / peak - 1) < 0.15
    opt = torch.optim.AdamW(model.parameters())
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if t.dim() > 0)
    assert state == est.optimizer
    assert sum(p.numel() * 4 for p in model.parameters()) == est.weights == est.gradients


def test_mixed_precision_and_zero_sharding() -> None:
    cfg = ModelConfig.from_preset("llama-7b")
    est = estimate_memory(cfg, "bf16", zero=0, gpus=1, seq=4096)
    assert 13.4e9 < est.weights < 13.5e9  # 7B parameters in 2 bytes: ~14 GB of weights alone
    assert est.optimizer == 12 * est.params  # fp32 master + two AdamW moments
    sharded = [estimate_memory(cfg, "bf16", zero=z, gpus=8, seq=4096) for z in range(4)]
    assert sharded[1].optimizer == est.optimizer / 8 and sharded[1].gradients == est.gradients
    assert sharded[2].gradients == est.gradients / 8 and sharded[2].weights == est.weights
    assert sharded[3].weights == est.weights / 8
    assert [s.total for s in sharded] == sorted((s.total for s in sharded), reverse=True)
    ckpt = estimate_memory(cfg, "bf16", seq=4096, activation_checkpointing=True)
    assert ckpt.activations < est.activations / 5
