"""Weight-only int8 and half-precision weights: each int8 kernel against the dequantized matmul,
a quantized model against fp32 on real text (bits per byte, top-1 agreement), generation and
the CLI flag."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import ScratchError
from scratchlm.generate import generate, generate_batch
from scratchlm.model import GPT, ModelConfig
from scratchlm.model.load import load_pretrained
from scratchlm.quantize import (
    Int8Linear,
    fbgemm_available,
    pick_kernel,
    quantization_label,
    quantize,
    quantize_weight,
)

CPU_KERNELS = ["int8pack", "dequant"] + (["fbgemm"] if fbgemm_available() else [])


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_quantize_weight_per_output_channel() -> None:
    w = torch.randn(48, 32) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different size
    w[5] = 0.0
    q, scales = quantize_weight(w)
    assert q.dtype == torch.int8 and scales.shape == (48,)
    assert int(q.abs().max()) == 127
    assert torch.equal(q[5], torch.zeros(32, dtype=torch.int8))
    rows = w.abs().amax(1) > 0
    assert torch.allclose(scales[rows], w.abs().amax(1)[rows] / 127)
    # round to nearest: every weight within half a step of its row's grid
    err = (q.float() * scales[:, None] - w).abs()
    assert (err <= scales[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_kernels(kernel: str, bias: bool) -> None:
    linear = nn.Linear(96, 80, bias=bias)
    x = torch.randn(3, 7, 96)
    layer = Int8Linear.from_linear(linear, kernel)
    dequantized = F.linear(x, layer.q.float() * layer.scales[:, None], linear.bias)
    y = layer(x)
    assert y.shape == (3, 7, 80) and y.dtype == torch.float32
    if kernel == "fbgemm":  # activations are rounded to 7 bits too: a looser match
        rel = (y - dequantized).norm() / dequantized.norm()
        assert rel < 0.02
    else:  # weight-only: the same sum as the dequantized weights give
        assert (y - dequantized).abs().max().item() < 1e-4
    assert (y - linear(x)).norm() / linear(x).norm() < 0.03  # and close to fp32


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_int8_model_quality_on_real_text(tiny_run: Path, shakespeare: str, kernel: str) -> None:
    from scratchlm.eval.perplexity import evaluate_text

    model, tok, _ = load_pretrained(tiny_run)
    text = shakespeare[-10_000:]
    q = quantize(copy.deepcopy(model), "int8", kernel)
    assert quantization_label(q) == f"int8 ({kernel})"
    assert all(not isinstance(m, nn.Linear) for m in q.modules())
    fp, i8 = evaluate_text(model, tok, text), evaluate_text(q, tok, text)
    assert abs(i8["bpb"] - fp["bpb"]) / fp["bpb"] < 0.01
    ids = torch.tensor([tok.encode(text[:3000])[:model.config.block_size]])
    with torch.no_grad():
        agree = (q(ids)[0].argmax(-1) == model(ids)[0].argmax(-1)).float().mean().item()
    assert agree > 0.9


def test_int8_generation_batched_and_cached(tiny_run: Path) -> None:
    model, _, _ = load_pretrained(tiny_run)
    q = quantize(model, "int8", "int8pack")  # weight-only: rows of a batch do not interact
    assert q.new_cache(1, 8).k.dtype == torch.float32
    prompts = [torch.randint(0, 2000, (n,)).tolist() for n in (3, 11, 6)]
    batched = generate_batch(q, prompts, 10, temperature=0.0)
    for p, b in zip(prompts, batched):
        alone = generate(q, torch.tensor([p]), 10, temperature=0.0)[0, len(p):].tolist()
        assert b == alone
        assert b == generate(q, torch.tensor([p]), 10, temperature=0.0,
                             use_kv_cache=False)[0, len(p):].tolist()


def test_untied_model_and_half_precision_weights() -> None:
    model = GPT(ModelConfig.from_preset("llama-tiny")).eval()  # untied head
    idx = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        ref = model(idx)[0]
        q = quantize(copy.deepcopy(model), "int8", "dequant")
        assert q.tok_emb.q.data_ptr() != q.lm_head.q.data_ptr()
        assert (q(idx)[0] - ref).norm() / ref.norm() < 0.03
        tied = GPT(ModelConfig.from_preset("gpt2-tiny")).eval()
        qt = quantize(copy.deepcopy(tied), "int8", "dequant")
        assert qt.tok_emb.q.data_ptr() == qt.lm_head.q.data_ptr()  # one table, as before
        bf = quantize(copy.deepcopy(model), "bf16")
        assert bf.lm_head.weight.dtype == torch.bfloat16 and quantization_label(bf) == "bf16"
        assert bf.new_cache(1, 4).k.dtype == torch.bfloat16
        out = bf(idx)[0].float()
        assert (out - ref).norm() / ref.norm() < 0.05
    with pytest.raises(ScratchError, match="unknown quantization"):
        quantize(model, "int4")
    with pytest.raises(ScratchError, match="unknown int8 kernel"):
        pick_kernel("fast", torch.device("cpu"))


def test_generate_quantize_flag(tiny_run: Path, monkeypatch, capsys) -> None:
    from scratchlm.cli import main

    argv = ["generate", "--model", str(tiny_run), "--prompt", "ROMEO:", "--temperature", "0",
            "--max-new-tokens", "12"]
    assert main(argv + ["--quantize", "int8"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    if not torch.cuda.is_available():
        assert main(argv + ["--quantize", "bf16"]) == 2
        assert "for a GPU" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["int8", "bf16", "fp16"])
def test_gpu_quantized_generation(tiny_run: Path, mode: str) -> None:
    model, _, _ = load_pretrained(tiny_run, "cuda")
    idx = torch.randint(0, 2000, (2, 16), device="cuda")
    with torch.no_grad():
        ref = model(idx)[0].float()
        q = quantize(copy.deepcopy(model), mode)
        out = q(idx)[0].float()
    assert (out - ref).norm() / ref.norm() < 0.05
    new = generate_batch(q, [idx[0, :5].tolist(), idx[1].tolist()], 8, temperature=0.0)
    assert [len(t) for t in new] == [8, 8]
