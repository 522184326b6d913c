"""ModelConfig: every shape and switch of the decoder-only transformer, plus named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from scratchlm.errors import ScratchError


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    """Rows of the token embedding (and columns of the output head)."""
    block_size: int = 1024
    """Context length: the most positions one forward pass (or a KV cache) may hold."""
    n_layer: int = 12
    """Transformer blocks."""
    n_head: int = 12
    """Query heads per attention layer."""
    n_kv_head: int | None = None
    """Key/value heads: None = n_head (multi-head), 1 = multi-query, else grouped-query."""
    n_embd: int = 768
    """Width of the residual stream."""
    head_dim: int | None = None
    """Width of one head; None = n_embd // n_head."""
    intermediate_size: int | None = None
    """Hidden width of the MLP; None = 4 * n_embd (GELU, ReLU²) or Llama's 8/3 * n_embd rule
    (SwiGLU)."""
    pos_emb: Literal["learned", "rope"] = "learned"
    """Positions: a learned table added to the input (GPT-2) or RoPE on q and k (Llama)."""
    rope_theta: float = 10000.0
    """RoPE base: wavelengths grow geometrically from 2*pi to 2*pi*theta."""
    rope_scaling: dict[str, float] | None = None
    """Llama 3 long-context frequency scaling: factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings (None = plain RoPE)."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalisation before attention and MLP (pre-norm) and before the head."""
    norm_eps: float = 1e-5
    """Added to the variance in the norm, for numerical safety."""
    mlp: Literal["gelu", "gelu_exact", "swiglu", "relu2"] = "gelu"
    """MLP kind: GELU (tanh approximation, as GPT-2), exact GELU (the erf form, as nanoGPT and
    BERT; about half the cost of the tanh form on a CPU), SwiGLU (Shazeer 2020, as Llama) or
    ReLU², relu(x)² (So et al. 2021, Primer; modded-nanogpt, nanochat)."""
    bias: bool = True
    """Biases in the linear layers and LayerNorms (GPT-2: yes, Llama: no)."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head (Press & Wolf 2017)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches during training."""
    attn_dropout: float | None = None
    """Dropout on the attention weights alone; None = `dropout`. 0 with `dropout` > 0 keeps
    the residual and embedding dropout and lets the CPU run SDPA's fused kernel, which has no
    dropout: with it, attention in training is written out, building and masking the T x T
    probabilities (at the 10-minute recipe's shape, with SDPA's own math path then: 635 steps
    in the budget instead of 546)."""
    attention: Literal["sdpa", "manual"] = "sdpa"
    """Attention kernel: PyTorch's fused scaled_dot_product_attention, or written out."""
    init_std: float = 0.02
    """Std of the normal init; residual projections get init_std / sqrt(2 * n_layer) (GPT-2)."""
    qk_norm: bool = False
    """RMS-normalise each head's queries and keys (no learned gain) before RoPE and the dot
    product, which bounds the attention logits (Dehghani et al. 2023; nanochat)."""
    logit_softcap: float = 0.0
    """Cap the output logits smoothly at +-this, cap * tanh(logits / cap) (Gemma 2;
    modded-nanogpt uses 15 to 30); 0 = no cap."""
    zero_init: bool = False
    """Start the output projections of attention and MLP, and an untied head, at zero: each
    block begins as the identity (modded-nanogpt, nanochat)."""

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ScratchError(f"model: n_embd ({self.n_embd}) must be divisible by n_head "
                                   f"({self.n_head}), or set head_dim explicitly")
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size is None:
            if self.mlp != "swiglu":
                self.intermediate_size = 4 * self.n_embd
            else:  # Llama: 2/3 of 4 * n_embd (same parameters as a GELU MLP), rounded up to 256
                self.intermediate_size = 256 * -(-(8 * self.n_embd // 3) // 256)
        positive = ["vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd",
                    "head_dim", "intermediate_size"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ScratchError(f"model: {name} must be positive, got {getattr(self, name)}")
        if self.n_head % self.n_kv_head:
            raise ScratchError(f"model: n_kv_head ({self.n_kv_head}) must divide n_head "
                               f"({self.n_head}); each key/value head serves a group of queries")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ScratchError(f"model: RoPE rotates pairs of channels, so head_dim must be "
                               f"even, got {self.head_dim}")
        if not self.logit_softcap >= 0.0:
            raise ScratchError(f"model: logit_softcap must be >= 0 (0 = off), got "
                               f"{self.logit_softcap}")
        for name in ("dropout", "attn_dropout"):
            rate = getattr(self, name)
            if rate is not None and not 0.0 <= rate < 1.0:
                raise ScratchError(f"model: {name} must be in [0, 1), got {rate}")
        if self.rope_scaling is not None:
            need = {"factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings"}
            if set(self.rope_scaling) != need:
                raise ScratchError(f"model: rope_scaling needs exactly the keys {sorted(need)}")

    @property
    def attention_dropout(self) -> float:
        """The rate on the attention weights: `attn_dropout`, else `dropout`."""
        return self.dropout if self.attn_dropout is None else self.attn_dropout

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        """A named shape (see PRESETS), with any field overridden."""
        if name not in PRESETS:
            import difflib

            near = difflib.get_close_matches(name, PRESETS, n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"choose from {sorted(PRESETS)}"
            raise ScratchError(f"unknown model preset {name!r}; {hint}")
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ScratchError(f"unknown model field(s) {bad}; valid fields: {sorted(fields)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_GPT2 = dict(vocab_size=50257, block_size=1024, pos_emb="learned", norm="layernorm",
             mlp="gelu", bias=True, tie_embeddings=True)
_LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False)

PRESETS: dict[str, dict] = {
    # OpenAI GPT-2 (Radford et al. 2019)
    "gpt2-124m": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-355m": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-774m": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-1.5b": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600),
    # Llama 3.2 1B: GQA 32 query / 8 kv heads, tied head, RoPE theta 500k with Llama 3 scaling
    "llama-1b": dict(_LLAMA, vocab_size=128256, block_size=131072, n_layer=16, n_head=32,
                     n_kv_head=8, n_embd=2048, intermediate_size=8192, rope_theta=500000.0,
                     tie_embeddings=True,
                     rope_scaling={"factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}),
    # Llama 2 7B: multi-head, untied head, 4k context
    "llama-7b": dict(_LLAMA, vocab_size=32000, block_size=4096, n_layer=32, n_head=32,
                     n_embd=4096, intermediate_size=11008, tie_embeddings=False),
    # tiny shapes for tests and CPU runs
    "gpt2-tiny": dict(_GPT2, vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=64),
    "llama-tiny": dict(_LLAMA, vocab_size=512, block_size=128, n_layer=2, n_head=4,
                       n_kv_head=2, n_embd=64, intermediate_size=176, tie_embeddings=False),
}
