"""Sampling from a model: greedy, temperature, top-k, top-p, stop tokens and strings, streaming.

With the KV cache (the default) the prompt is run once and each new token then costs a single
position; without it every step recomputes the whole sequence (same tokens, the reference).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence

import torch

from scratchlm.errors import ScratchError
from scratchlm.model.gpt import GPT


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from logits (B, vocab) -> (B,). temperature 0 is greedy."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely tokens
        # whose probability reaches top_p.
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token suffices
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ScratchError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ScratchError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ScratchError(f"top_p must be in (0, 1], got {top_p}")


@torch.inference_mode()
def stream(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_kv_cache: bool = True,
    stop_tokens: Sequence[int] = (),
    seed: int | None = None,
    sliding_window: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), step by step. A row that has produced a stop
    token keeps repeating it; the iterator ends when every row has stopped. A sequence longer
    than the context is an error unless `sliding_window`, which keeps the last block_size
    positions (recomputing the cache once it is full)."""
    _check_args(temperature, top_k, top_p)
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ScratchError(f"prompt must be a (batch, length) tensor with length >= 1, "
                           f"got shape {tuple(idx.shape)}")
    block = model.config.block_size
    if idx.size(1) + max_new_tokens > block and not sliding_window:
        raise ScratchError(
            f"prompt ({idx.size(1)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context of {block}; shorten them or allow a sliding window")
    model.eval()
    generator = None
    if seed is not None:
        generator = torch.Generator(idx.device).manual_seed(seed)
    stops = torch.tensor(list(stop_tokens), device=idx.device, dtype=torch.long)
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    seq = idx[:, -block:]
    cache = model.new_cache(idx.size(0), block) if use_kv_cache else None
    pending = seq  # tokens the model has not seen yet
    for _ in range(max_new_tokens):
        if cache is not None and cache.length + pending.size(1) > block:
            cache.crop(0)  # window full: rebuild the cache from the last block tokens
            pending = seq
        if cache is None:
            pending = seq[:, -block:]
        logits, _ = model(pending, cache=cache, last_only=True)
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
        if len(stops):
            nxt = torch.where(done, stops[0], nxt)
            done |= torch.isin(nxt, stops)
        yield nxt
        if bool(done.all()):
            return
        seq = torch.cat([seq, nxt[:, None]], dim=1)[:, -block:]
        pending = nxt[:, None]


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """The prompt ids followed by the new ones, (B, T + new); see `stream` for the options."""
    new = list(stream(model, idx, max_new_tokens, **kwargs))
    if not new:
        return idx
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1)


def stream_text(
    model: GPT,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    stop_at_eot: bool = True,
    **kwargs,
) -> Iterator[str]:
    """Yield the continuation of one prompt as text, piece by piece, ending before the first
    stop string (held back until it can no longer be the start of one)."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt, allowed_special="all")
    if not ids:
        raise ScratchError("the prompt is empty; give at least one character")
    stop_tokens = [tokenizer.eot_id] if stop_at_eot and tokenizer.eot_id is not None else []
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    hold = max((len(s) for s in stop), default=1) - 1
    text = ""  # decoded but not yet yielded
    for nxt in stream(model, torch.tensor([ids], device=device), max_new_tokens,
                      stop_tokens=stop_tokens, **kwargs):
        token = int(nxt[0])
        if token in stop_tokens:
            break
        text += decoder.decode(tokenizer.token_bytes(token))
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            yield text[:cut]
            return
        if len(text) > hold:
            yield text[:len(text) - hold]
            text = text[len(text) - hold:]
    yield text + decoder.decode(b"", final=True)


def generate_text(model: GPT, tokenizer, prompts: str | Sequence[str], max_new_tokens: int,
                  **kwargs) -> str | list[str]:
    """Continuations of one prompt (a string) or several (a list), as text."""
    if isinstance(prompts, str):
        return "".join(stream_text(model, tokenizer, prompts, max_new_tokens, **kwargs))
    return [generate_text(model, tokenizer, p, max_new_tokens, **kwargs) for p in prompts]


# A plain transcript for `scratchlm chat`; a model fine-tuned on instructions learns its own
# template, which the fine-tuning stage supplies.
CHAT_STOP = ["\nUser:"]


def chat_prompt(history: Sequence[tuple[str, str]], message: str, max_tokens: int,
                tokenizer) -> str:
    """The transcript so far plus the new message, dropping the oldest turns until it fits
    in `max_tokens`."""
    turns = [f"User: {u}\nAssistant: {a}\n" for u, a in history]
    last = f"User: {message}\nAssistant:"
    while turns and len(tokenizer.encode("".join(turns) + last, disallowed_special=())) \
            > max_tokens:
        turns.pop(0)
    prompt = "".join(turns) + last
    if len(tokenizer.encode(prompt, disallowed_special=())) > max_tokens:
        raise ScratchError(f"the message alone is longer than the {max_tokens} tokens the "
                           "context leaves; shorten it or lower --max-new-tokens")
    return prompt
