"""Generation: the KV cache against full recompute, sampling filters, stops, streaming."""

from __future__ import annotations

import pytest
import torch

from scratchlm.errors import ScratchError
from scratchlm.generate import (
    TextStream,
    generate,
    generate_batch,
    generate_text,
    sample_next,
    stream,
    stream_text,
    template_chat_ids,
)
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



# ------------------------------------------------------------------------------------------------
# batches of prompts of different lengths (left padding, per-row positions, continuous batching)


@pytest.mark.parametrize("preset, kw", PRESETS)
def test_padded_batch_logits_equal_each_row_alone(preset: str, kw: dict) -> None:
    from scratchlm.model.attention import padded_causal_mask

    model = GPT(ModelConfig.from_preset(preset, **kw)).eval()
    lengths = [7, 12, 3]
    T = max(lengths)
    rows = [torch.randint(0, 512, (n,)) for n in lengths]
    idx = torch.stack([torch.cat([torch.zeros(T - n, dtype=torch.long), r])
                       for n, r in zip(lengths, rows)])
    start = torch.tensor([T - n for n in lengths])
    positions = (torch.arange(T)[None] - start[:, None]).clamp(min=0)
    logits = model(idx, positions=positions, mask=padded_causal_mask(start, T, T))[0]
    for b, r in enumerate(rows):
        alone = model(r[None])[0][0]  # (n, vocab)
        assert (logits[b, T - len(r):] - alone).abs().max().item() < 1e-5
    # and through the cache: the padded prompt, then a token per row
    cache = model.new_cache(3, 32)
    model(idx, cache=cache, positions=positions, mask=padded_causal_mask(start, T, T))
    nxt = torch.randint(0, 512, (3,))
    step = model(nxt[:, None], cache=cache, positions=(T - start)[:, None],
                 mask=padded_causal_mask(start, 1, T + 1))[0][:, -1]
    for b, r in enumerate(rows):
        alone = model(torch.cat([r, nxt[b:b + 1]])[None])[0][0, -1]
        assert (step[b] - alone).abs().max().item() < 1e-5


@pytest.mark.parametrize("preset, kw", PRESETS)
@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_batched_generation_equals_each_prompt_alone(preset: str, kw: dict,
                                                     use_kv_cache: bool) -> None:
    # a 40-token context and 3 rows for 7 prompts: rows join late (a longer prompt moves the
    # others right), leave early, and the columns run out (compaction)
    model = GPT(ModelConfig.from_preset(preset, block_size=40, **kw)).eval()
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (5, 28, 12, 1, 20, 25, 9)]
    greedy = generate_batch(model, prompts, 12, temperature=0.0, use_kv_cache=use_kv_cache,
                            max_batch=3)
    sampled = generate_batch(model, prompts, 12, temperature=0.9, top_k=40, top_p=0.9, seed=3,
                             use_kv_cache=use_kv_cache, max_batch=3)
    for p, g, s in zip(prompts, greedy, sampled):
        alone = generate(model, torch.tensor([p]), 12, temperature=0.0)[0, len(p):].tolist()
        assert g == alone
        alone = generate(model, torch.tensor([p]), 12, temperature=0.9, top_k=40, top_p=0.9,
                         seed=3)[0, len(p):].tolist()
        assert s == alone


def test_each_row_stops_at_its_own_stop_token() -> None:
    model = GPT(ModelConfig.from_preset("gpt2-tiny")).eval()
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (4, 9)]
    free = generate_batch(model, prompts, 20, temperature=0.0)
    stop = free[0][2]  # row 0's third new token
    out = generate_batch(model, prompts, 20, temperature=0.0, stop_tokens=[stop])
    assert out[0] == free[0][:free[0].index(stop) + 1]
    cut = free[1].index(stop) + 1 if stop in free[1] else 20
    assert out[1] == free[1][:cut]


@pytest.fixture(scope="module")
def small_tok(shakespeare: str) -> BPETokenizer:
    return BPETokenizer.train(shakespeare[:50_000], 300, progress=False)


def test_generate_text_batch_equals_single_with_stops(small_tok: BPETokenizer) -> None:
    tok = small_tok
    model = GPT(ModelConfig.from_preset("llama-tiny", vocab_size=300)).eval()
    prompts = ["KING:", "First Citizen:\nWe are", "O"]
    single = [generate_text(model, tok, p, 30, temperature=0.0) for p in prompts]
    assert generate_text(model, tok, prompts, 30, temperature=0.0) == single
    stop = single[1][3:6]
    cut = [generate_text(model, tok, p, 30, temperature=0.0, stop=[stop]) for p in prompts]
    assert generate_text(model, tok, prompts, 30, temperature=0.0, stop=[stop]) == cut
    assert cut[1] == single[1][:single[1].index(stop)]
    sampled = generate_text(model, tok, prompts, 20, temperature=1.0, seed=4, use_kv_cache=False)
    assert sampled == [generate_text(model, tok, p, 20, temperature=1.0, seed=4)
                       for p in prompts]


def test_text_stream_holds_back_stop_strings_and_split_characters(small_tok) -> None:
    tok = small_tok
    text = "héllo wörld, STOP here"
    ids = tok.encode(text)
    ts = TextStream(tok, ["STOP"])
    pieces = []
    for t in ids:
        pieces.append(ts.push(t))
        if ts.stopped:
            break
    assert "".join(pieces) == "héllo wörld, " and ts.stopped
    ts = TextStream(tok)
    assert "".join(ts.push(t) for t in ids) + ts.flush() == text


def test_chat_verb_uses_the_models_template(chat_model, monkeypatch, capsys) -> None:
    import io

    from scratchlm.cli import main
    from scratchlm.model.load import load_pretrained
    from scratchlm.templates import load_template

    model, tok, _ = load_pretrained(chat_model)
    template = load_template(chat_model)
    monkeypatch.setattr("sys.stdin", io.StringIO("Good morrow\nWhat news?\n\n"))
    assert main(["chat", "--model", str(chat_model), "--temperature", "0",
                 "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "chat template" in out
    first = "".join(stream_text(model, tok, template.encode(
        tok, [{"role": "user", "content": "Good morrow"}], add_generation_prompt=True)[0], 12,
        temperature=0.0, stop_tokens=template.stop_ids(tok)))
    second_ids = template_chat_ids(template, tok, [("Good morrow", first.strip())],
                                   "What news?", model.config.block_size - 12)
    second = "".join(stream_text(model, tok, second_ids, 12, temperature=0.0,
                                 stop_tokens=template.stop_ids(tok)))
    assert out.split("> ")[1:3] == [first + "\n", second + "\n"]
    assert tok.special_tokens["<|user|>"] in second_ids


# ------------------------------------------------------------------------------------------------
# option checks: one place (check_sampling), before anything runs


def test_check_sampling_refuses_each_bad_option_by_name() -> None:
    from scratchlm.generate import SamplingError, check_sampling, check_stop

    check_sampling(0.0, None, None, 1, -2**63)
    check_sampling(1.0, 1, 1.0, 1, 2**64 - 2, n=2)  # seeds 2**64 - 2 and 2**64 - 1
    for kwargs, option in [(dict(temperature=float("nan")), "temperature"),
                           (dict(temperature=float("inf")), "temperature"),
                           (dict(temperature=-1.0), "temperature"),
                           (dict(temperature=1.0, top_k=0), "top_k"),
                           (dict(temperature=1.0, top_p=1.5), "top_p"),
                           (dict(temperature=1.0, top_p=float("nan")), "top_p"),
                           (dict(temperature=1.0, max_new_tokens=0), "max_new_tokens"),
                           (dict(temperature=1.0, seed=2**64), "seed"),
                           (dict(temperature=1.0, seed=-2**63 - 1), "seed"),
                           (dict(temperature=1.0, seed=2**64 - 1, n=2), "seed")]:
        with pytest.raises(SamplingError) as e:
            check_sampling(**kwargs)
        assert e.value.option == option and str(e.value).startswith(option)
    with pytest.raises(SamplingError, match="stop strings must not be empty"):
        check_stop(["\n", ""])
    with pytest.raises(SamplingError, match="stop"):
        TextStream(None, [""])  # never silently dropped


def test_a_seed_torch_cannot_take_is_a_clear_error_not_a_value_error() -> None:
    from scratchlm.generate import BatchGenerator, Generation

    model = GPT(ModelConfig.from_preset("gpt2-tiny")).eval()
    with pytest.raises(ScratchError, match="seed must be an integer"):
        list(stream(model, torch.ones(1, 2).long(), 2, seed=99999999999999999999999))
    with pytest.raises(ScratchError, match="seed must be an integer"):
        BatchGenerator(model).submit(Generation([1, 2], 2, seed=99999999999999999999999))


def test_a_failed_prefill_fails_the_generations_it_was_admitting() -> None:
    """fail_all must end every generation the failing step touched, those being prefilled
    included (else the server waits on them forever), and leave the batcher reusable."""
    from scratchlm.generate import BatchGenerator, Generation

    model = GPT(ModelConfig.from_preset("gpt2-tiny")).eval()
    batcher = BatchGenerator(model, max_batch=2)
    first = Generation([1, 2, 3], 5, temperature=0.0)
    batcher.submit(first)
    batcher.step()  # first holds a row
    late = [Generation([4, 5], 5, temperature=0.0), Generation([6], 5, temperature=0.0)]
    for g in late:
        batcher.submit(g)
    real = model.forward
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the step's decode passes, the prefill of the late ones fails
            raise RuntimeError("injected")
        return real(*args, **kwargs)
    model.forward = failing
    with pytest.raises(RuntimeError):
        batcher.step()
    del model.forward
    assert set(map(id, batcher.fail_all())) == {id(first), *map(id, late)}
    assert not batcher.busy()
    again = Generation([4, 5], 5, temperature=0.0)
    batcher.submit(again)
    while batcher.busy():
        batcher.step()
    assert again.tokens == generate_batch(model, [[4, 5]], 5, temperature=0.0)[0]


@pytest.mark.parametrize("verb, flags, message", [
    ("generate", ["--max-new-tokens", "-3"], "--max-new-tokens must be >= 1"),
    ("generate", ["--num-samples", "0"], "--num-samples must be >= 1"),
    ("generate", ["--num-samples", "-1"], "--num-samples must be >= 1"),
    ("generate", ["--temperature", "nan"], "--temperature must be a finite number"),
    ("generate", ["--max-new-tokens", "5000"], "exceeds the model's context"),
    ("generate", ["--stop", ""], "--stop strings must not be empty"),
    ("generate", ["--seed", "99999999999999999999999"], "--seed must be an integer"),
    ("chat", ["--max-new-tokens", "-5"], "--max-new-tokens must be >= 1"),
    ("chat", ["--temperature", "-1"], "--temperature must be a finite number"),
    ("chat", ["--top-p", "2"], "--top-p must be in (0, 1]"),
    ("chat", ["--top-k", "0"], "--top-k must be >= 1"),
    ("chat", ["--max-new-tokens", "5000"], "leaves no room for a message"),
])
def test_generate_and_chat_refuse_bad_flags_before_any_output(
        tiny_run, monkeypatch, capsys, verb: str, flags: list[str], message: str) -> None:
    """One `error:` line, status 2, and nothing on stdout: no prompt echoed before the error,
    no chat banner, no message read."""
    import io

    from scratchlm.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\n"))
    argv = [verb, "--model", str(tiny_run)] + (["--prompt", "ROMEO:"] if verb == "generate"
                                               else [])
    assert main(argv + flags) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="half precision is refused on a CPU only")
@pytest.mark.parametrize("verb", ["generate", "chat"])
def test_half_precision_is_refused_on_a_cpu(tiny_run, capsys, verb: str) -> None:
    from scratchlm.cli import main

    argv = [verb, "--model", str(tiny_run), "--quantize", "fp16"] + (
        ["--prompt", "x"] if verb == "generate" else [])
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: --quantize fp16 is for a GPU")
