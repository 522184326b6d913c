"""How much memory training a model needs, per device, before allocating any of it.

States follow the ZeRO paper's accounting (Rajbhandari et al. 2020): with mixed precision the
weights and gradients are 2 bytes per parameter and the optimizer keeps an fp32 master copy
beside its moments (AdamW: 4 + 4 + 4 = 12 bytes); in fp32 everything is 4 bytes and AdamW keeps
two moments (8 bytes). ZeRO-1 shards the optimizer states over the data-parallel devices,
ZeRO-2 the gradients too, ZeRO-3 the weights too. Tensor parallelism divides the matrices and
embeddings, pipeline parallelism the blocks (the largest stage is reported).

Activations are counted tensor by tensor for scratchlm's own blocks: what autograd saves for
the backward pass, per token, per layer, plus the loss's gradients at the start of the backward
pass, the moment of peak memory. Tests check the count against the tensors autograd really
saves, and the total against the peak that `PeakMemory` measures. Dropout is assumed off (each
dropout adds a mask).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from scratchlm.errors import ScratchError
from scratchlm.model.config import ModelConfig

Dtype = Literal["fp32", "bf16", "fp16"]
Optimizer = Literal["adamw", "sgd"]
GB = 1e9


def count_params(cfg: ModelConfig, tp: int = 1, pp: int = 1) -> int:
    """Parameters of GPT(cfg), computed from the shapes (a 7B model is never allocated).
    With tp / pp: those one rank holds, on the largest pipeline stage. Tensor parallelism splits
    the matrices, their column-split biases and the embedding tables; norms, and the biases of
    row-split layers, stay whole on every rank. A tied head on its own last stage is a copy."""
    C, hd, H, kv, inner = cfg.n_embd, cfg.head_dim, cfg.n_head, cfg.n_kv_head, \
        cfg.intermediate_size
    norm = C * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    qkv = (C * (H + 2 * kv) * hd + ((H + 2 * kv) * hd if cfg.bias else 0)) // tp
    proj = H * hd * C // tp + (C if cfg.bias else 0)
    fc_width = inner * (2 if cfg.mlp == "swiglu" else 1)
    fc = (C * fc_width + (fc_width if cfg.bias else 0)) // tp
    down = inner * C // tp + (C if cfg.bias else 0)
    block = 2 * norm + qkv + proj + fc + down
    emb = (cfg.vocab_size * C + (cfg.block_size * C if cfg.pos_emb == "learned" else 0)) // tp
    head = cfg.vocab_size * C // tp
    blocks = cfg.n_layer // pp * block
    if pp == 1:
        return emb + blocks + norm + (0 if cfg.tie_embeddings else head)
    return max(emb + blocks, blocks + norm + head)  # the first stage, or the last


def lora_params(cfg: ModelConfig, rank: int, targets: list[str]) -> int:
    """Parameters of LoRA adapters of `rank` on the layers `targets` names (see
    scratchlm.model.lora): rank * (inputs + outputs) per adapted layer."""
    C, hd, H, kv, inner = cfg.n_embd, cfg.head_dim, cfg.n_head, cfg.n_kv_head, \
        cfg.intermediate_size
    shapes = {"q": [(C, H * hd)], "k": [(C, kv * hd)], "v": [(C, kv * hd)], "o": [(H * hd, C)],
              "mlp": [(C, inner)] * (2 if cfg.mlp == "swiglu" else 1) + [(inner, C)]}
    chosen = {part for t in targets for part in
              (["q", "k", "v", "o"] if t == "attn" else [] if t == "head" else [t])}
    per_block = sum(rank * (i + o) for t in chosen for i, o in shapes[t])
    head = rank * (C + cfg.vocab_size) if "head" in targets else 0
    return cfg.n_layer * per_block + head


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 N for the matmuls of forward + backward over the
    non-embedding parameters plus the head (Kaplan et al. 2020; the head is a matmul even when
    tied), plus 12 * n_layer * n_head * head_dim * T for attention scores and the weighted sum
    (Chowdhery et al. 2022, appendix B). From the config alone, so that it is the whole
    model's count on every rank of a layout that holds a part of it."""
    n = count_params(cfg) - cfg.vocab_size * cfg.n_embd
    if cfg.pos_emb == "learned":
        n -= cfg.block_size * cfg.n_embd
    if cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.n_embd
    return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


def activation_elements(cfg: ModelConfig, seq: int) -> tuple[float, float]:
    """(per layer, outside the layers) elements autograd saves per token in training."""
    C, hd, H, kv, inner = cfg.n_embd, cfg.head_dim, cfg.n_head, cfg.n_kv_head, \
        cfg.intermediate_size
    rope, gqa = cfg.pos_emb == "rope", kv != H
    # LayerNorm keeps its input and two statistics; our RMSNorm its input, the normalised
    # tensor and 1/rms. Either way the next linear layer keeps the norm's output.
    norm = 2 * C + 2 if cfg.norm == "layernorm" else 3 * C + 1
    # q, k, v as attention receives them: views of their projections' outputs where nothing
    # changed them, new tensors where RoPE rotated them or GQA repeated the kv heads.
    qkv = H * hd * (int(rope) + int(rope or gqa) + int(gqa))
    qkv += (0 if rope else H * hd) + (0 if rope or gqa else kv * hd) + (0 if gqa else kv * hd)
    if cfg.attention == "sdpa":  # output (also the projection's input) + log-sum-exp per head
        attn = H * hd + H
    else:  # the softmax matrix row of each head, and the merged heads for the projection
        attn = H * seq + H * hd
    mlp = 4 * inner if cfg.mlp == "swiglu" else 2 * inner
    per_layer = 2 * norm + qkv + attn + mlp
    # final norm + the log-softmax of the loss (vocab per token); RoPE tables are per position
    outside = norm + cfg.vocab_size + (2 * hd if rope else 0)
    return per_layer, outside


@dataclass
class MemoryEstimate:
    params: int
    weights: float  # bytes per device
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def table(self) -> str:
        rows = [("weights", self.weights), ("gradients", self.gradients),
                ("optimizer states", self.optimizer), ("activations", self.activations),
                ("total", self.total)]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{width}}  {value / GB:10.3f} GB" for name, value in rows)


def estimate_memory(
    cfg: ModelConfig,
    dtype: Dtype = "bf16",
    optimizer: Optimizer = "adamw",
    zero: int = 0,
    gpus: int = 1,
    micro_batch: int = 1,
    seq: int | None = None,
    activation_checkpointing: bool = False,
    tp: int = 1,
    pp: int = 1,
    lora_rank: int = 0,
    lora_targets: list[str] = ("attn",),
) -> MemoryEstimate:
    """Peak training memory per device, by component. `gpus` is the number of data-parallel
    ranks (over which ZeRO shards), `tp` and `pp` the tensor-parallel ranks (with sequence
    parallelism) and pipeline stages (1F1B, at least pp micro-batches per step). With
    `lora_rank`, the base is frozen: only the adapters have gradients and optimizer state (the
    adapters' own small activations, rank values per adapted layer and token, are not
    counted)."""
    if zero not in (0, 1, 2, 3):
        raise ScratchError(f"zero must be 0, 1, 2 or 3, got {zero}")
    if min(gpus, micro_batch, tp, pp) < 1:
        raise ScratchError("gpus, micro_batch, tp and pp must be at least 1")
    seq = cfg.block_size if seq is None else seq
    if seq < 1:
        raise ScratchError(f"seq must be at least 1, got {seq}")
    for what, n in [("n_head", cfg.n_head), ("n_kv_head", cfg.n_kv_head),
                    ("intermediate_size", cfg.intermediate_size)]:
        if n % tp:
            raise ScratchError(f"{what} ({n}) is not divisible by tp ({tp}); each "
                               "tensor-parallel rank takes an equal share")
    if cfg.n_layer % pp:
        raise ScratchError(f"n_layer ({cfg.n_layer}) is not divisible by pp ({pp})")
    if lora_rank < 0:
        raise ScratchError(f"lora_rank must be >= 0, got {lora_rank}")
    if seq > cfg.block_size:
        raise ScratchError(f"seq {seq} is longer than the model's context ({cfg.block_size})")
    if lora_rank and (tp > 1 or pp > 1):
        raise ScratchError("LoRA trains under data parallelism only; use tp = pp = 1")
    n = count_params(cfg, tp, pp)
    trained = lora_params(cfg, lora_rank, list(lora_targets)) if lora_rank else n
    mixed = dtype != "fp32"
    width = 2 if mixed else 4
    moments = {"adamw": 8, "sgd": 4}[optimizer]  # AdamW: m and v; SGD: momentum, fp32
    weights = width * (n + trained if lora_rank else n)
    grads = width * trained
    # + an fp32 master copy of what trains, under mixed precision
    optim = (4 * trained if mixed else 0) + moments * trained
    if zero >= 1:
        optim /= gpus
    if zero >= 2:
        grads /= gpus
    if zero >= 3:
        weights /= gpus
    per_layer, outside = activation_elements(cfg, seq)
    # Sequence parallelism divides everything inside a block by tp (Korthikanti et al. 2022);
    # the logits are gathered whole. Under 1F1B the first stage holds pp micro-batches of its
    # n_layer / pp blocks: as many block activations as one micro-batch through the whole model.
    per_layer /= tp
    V = cfg.vocab_size
    # The loss is taken in fp32 whatever the compute dtype, so its saved log-softmax (in
    # `outside`) is 4 bytes a value. The backward pass begins by making two more vocab-sized
    # fp32 tensors per token, the gradients of the log-probabilities and of the logits, while
    # every saved activation is still alive.
    per_token = width * (outside - V) + 4 * V
    peak_extra = 2 * 4 * V
    if activation_checkpointing:
        # Each block keeps only its input; backward later recomputes one block at a time, so
        # the peak is the larger of the loss gradients and one block's activations.
        per_token += width * cfg.n_layer * cfg.n_embd / tp
        peak_extra = max(peak_extra, width * per_layer)
    else:
        per_token += width * cfg.n_layer * per_layer
    act = micro_batch * seq * (per_token + peak_extra)
    return MemoryEstimate(n, weights, grads, optim, act)


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of weights, gradients and optimizer state this rank holds: the local shards of
    sharded (DTensor) tensors, a tied weight once; what `estimate_memory` predicts per device."""
    def nbytes(tensors) -> int:
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
        return sum(t.numel() * t.element_size() for t in local)

    params = list(model.parameters())
    optimizer = getattr(optimizer, "local", optimizer)  # ZeRO-1: this rank's own optimizer
    return {"weights": nbytes(params),
            "gradients": nbytes(p.grad for p in params if p.grad is not None),
            "optimizer": nbytes(v for s in optimizer.state.values() for v in s.values()
                                if isinstance(v, torch.Tensor) and v.dim() > 0)}


def training_peak_bytes(model: torch.nn.Module, idx: torch.Tensor) -> int:
    """Peak bytes allocated by one forward + backward of `model` on `idx` (inputs as targets):
    what `estimate_memory`'s activations + gradients predict."""
    from scratchlm.model.logprobs import cross_entropy_sum

    tracker = PeakMemory()
    with tracker:
        loss, count = cross_entropy_sum(model(idx)[0], idx)
        (loss / count).backward()
    return tracker.peak


class PeakMemory(TorchDispatchMode):
    """Measures the peak bytes of tensor storage allocated by the ops run inside it, like
    `torch.cuda.max_memory_allocated` but on any device: every op's new output storages are
    counted until Python frees them. Tensors made before entering are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out
