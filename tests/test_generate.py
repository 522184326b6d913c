"""Generation: the KV cache against full recompute, sampling filters, stops, streaming."""

from __future__ import annotations

import pytest
import torch

from scratchlm.errors import ScratchError
from scratchlm.generate import generate, sample_next, stream, stream_text
from scratchlm.model import GPT, ModelConfig
from scratchlm.tokenizer import BPETokenizer

PRESETS = [("gpt2-tiny", {}), ("llama-tiny", {}), ("llama-tiny", {"n_kv_head": 1}),
           ("gpt2-tiny", {"attention": "manual"})]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("preset, kw", PRESETS)
def test_cached_logits_equal_full_recompute(preset: str, kw: dict) -> None:
    model = GPT(ModelConfig.from_preset(preset, **kw)).eval()
    seq = torch.randint(0, 512, (2, 40))
    full = model(seq)[0]  # (2, 40, vocab)
    cache = model.new_cache(2, 64)
    # a 10-token prompt, a 5-token chunk after it (masked prefill), then one token at a time
    pieces = [seq[:, :10], seq[:, 10:15]] + [seq[:, t:t + 1] for t in range(15, 40)]
    got = torch.cat([model(p, cache=cache)[0] for p in pieces], dim=1)
    assert cache.length == 40
    assert (got - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("preset, kw", PRESETS)
def test_generate_with_and_without_cache(preset: str, kw: dict) -> None:
    model = GPT(ModelConfig.from_preset(preset, block_size=48, **kw)).eval()
    prompt = torch.randint(0, 512, (3, 8))
    greedy = generate(model, prompt, 30, temperature=0.0)
    assert greedy.shape == (3, 38) and torch.equal(greedy[:, :8], prompt)
    assert torch.equal(greedy, generate(model, prompt, 30, temperature=0.0, use_kv_cache=False))
    sampled = dict(temperature=0.9, top_k=50, top_p=0.9, seed=7)
    assert torch.equal(generate(model, prompt, 30, **sampled),
                       generate(model, prompt, 30, use_kv_cache=False, **sampled))
    # past the context: an error, or a sliding window that matches windowed recompute
    with pytest.raises(ScratchError, match="exceeds the model's context of 48"):
        generate(model, prompt, 41)
    windowed = generate(model, prompt, 60, temperature=0.0, sliding_window=True)
    assert torch.equal(windowed, generate(model, prompt, 60, temperature=0.0,
                                          sliding_window=True, use_kv_cache=False))


def test_greedy_equals_argmax_of_full_forward() -> None:
    model = GPT(ModelConfig.from_preset("llama-tiny")).eval()
    seq = torch.randint(0, 512, (1, 5))
    out = generate(model, seq, 10, temperature=0.0)
    for t in range(5, 15):
        assert out[0, t] == model(out[:, :t])[0][0, -1].argmax()


def test_sampling_filters() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 100, generator=g)
    assert torch.equal(sample_next(logits, 1.0, top_k=1), logits.argmax(-1))
    top5 = logits.topk(5, dim=-1).indices
    probs = logits.softmax(-1)
    order = probs.sort(-1, descending=True)
    # the nucleus: the most likely tokens until their mass first reaches 0.5
    nucleus = [set(order.indices[r, :int((order.values[r].cumsum(0) < 0.5).sum()) + 1].tolist())
               for r in range(4)]
    for _ in range(200):
        k = sample_next(logits, 1.0, top_k=5, generator=g)
        assert all(k[r] in top5[r] for r in range(4))
        p = sample_next(logits, 1.0, top_p=0.5, generator=g)
        assert all(int(p[r]) in nucleus[r] for r in range(4))
    a = sample_next(logits, 0.7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, sample_next(logits, 0.7, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ScratchError, match="top_p"):
        list(stream(GPT(ModelConfig.from_preset("gpt2-tiny")), torch.ones(1, 2).long(), 1,
                    top_p=0.0))


def test_sampling_distribution_matches_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, generator=g) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=4) / 4000
    assert (freq - logits.softmax(-1)[0]).abs().max() < 0.03


def test_stop_tokens_end_each_row() -> None:
    model = GPT(ModelConfig.from_preset("gpt2-tiny")).eval()
    prompt = torch.randint(0, 512, (2, 4))
    free = generate(model, prompt, 20, temperature=0.0)
    stop = int(free[0, 6])  # the row's third new token
    out = generate(model, prompt, 20, temperature=0.0, stop_tokens=[stop])
    assert torch.equal(out[0, :7], free[0, :7]) and (out[0, 6:] == stop).all()


def test_stream_text_stops_before_stop_string(shakespeare: str) -> None:
    tok = BPETokenizer.train(shakespeare[:100_000], 400, progress=False)
    model = GPT(ModelConfig.from_preset("gpt2-tiny", vocab_size=400)).eval()
    full = "".join(stream_text(model, tok, "KING:", 40, temperature=0.0, stop_at_eot=False))
    assert len(tok.encode(full, disallowed_special=())) >= 30
    target = full[5:9]
    cut = "".join(stream_text(model, tok, "KING:", 40, stop=[target], temperature=0.0,
                              stop_at_eot=False))
    assert cut == full[:full.index(target)]

