"""The decoder-only transformer: GPT-2 and Llama families from one set of parts.

token ids -> embedding (+ learned positions) -> n_layer pre-norm blocks
(x + attn(norm(x)), then x + mlp(norm(x))) -> final norm -> head -> logits over the vocabulary.
The model knows nothing of training or distribution; those are applied from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import ScratchError
from scratchlm.model.attention import CausalSelfAttention, rope_cache
from scratchlm.model.config import ModelConfig
from scratchlm.model.dropout import Dropout
from scratchlm.model.kv_cache import KVCache


def tied_weights(model: GPT) -> dict[str, str]:
    """{head parameter name: the embedding it is} when the head is tied, else {}. The one place
    that knows which weights a tied model shares; checkpoints, optimizer groups and parallel
    layouts ask it."""
    return {"lm_head.weight": "tok_emb.weight"} if model.config.tie_embeddings else {}


def check_token_ids(idx: torch.Tensor, vocab_size: int) -> None:
    """Refuse ids outside the vocabulary with a clear error instead of an IndexError (or, on a
    GPU, a device-side assert) from inside the embedding."""
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= vocab_size):
        bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
        raise ScratchError(f"token id {bad} is outside the model's vocabulary (0 to "
                           f"{vocab_size - 1}); encode the text with the model's own tokenizer")


def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout of `model` at rate p: the nn.Dropout layers and the rate the fused
    attention hands to scaled_dot_product_attention, which is no module of its own."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(m, CausalSelfAttention):
            m.dropout = p


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019), computed in fp32 for stability."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class MLP(nn.Module):
    """GELU: proj(gelu(fc(x))). SwiGLU: proj(silu(gate(x)) * up(x)). ReLU²: proj(relu(fc(x))²)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.relu2 = cfg.mlp == "relu2"
        self.gelu_form = "none" if cfg.mlp == "gelu_exact" else "tanh"
        if self.swiglu:  # gate and up apart, so tensor parallelism can split each
            self.gate = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
            self.up = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        else:
            self.fc = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        self.proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            h = F.silu(self.gate(x)) * self.up(x)  # (B, T, intermediate_size)
        elif self.relu2:
            h = F.relu(self.fc(x)).square()
        else:
            h = F.gelu(self.fc(x), approximate=self.gelu_form)  # (B, T, intermediate_size)
        return self.drop(self.proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None):
        x = x + self.attn(self.norm1(x), rope, cache, layer, mask)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_emb == "learned" \
            else None
        self.drop = Dropout(cfg.dropout)
        # Keyed by layer number (names "blocks.0", ... as a list would give) so that a pipeline
        # stage can keep some blocks and drop the rest without renaming them.
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos_emb == "rope":
            cos, sin = rope_cache(cfg, cfg.block_size)
            # Not saved: derived from the config, and rebuilt on load.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        cfg = self.config
        std = cfg.init_std
        if isinstance(module, nn.Linear):
            # Residual projections add into the stream once per layer per branch, so their
            # init shrinks by sqrt(2 * n_layer) to keep the stream's variance flat (GPT-2).
            residual = getattr(module, "residual", False)
            scale = 1 / math.sqrt(2 * cfg.n_layer) if residual else 1.0
            # zero_init: an untied head starts at zero too (uniform first predictions); the
            # gradient of a zero weight is not zero, so it still learns from the first step.
            if cfg.zero_init and (residual or module is self.lm_head and
                                  not cfg.tie_embeddings):
                nn.init.zeros_(module.weight)
            else:
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        last_only: bool = False,
        logits: bool = True,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """idx (B, T) token ids -> (logits (B, T, vocab), hidden states (B, T, n_embd) after the
        final norm). `last_only` keeps the last position only (B, 1, ...), for generation;
        `logits=False` skips the head (None instead), for heads of one's own on the hidden
        states. With a cache, idx continues the cached positions. Losses live in the
        objectives (scratchlm.train), not here.

        Rows of different lengths share a batch (left padding, see scratchlm.generate.Decoder)
        with `positions` (B, T), each token's position (learned table row or RoPE angle; the
        caller keeps them below block_size), and `mask` (B, T, S) from
        attention.padded_causal_mask, True where a query may see a key (S: cached keys + T).
        Without them every row counts from the cache's length, under the plain causal mask.

        A pipeline stage (see scratchlm.parallel.pipeline) is this model with parts removed:
        without `tok_emb` it takes hidden states (B, T, n_embd) instead of ids, and without
        `lm_head` it returns (None, the hidden states after its last block)."""
        B, T = idx.shape[:2]
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise ScratchError(
                f"sequence of {past + T} positions is longer than the model's context "
                f"(block_size {self.config.block_size}); shorten the input or crop it")
        x, rope = idx, None
        if self.config.pos_emb == "rope" and positions is None:
            rope = (self.rope_cos[past:past + T], self.rope_sin[past:past + T])
        elif self.config.pos_emb == "rope":  # (B, 1, T, hd): one angle per row and token
            rope = (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])
        if self.tok_emb is not None:
            try:
                x = self.tok_emb(idx)  # (B, T, n_embd)
            except IndexError:  # on the CPU; checked before the call costs a sync per step
                check_token_ids(idx, self.config.vocab_size)
                raise
            if self.pos_emb is not None and positions is not None:
                x = x + self.pos_emb(positions)  # (B, T, n_embd)
            elif self.pos_emb is not None:
                pos = torch.arange(past, past + T, device=idx.device)
                x = x + self.pos_emb(pos)  # (T, n_embd) broadcast over B
            x = self.drop(x)
        for name, block in self.blocks.items():
            x = block(x, rope, cache, int(name), mask)
        if cache is not None:
            cache.advance()
        if self.lm_head is None:
            return None, x
        x = self.norm_f(x)
        if last_only:
            x = x[:, -1:]  # (B, 1, n_embd): generation needs only the next token's logits
        if not logits:
            return None, x
        out = self.lm_head(x)  # (B, T, vocab)
        if self.config.logit_softcap:
            cap = self.config.logit_softcap
            out = cap * torch.tanh(out / cap)
        return out, x

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` positions."""
        cfg = self.config
        # The first floating-point weight gives the compute dtype: a quantized model keeps its
        # int8 tables in buffers (scratchlm.quantize), its norms as float parameters.
        p = next(p for p in self.parameters() if p.is_floating_point())
        return KVCache(cfg.n_layer, batch, cfg.n_kv_head, max_len or cfg.block_size,
                       cfg.head_dim, p.dtype, p.device)

    # --------------------------------------------------------------------------------------------
    # sizes

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, counting a tied head once. `non_embedding` leaves out the token and
        position tables (an untied head stays in: it is a real matmul per token)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token of the whole model at sequence length `seq_len` (default:
        the context); see scratchlm.memory.flops_per_token."""
        from scratchlm.memory import flops_per_token

        return flops_per_token(self.config, seq_len or self.config.block_size)

    def summary(self) -> str:
        """A readable one-screen description of the model."""
        cfg = self.config
        attn = ("multi-head" if cfg.n_kv_head == cfg.n_head else
                "multi-query" if cfg.n_kv_head == 1 else f"grouped-query ({cfg.n_kv_head} kv)")
        lines = [
            f"GPT: {self.num_params() / 1e6:.2f}M parameters "
            f"({self.num_params(non_embedding=True) / 1e6:.2f}M without embeddings)",
            f"  vocab {cfg.vocab_size:,}, context {cfg.block_size:,}, width {cfg.n_embd}, "
            f"{cfg.n_layer} layers",
            f"  attention: {cfg.n_head} heads of {cfg.head_dim}, {attn}, {cfg.attention}",
            f"  positions: {cfg.pos_emb}" + (f" (theta {cfg.rope_theta:g})"
                                             if cfg.pos_emb == "rope" else ""),
            f"  norm: {cfg.norm}, mlp: {cfg.mlp} ({cfg.intermediate_size}), bias: {cfg.bias}, "
            f"tied head: {cfg.tie_embeddings}, dropout: {cfg.dropout}"
            + (f" (attention {cfg.attn_dropout})" if cfg.attn_dropout is not None else ""),
            f"  training FLOPs/token at full context: {self.flops_per_token() / 1e9:.3f} G",
        ]
        return "\n".join(lines)
