"""The decoder-only transformer: GPT-2 and Llama families from one set of parts.

token ids -> embedding (+ learned positions) -> n_layer pre-norm blocks
(x + attn(norm(x)), then x + mlp(norm(x))) -> final norm -> head -> logits over the vocabulary.
The model knows nothing of training or distribution; those are applied from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from scratchlm.errors import ScratchError
from scratchlm.model.attention import CausalSelfAttention, rope_cache
from scratchlm.model.config import ModelConfig
from scratchlm.model.kv_cache import KVCache


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, vocab) against targets (B, T), in fp32 whatever the
    compute dtype; targets of -100 are ignored."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=-100)


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
    """GELU: proj(gelu(fc(x))). SwiGLU: proj(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:  # gate and up apart, so tensor parallelism can split each
            self.gate = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
            self.up = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        else:
            self.fc = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        self.proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            h = F.silu(self.gate(x)) * self.up(x)  # (B, T, intermediate_size)
        else:
            h = F.gelu(self.fc(x), approximate="tanh")  # GPT-2's tanh approximation
        return self.drop(self.proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, cache: KVCache | None = None, layer: int = 0):
        x = x + self.attn(self.norm1(x), rope, cache, layer)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_emb == "learned" \
            else None
        self.drop = nn.Dropout(cfg.dropout)
        # Keyed by layer number (names "blocks.0", ... as a list would give) so that a pipeline
        # stage can keep some blocks and drop the rest without renaming them.
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # Activation checkpointing per block, switched on by the trainer.
        self.checkpointing = False
        if cfg.pos_emb == "rope":
            cos, sin = rope_cache(cfg, cfg.block_size)
            # Not saved: derived from the config, and rebuilt on load.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            # Residual projections add into the stream once per layer per branch, so their
            # init shrinks by sqrt(2 * n_layer) to keep the stream's variance flat (GPT-2).
            scale = 1 / math.sqrt(2 * self.config.n_layer) if getattr(module, "residual",
                                                                      False) else 1.0
            nn.init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, vocab) (or (B, 1, vocab) with `last_only`),
        and with targets (B, T) the mean next-token cross-entropy (targets of -100 ignored).
        With a cache, idx continues the cached positions.

        A pipeline stage (see scratchlm.parallel.pipeline) is this model with parts removed:
        without `tok_emb` it takes hidden states (B, T, n_embd) instead of ids, and without
        `lm_head` it returns them instead of logits."""
        B, T = idx.shape[:2]
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise ScratchError(
                f"sequence of {past + T} positions is longer than the model's context "
                f"(block_size {self.config.block_size}); shorten the input or crop it")
        x, rope = idx, None
        if self.config.pos_emb == "rope":
            rope = (self.rope_cos[past:past + T], self.rope_sin[past:past + T])
        if self.tok_emb is not None:
            x = self.tok_emb(idx)  # (B, T, n_embd)
            if self.pos_emb is not None:
                pos = torch.arange(past, past + T, device=idx.device)
                x = x + self.pos_emb(pos)  # (T, n_embd) broadcast over B
            x = self.drop(x)
        for name, block in self.blocks.items():
            if self.checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, cache, int(name))
        if cache is not None:
            cache.advance()
        if self.lm_head is None:
            return x, None
        x = self.norm_f(x)
        if last_only:
            x = x[:, -1:]  # (B, 1, n_embd): generation needs only the next token's logits
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = next_token_loss(logits, targets)
        return logits, loss

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` positions."""
        cfg = self.config
        p = self.tok_emb.weight
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
        """Training FLOPs per token: 6 N for the matmuls of forward + backward over the
        non-embedding parameters plus the head (Kaplan et al. 2020; the head is a matmul even
        when tied), plus 12 * n_layer * n_head * head_dim * T for attention scores and the
        weighted sum (Chowdhery et al. 2022, appendix B)."""
        cfg = self.config
        T = seq_len or cfg.block_size
        n = self.num_params(non_embedding=True)
        if cfg.tie_embeddings:
            n += self.lm_head.weight.numel()
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T

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
            f"tied head: {cfg.tie_embeddings}, dropout: {cfg.dropout}",
            f"  training FLOPs/token at full context: {self.flops_per_token() / 1e9:.3f} G",
        ]
        return "\n".join(lines)
