"""How well a tokenizer compresses text: bytes per token and how much of the vocabulary is used."""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

from scratchlm.tokenizer.bpe import BPETokenizer
from scratchlm.tokenizer.fast import to_tiktoken
from scratchlm.tokenizer.sources import iter_source_text


def tokenizer_stats(tok: BPETokenizer, sources: Iterable[str | os.PathLike],
                    errors: str = "strict") -> dict[str, float]:
    """Streams the sources through the fast encoder; special-token strings count as text."""
    enc = to_tiktoken(tok)
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    n_bytes = 0
    for text in iter_source_text(sources, errors):
        n_bytes += len(text.encode("utf-8"))
        counts += np.bincount(enc.encode(text, disallowed_special=()), minlength=tok.vocab_size)
    n_tokens = int(counts.sum())
    used = int((counts > 0).sum())
    return {
        "bytes": n_bytes,
        "tokens": n_tokens,
        "bytes_per_token": n_bytes / max(n_tokens, 1),
        "vocab_size": tok.vocab_size,
        "vocab_used": used,
        "vocab_used_fraction": used / tok.vocab_size,
    }


def format_stats(stats: dict[str, float]) -> str:
    return "\n".join([
        f"bytes            {stats['bytes']:,}",
        f"tokens           {stats['tokens']:,}",
        f"bytes per token  {stats['bytes_per_token']:.3f}",
        f"vocab used       {stats['vocab_used']:,} of {stats['vocab_size']:,} "
        f"({100 * stats['vocab_used_fraction']:.1f}%)",
    ])
