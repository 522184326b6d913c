"""Lower-precision inference: weight-only int8 on the CPU (or GPU), bf16 / fp16 weights on a GPU.

At batch 1 every new token streams all the weights through memory, so fewer bytes per weight
is what makes decoding faster once scheduling is done. `quantize(model, "int8")` replaces each
linear layer (attention, MLP and the output head) by an `Int8Linear`: int8 weights with one
fp32 scale per output channel (symmetric, scale = max |w| of the row / 127), and the token
embedding by an `Int8Embedding` that reads the same int8 table (a tied head and embedding stay
one table). Norms, biases and learned positions stay in floating point. Nothing is written:
a model is quantized when it is loaded, in well under a second at these sizes.

The int8 matmul has three kernels, all PyTorch's own:
- "int8pack": torch._weight_int8pack_mm, weight-only (fp32 activations times int8 weights).
  Vectorised for AVX-512 CPUs; on an AVX2-only CPU (such as this project's machine) it is
  several times slower than fp32 (see bench/bench_model.py).
- "fbgemm": torch.ops.quantized.linear_dynamic on weights packed by
  torch.ops.quantized.linear_prepack (FBGEMM, x86). Each call also rounds its activations to
  7-bit integers with one scale per call (dynamic quantization; 7 bits, `reduce_range`, keep
  AVX2's 16-bit pair sums from saturating), then multiplies in integers. Fast on AVX2.
- "dequant": the int8 weights turned back into the activations' dtype for each call, then
  F.linear: no speed-up, a quarter of the weight memory; the GPU path.
"auto" picks fbgemm on an x86 CPU that has it, int8pack on another CPU, dequant on a GPU.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import ScratchError
from scratchlm.model.gpt import GPT

MODES = ("int8", "bf16", "fp16")
KERNELS = ("auto", "fbgemm", "int8pack", "dequant")


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) float -> (int8 (out, in), fp32 scales (out,)), w ~ q * scales[:, None]."""
    w = w.detach().float()
    # An all-zero row gets scale 1 rather than 0, so that nothing divides by zero.
    scales = (w.abs().amax(dim=1) / 127.0).masked_fill_(w.abs().amax(dim=1) == 0, 1.0)
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def fbgemm_available() -> bool:
    return ("fbgemm" in torch.backends.quantized.supported_engines
            and hasattr(torch.ops.quantized, "linear_dynamic"))


def pick_kernel(kernel: str, device: torch.device) -> str:
    if kernel not in KERNELS:
        raise ScratchError(f"unknown int8 kernel {kernel!r}; choose from {', '.join(KERNELS)}")
    if kernel == "auto":
        if device.type != "cpu":
            return "dequant"
        return "fbgemm" if fbgemm_available() else "int8pack"
    if kernel == "fbgemm" and (device.type != "cpu" or not fbgemm_available()):
        raise ScratchError("the fbgemm int8 kernel needs an x86 CPU build of PyTorch with "
                           "FBGEMM; use kernel 'int8pack' or 'dequant'")
    if kernel == "int8pack" and device.type == "cuda":
        raise ScratchError("torch._weight_int8pack_mm has no CUDA kernel; use 'dequant' "
                           "(or bf16/fp16 weights) on a GPU")
    return kernel


class Int8Linear(nn.Module):
    """y = (x @ q^T) * scales + bias, with q int8 (out, in) and fp32 scales (out,)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 kernel: str) -> None:
        super().__init__()
        self.in_features, self.out_features = q.size(1), q.size(0)
        self.kernel = kernel
        self.register_buffer("q", q)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._packed = None
        if kernel == "fbgemm":
            with warnings.catch_warnings():  # quantized tensors are deprecated, the op is not
                warnings.simplefilter("ignore")
                zero = torch.zeros(q.size(0), dtype=torch.long)
                qw = torch._make_per_channel_quantized_tensor(q.cpu(), scales.double().cpu(),
                                                              zero, 0)
                self._packed = torch.ops.quantized.linear_prepack(
                    qw, None if self.bias is None else self.bias.cpu())

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str) -> Int8Linear:
        q, scales = quantize_weight(linear.weight)
        return cls(q, scales, linear.bias, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (N, in): the kernels take matrices
        if self.kernel == "fbgemm":
            y = torch.ops.quantized.linear_dynamic(x2.float().contiguous(), self._packed, True)
            return y.to(x.dtype).view(*shape[:-1], self.out_features)
        if self.kernel == "int8pack":
            y = torch._weight_int8pack_mm(x2.contiguous(), self.q, self.scales.to(x.dtype))
        else:  # dequant: scale the weights' rows, not the output, so bias stays separate
            y = F.linear(x2, self.q.to(x.dtype) * self.scales.to(x.dtype)[:, None])
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")


class Int8Embedding(nn.Module):
    """Rows of an int8 table (vocab, n_embd) times their scales: the token embedding, sharing
    the table with an Int8Linear head when the two are tied."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scales", scales)
        self.dtype = dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.q[idx].to(self.dtype) * self.scales[idx, None].to(self.dtype)


def quantize(model: GPT, mode: str, kernel: str = "auto") -> GPT:
    """Quantize `model` in place for inference (see the module's notes) and return it.
    mode: "int8" (weight-only, per-channel), "bf16" or "fp16" (all weights cast; meant for a
    GPU: on a CPU these matmuls are far slower than fp32)."""
    if mode not in MODES:
        raise ScratchError(f"unknown quantization {mode!r}; choose from {', '.join(MODES)}")
    model.eval()
    if mode in ("bf16", "fp16"):
        return model.to(torch.bfloat16 if mode == "bf16" else torch.float16)
    device = next(model.parameters()).device
    kernel = pick_kernel(kernel, device)
    dtype = model.tok_emb.weight.dtype
    tied = model.config.tie_embeddings
    head = Int8Linear.from_linear(model.lm_head, kernel)
    model.tok_emb = Int8Embedding(head.q, head.scales, dtype) if tied else \
        Int8Embedding(*quantize_weight(model.tok_emb.weight), dtype)
    model.lm_head = head
    for block in model.blocks.values():
        for module in list(block.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, child_name, Int8Linear.from_linear(child, kernel))
    return model.to(device)


def quantization_label(model: GPT) -> str:
    """"int8 (fbgemm)", "bf16", "fp32", ...: what a server or benchmark reports."""
    if isinstance(model.lm_head, Int8Linear):
        return f"int8 ({model.lm_head.kernel})"
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        model.norm_f.weight.dtype, str(model.norm_f.weight.dtype))
