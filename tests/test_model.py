"""The transformer against `transformers` (both directions), its two attention paths against
each other, and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from scratchlm.errors import ScratchError
from scratchlm.memory import count_params
from scratchlm.model import GPT, ModelConfig
from scratchlm.model.checkpoint import load_model, save_model
from scratchlm.model.dropout import dropout
from scratchlm.model.hf import from_hf, save_hf, to_hf
from scratchlm.model.logprobs import cross_entropy_sum, sequence_logprobs, token_logprobs
from scratchlm.parallel.runtime import apply_activation_checkpointing

transformers.logging.set_verbosity_error()

HF_GPT2 = [
    dict(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4),
    dict(vocab_size=257, n_positions=32, n_embd=64, n_layer=3, n_head=8, n_inner=100,
         layer_norm_epsilon=1e-6, tie_word_embeddings=True),
    dict(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4,
         activation_function="gelu"),  # the exact GELU: our mlp gelu_exact
]
HF_LLAMA = [
    dict(num_attention_heads=8, num_key_value_heads=8),  # multi-head
    dict(num_attention_heads=8, num_key_value_heads=2),  # grouped-query
    dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),  # multi-query
    dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
         rope_theta=500000.0),
    dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
]


def hf_gpt2(**kw):
    cfg = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()


def hf_llama(**kw):
    base = dict(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                max_position_embeddings=128, rms_norm_eps=1e-6)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**base, **kw})).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------------
# configuration and sizes


def test_inconsistent_shapes_are_refused() -> None:
    with pytest.raises(ScratchError, match="divisible by n_head"):
        ModelConfig(n_embd=100, n_head=12)
    with pytest.raises(ScratchError, match="must divide n_head"):
        ModelConfig(n_head=12, n_kv_head=5)
    with pytest.raises(ScratchError, match="head_dim must be even"):
        ModelConfig(n_embd=36, n_head=12, pos_emb="rope")
    with pytest.raises(ScratchError, match="did you mean 'llama-7b'"):
        ModelConfig.from_preset("lama-7b")
    with pytest.raises(ScratchError, match="unknown model field"):
        ModelConfig.from_preset("gpt2-tiny", n_layers=3)


def test_parameter_counts_match_the_published_models() -> None:
    # GPT-2 small as Hugging Face counts it; Llama 2 7B and Llama 3.2 1B from their configs.
    cfg = ModelConfig.from_preset("gpt2-124m")
    assert count_params(cfg) == GPT(cfg).num_params() == 124_439_808
    assert count_params(ModelConfig.from_preset("llama-7b")) == 6_738_415_616
    assert count_params(ModelConfig.from_preset("llama-1b")) == 1_235_814_400
    for name in ["gpt2-tiny", "llama-tiny"]:
        for kw in [{}, {"bias": True}, {"tie_embeddings": True}, {"n_kv_head": 1}]:
            cfg = ModelConfig.from_preset(name, **kw)
            assert count_params(cfg) == GPT(cfg).num_params()


def test_flops_per_token_and_summary() -> None:
    cfg = ModelConfig.from_preset("gpt2-124m")
    model = GPT(cfg)
    n = model.num_params(non_embedding=True) + cfg.vocab_size * cfg.n_embd  # + the tied head
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 12 * 64 * 1024
    assert model.num_params(non_embedding=True) == 124_439_808 - 50257 * 768 - 1024 * 768
    text = model.summary()
    assert "124.44M parameters" in text and "multi-head" in text


def test_loss_ignores_minus_100() -> None:
    model = GPT(ModelConfig.from_preset("gpt2-tiny"))
    idx = torch.randint(0, 512, (2, 12))
    targets = idx.clone()
    targets[:, :5] = -100
    logits, hidden = model(idx)
    assert hidden.shape == (2, 12, 64)
    loss, count = cross_entropy_sum(logits, targets)
    ref = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 512),
                                            targets[:, 5:].reshape(-1), reduction="sum")
    assert int(count) == 14 and torch.allclose(loss, ref, atol=1e-5)
    logp = token_logprobs(logits, targets)
    assert torch.all(logp[:, :5] == 0) and torch.allclose(-logp.sum(), ref, atol=1e-5)
    assert torch.allclose(sequence_logprobs(logits, targets, "mean"), logp.sum(-1) / 7)
    assert model(idx, logits=False)[0] is None  # hidden states alone, for heads


def test_token_ids_out_of_range_are_a_clear_error() -> None:
    model = GPT(ModelConfig.from_preset("gpt2-tiny"))
    for bad in (512, -1):
        with pytest.raises(ScratchError, match=f"token id {bad} is outside"):
            model(torch.tensor([[1, bad, 2]]))


def test_input_longer_than_context_is_a_clear_error() -> None:
    model = GPT(ModelConfig.from_preset("gpt2-tiny"))
    with pytest.raises(ScratchError, match="longer than the model's context"):
        model(torch.zeros(1, 129, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# attention: written out vs fused


@pytest.mark.parametrize("preset, kw", [
    ("gpt2-tiny", {}), ("gpt2-tiny", {"n_kv_head": 2}), ("llama-tiny", {}),
    ("llama-tiny", {"n_kv_head": 1}), ("llama-tiny", {"n_kv_head": 4, "bias": True}),
])
def test_manual_attention_equals_fused(preset: str, kw: dict) -> None:
    fused = GPT(ModelConfig.from_preset(preset, **kw))
    manual = GPT(ModelConfig.from_preset(preset, attention="manual", **kw))
    manual.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 512, (3, 40))
    lf, lm = fused(idx)[0], manual(idx)[0]
    loss_f, loss_m = cross_entropy_sum(lf, idx)[0], cross_entropy_sum(lm, idx)[0]
    assert max_diff(lf, lm) < 1e-5
    loss_f.backward()
    loss_m.backward()
    for (name, pf), pm in zip(fused.named_parameters(), manual.parameters()):
        assert max_diff(pf.grad, pm.grad) < 1e-5, name


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_activation_checkpointing_gives_the_same_gradients(rate: float) -> None:
    """With dropout too: the recomputed forward draws the same masks (the RNG is replayed)."""
    model = GPT(ModelConfig.from_preset("llama-tiny", dropout=rate))
    idx = torch.randint(0, 512, (2, 32))
    torch.manual_seed(1)
    cross_entropy_sum(model(idx)[0], idx)[0].backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    apply_activation_checkpointing(model)
    torch.manual_seed(1)
    cross_entropy_sum(model(idx)[0], idx)[0].backward()
    for g, p in zip(plain, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_fast_dropout_keeps_the_rate_and_the_expectation() -> None:
    """The CPU masks: the rate (to 2^-15), independent elements (the four lanes of each 64-bit
    draw among them), the kept values scaled by 1 / kept fraction, backward through the same
    mask, the same draws for the same seed; eval and rate 0 are the identity."""
    x = torch.randn(1001, 999, requires_grad=True)  # not a multiple of 4 elements
    y = dropout(x, 0.2)
    kept = y != 0
    dropped = (~kept).flatten()
    assert abs(dropped.float().mean().item() - 0.2) < 0.003  # std of the mean: 0.0004
    # each pair of neighbours (two lanes of one draw, or of two draws) dropped together: p^2
    for lag in (1, 2, 3, 4):
        both = (dropped[:-lag] & dropped[lag:]).float().mean().item()
        assert abs(both - 0.04) < 0.002, lag
    scale = y[kept] / x[kept]
    torch.testing.assert_close(scale, torch.full_like(scale, 1 / 0.8), rtol=3e-5, atol=0)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept * (y.sum() / x[kept].sum()).detach(), rtol=1e-4,
                               atol=0)
    torch.manual_seed(3)
    a = dropout(x.detach(), 0.5)
    torch.manual_seed(3)
    assert torch.equal(a, dropout(x.detach(), 0.5))
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_attention_dropout_keeps_the_expectation(attention: str) -> None:
    """Attention in training with dropout (on a CPU, written out with the fast masks): the
    mean of many draws is the output without dropout; one draw is not."""
    attn = GPT(ModelConfig.from_preset("gpt2-tiny", dropout=0.5, attention=attention)
               ).blocks["0"].attn
    attn.resid_drop.p = 0.0  # the attention weights' dropout alone
    x = torch.randn(1, 8, 64)
    with torch.no_grad():
        exact = attn.eval()(x)
        attn.train()
        draws = torch.stack([attn(x) for _ in range(3000)])
    size = exact.abs().max().item()
    assert max_diff(draws[0], exact) > 0.3 * size
    assert max_diff(draws.mean(0), exact) < 0.05 * size


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_dropout_switched_off_everywhere(attention: str) -> None:
    """A model pretrained with dropout, scored in training mode (DPO, PPO): with its dropout
    set to 0 a sequence gets the same logits each time, the fused attention's rate included."""
    from scratchlm.align.common import disable_dropout

    model = GPT(ModelConfig.from_preset("llama-tiny", dropout=0.5, attention=attention)).train()
    idx = torch.randint(0, 512, (2, 32))
    assert max_diff(model(idx)[0], model(idx)[0]) > 0.1  # dropout on: two draws differ
    disable_dropout(model)
    assert torch.equal(model(idx)[0], model(idx)[0])
    assert torch.equal(model(idx)[0], model.eval()(idx)[0])


# ------------------------------------------------------------------------------------------------
# Hugging Face transformers, both directions


@pytest.mark.parametrize("kw", HF_GPT2)
def test_from_hf_gpt2_logits(kw: dict) -> None:
    hf = hf_gpt2(**kw)
    ours = from_hf(hf).eval()
    idx = torch.randint(0, kw["vocab_size"], (2, 30))
    assert max_diff(ours(idx)[0], hf(idx).logits) <= 1e-4


@pytest.mark.parametrize("kw", HF_LLAMA)
def test_from_hf_llama_logits(kw: dict) -> None:
    hf = hf_llama(**kw)
    ours = from_hf(hf).eval()
    idx = torch.randint(0, 301, (2, 100))
    assert max_diff(ours(idx)[0], hf(idx).logits) <= 1e-4


@pytest.mark.parametrize("preset, kw", [
    ("gpt2-tiny", {}), ("gpt2-tiny", {"intermediate_size": 100}),
    ("gpt2-tiny", {"mlp": "gelu_exact"}), ("llama-tiny", {}),
    ("llama-tiny", {"n_kv_head": 1, "tie_embeddings": True}), ("llama-tiny", {"bias": True}),
])
def test_to_hf_logits(preset: str, kw: dict) -> None:
    ours = GPT(ModelConfig.from_preset(preset, **kw)).eval()
    hf = to_hf(ours)
    idx = torch.randint(0, 512, (2, 50))
    assert max_diff(ours(idx)[0], hf(idx).logits) <= 1e-4


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_save_hf_loads_in_transformers_and_back(preset: str, tmp_path: Path,
                                                shakespeare: str) -> None:
    from scratchlm.tokenizer import BPETokenizer

    tok = BPETokenizer.train(shakespeare[:100_000], 512, progress=False)
    ours = GPT(ModelConfig.from_preset(preset)).eval()
    save_hf(ours, tmp_path, tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 512, (2, 40))
    assert max_diff(ours(idx)[0], hf(idx).logits) <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "ROMEO:\nBut soft, what light through yonder window breaks?"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    back = from_hf(tmp_path).eval()  # from the directory, through safetensors alone
    assert max_diff(back(idx)[0], ours(idx)[0]) == 0.0


def test_from_hf_directory_written_by_transformers(tmp_path: Path) -> None:
    hf = hf_llama(num_attention_heads=8, num_key_value_heads=2)
    hf.save_pretrained(tmp_path)
    idx = torch.randint(0, 301, (1, 20))
    assert max_diff(from_hf(tmp_path)(idx)[0], hf(idx).logits) <= 1e-4


def test_unsupported_hf_models_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ScratchError, match="'bert' is not supported"):
        from_hf(tmp_path)
    with pytest.raises(ScratchError, match="neither GPT2LMHeadModel nor LlamaForCausalLM"):
        to_hf(GPT(ModelConfig.from_preset("gpt2-tiny", norm="rmsnorm")))


# ------------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    for preset in ["gpt2-tiny", "llama-tiny"]:
        model = GPT(ModelConfig.from_preset(preset)).eval()
        save_model(model, tmp_path / preset)
        back = load_model(tmp_path / preset).eval()
        idx = torch.randint(0, 512, (1, 16))
        assert torch.equal(model(idx)[0], back(idx)[0])
        assert back.config == model.config
        if model.config.tie_embeddings:
            assert back.lm_head.weight is back.tok_emb.weight


def test_checkpoint_from_another_model_is_refused(tmp_path: Path) -> None:
    save_model(GPT(ModelConfig.from_preset("gpt2-tiny")), tmp_path / "a")
    other = ModelConfig.from_preset("gpt2-tiny", n_embd=128)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["model"] = other.to_dict()
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ScratchError, match=r"tensor 'tok_emb.weight' has shape \(512, 64\) but "
                                           r"the config needs \(512, 128\)"):
        load_model(tmp_path / "a")


def test_bad_checkpoint_directories(tmp_path: Path) -> None:
    with pytest.raises(ScratchError, match="not a model checkpoint"):
        load_model(tmp_path)
    hf_gpt2(**HF_GPT2[0]).save_pretrained(tmp_path / "hf")
    with pytest.raises(ScratchError, match="convert it first"):
        load_model(tmp_path / "hf")
    save_model(GPT(ModelConfig.from_preset("gpt2-tiny")), tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ScratchError, match="not a readable safetensors file"):
        load_model(tmp_path / "ok")
