"""Causal self-attention, written out and fused, with rotary positions and a KV cache.

softmax(Q K^T / sqrt(d)) V over each head (Vaswani et al. 2017), with a causal mask so that
position t sees positions <= t only. Grouped-query attention (Ainslie et al. 2023) lets several
query heads share one key/value head; multi-query attention is the case of one kv head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.model.config import ModelConfig
from scratchlm.model.dropout import Dropout, fast_path
from scratchlm.model.kv_cache import KVCache


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse wavelengths of the head_dim / 2 rotating channel pairs (Su et al. 2021),
    with Llama 3's long-context rescaling when `cfg.rope_scaling` is set."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if cfg.rope_scaling:
        s = cfg.rope_scaling
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = old_len / s["low_freq_factor"]
        high_wavelen = old_len / s["high_freq_factor"]
        # Long wavelengths are slowed by `factor`, short ones kept, and the band in between
        # interpolated smoothly between the two.
        smooth = (old_len / wavelen - s["low_freq_factor"]) / (
            s["high_freq_factor"] - s["low_freq_factor"])
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq,
                               scaled)
    return inv_freq.float()


def rope_cache(cfg: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (length, head_dim): channel i and i + head_dim/2 form a pair
    (the "rotate half" layout of Hugging Face's Llama, so its weights load unpermuted)."""
    t = torch.arange(length, dtype=torch.float32)
    angles = torch.outer(t, rope_frequencies(cfg))  # (length, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)  # (length, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair of x (B, n_head, T, head_dim) by its position's angle."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.manual = cfg.attention == "manual"
        self.dropout = cfg.attention_dropout
        self.qk_norm_eps = cfg.norm_eps if cfg.qk_norm else None
        # Separate q, k and v projections (not one fused matmul) so that tensor parallelism can
        # split each by heads: a fused weight sharded by rows would hand a rank all of q.
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True  # scaled init (GPT-2): see GPT._init_weights
        self.attn_drop = Dropout(cfg.attention_dropout)
        self.resid_drop = Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, n_embd) -> (B, T, n_embd). `mask` (B, T, S) replaces the causal mask when
        rows of a batch have different lengths (see `padded_causal_mask`); S counts the cached
        keys and these T."""
        B, T, _ = x.shape
        hd = self.head_dim
        # Head counts are read from the module, not the config: tensor parallelism lowers them
        # to the heads of one rank.
        q, k, v = self._project(x)
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)  # (B, n_head, T, hd)
        k = k.view(B, T, self.n_kv_head, hd).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(B, T, self.n_kv_head, hd).transpose(1, 2)  # (B, n_kv, T, hd)
        if self.qk_norm_eps is not None:  # each head's q and k to unit RMS, before rotation
            q = F.rms_norm(q, (hd,), eps=self.qk_norm_eps)
            k = F.rms_norm(k, (hd,), eps=self.qk_norm_eps)
        if rope is not None:
            cos, sin = rope  # (T, hd), or (B, 1, T, hd) when each row has its own positions
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)  # (B, n_kv_head, past + T, hd)
        # With attention dropout, SDPA on a CPU falls back to its math path, which draws the
        # T x T mask with bernoulli_; written out, the mask comes from our faster Dropout.
        if self.manual or (self.training and self.dropout > 0 and fast_path(q)):
            y = self._attend_manual(q, k, v, past, mask)
        else:
            y = self._attend_fused(q, k, v, past, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * hd)  # (B, T, n_head * hd)
        return self.resid_drop(self.proj(y))

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, T, heads * hd) of x (B, T, n_embd). Without autograd (generation,
        evaluation) plain weights are concatenated at run time into one (n_head + 2 n_kv_head)
        * hd wide matmul: on the CPU one larger GEMM beats three small ones. In training the
        three stay apart: fused, backward would keep the concatenated weight and the whole
        q/k/v output alive. The parameters stay apart for tensor parallelism, whose DTensor
        weights (like LoRA's hooked layers and int8 ones) take the three calls."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        plain = all(type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks
                    and type(m.weight) in (torch.Tensor, nn.Parameter) for m in projs)
        if torch.is_grad_enabled() or not plain:
            return tuple(m(x) for m in projs)
        bias = None if self.q_proj.bias is None else torch.cat([m.bias for m in projs])
        qkv = F.linear(x, torch.cat([m.weight for m in projs]), bias)
        return qkv.split([m.out_features for m in projs], dim=-1)

    def _attend_fused(self, q, k, v, past: int, mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
        T, S = q.size(2), k.size(2)
        if self.n_kv_head != self.n_head:
            k, v = self._repeat_kv(k), self._repeat_kv(v)
        causal = mask is None and past == 0 and T > 1
        if mask is not None:
            mask = mask[:, None]  # (B, 1, T, S): the same for every head
        elif past and T > 1:  # a chunk after cached positions: query i sees keys <= past + i
            mask = causal_mask(T, S, q.device)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0)

    def _attend_manual(self, q, k, v, past: int, mask: torch.Tensor | None = None
                       ) -> torch.Tensor:
        T, S = q.size(2), k.size(2)
        k, v = self._repeat_kv(k), self._repeat_kv(v)  # (B, n_head, S, hd)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, n_head, T, S)
        seen = causal_mask(T, S, q.device) if mask is None else mask[:, None]
        att = att.masked_fill(~seen, float("-inf"))
        att = F.softmax(att.float(), dim=-1).type_as(q)
        att = self.attn_drop(att)
        return att @ v  # (B, n_head, T, hd)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_kv_head, S, hd) -> (B, n_head, S, hd): each kv head serves n_head / n_kv_head
        consecutive query heads (the grouping Hugging Face's Llama uses)."""
        rep = self.n_head // self.n_kv_head
        if rep == 1:
            return x
        B, H, S, hd = x.shape
        return x[:, :, None].expand(B, H, rep, S, hd).reshape(B, H * rep, S, hd)


def causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor:
    """(T, S) booleans, True where query i (at absolute position S - T + i) may see key j."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def padded_causal_mask(start: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """(B, T, S) booleans for rows that begin at key column start[b] (B,) (left padding): query
    i, at column S - T + i, sees key j when j <= S - T + i and j >= start[b]. A padding query
    also sees itself, so that no row of the softmax is empty (an all -inf row gives NaN, and
    0 * NaN in the weighted sum would reach the real rows through the padding's values)."""
    cols = torch.arange(S, device=start.device)
    query_cols = cols[S - T:, None]  # (T, 1)
    mask = (cols[None, :] <= query_cols) & (cols[None, None, :] >= start[:, None, None])
    return mask | (cols[None, :] == query_cols)  # (B, T, S)
