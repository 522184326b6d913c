"""Loss, perplexity and bits per byte of a language model on held-out tokens.

Bits per byte divides the total cross-entropy (in bits) by the UTF-8 bytes the predicted tokens
stand for, so models with different tokenizers can be compared; perplexity depends on the
tokenizer. Special tokens (document separators) stand for no bytes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from scratchlm.errors import ScratchError
from scratchlm.model.gpt import GPT
from scratchlm.model.logprobs import cross_entropy_sum


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) bytes each token id stands for (0 for specials and padding ids)."""
    lengths = torch.zeros(vocab_size, dtype=torch.float64)
    lengths[:len(tokenizer.vocab)] = torch.tensor([len(b) for b in tokenizer.vocab],
                                                  dtype=torch.float64)
    return lengths


@torch.no_grad()
def evaluate_batches(logits_of: Callable[[torch.Tensor], torch.Tensor | None],
                     batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     byte_lengths: torch.Tensor, device: str = "cpu",
                     autocast: contextlib.AbstractContextManager | None = None,
                     group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """Mean loss (nats/token), perplexity and bits per byte over (inputs, targets) batches,
    from `logits_of(inputs)` (a model in eval mode). Pipeline stages get None except on the
    last stage and pass their `group`, over which the summed loss is shared."""
    nats, tokens, n_bytes = torch.zeros((), dtype=torch.float64), 0, 0.0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast or contextlib.nullcontext():
            logits = logits_of(x)
        if logits is not None:
            nats += cross_entropy_sum(logits, y)[0].double().cpu()
        tokens += y.numel()
        n_bytes += byte_lengths[y.cpu()].sum().item()
    if group is not None:
        nats = nats.to(device)
        dist.all_reduce(nats, group=group)
    if tokens == 0:
        raise ScratchError("no tokens to evaluate on; the text is shorter than one window")
    nats = nats.item()
    mean = nats / tokens
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)),
            "bpb": nats / math.log(2) / max(n_bytes, 1.0), "tokens": tokens}


def text_windows(ids: list[int], block_size: int, batch_size: int
                 ) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows over a token list (the tail is dropped)."""
    t = torch.tensor(ids, dtype=torch.long)
    n = (len(t) - 1) // block_size
    rows = [t[i * block_size:i * block_size + block_size + 1] for i in range(n)]
    for i in range(0, len(rows), batch_size):
        batch = torch.stack(rows[i:i + batch_size])
        yield batch[:, :-1], batch[:, 1:]


def evaluate_text(model: GPT, tokenizer, text: str, block_size: int | None = None,
                  batch_size: int = 8, device: str = "cpu") -> dict[str, float]:
    """Loss, perplexity and bits per byte of `model` on a text (e.g. a held-out file)."""
    ids = tokenizer.encode_batch([text], disallowed_special=())[0]
    block = block_size or model.config.block_size
    lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
    was_training = model.training
    model.eval()
    try:
        return evaluate_batches(lambda x: model(x)[0], text_windows(ids, block, batch_size),
                                lengths, device)
    finally:
        model.train(was_training)
