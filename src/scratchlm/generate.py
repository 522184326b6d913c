"""Sampling from a model: greedy, temperature, top-k, top-p, stop tokens and strings, streaming,
and batches of prompts of different lengths.

With the KV cache (the default) the prompt is run once and each new token then costs a single
position; without it every step recomputes the whole sequence (same tokens, the reference).

`stream` decodes a (B, T) tensor of equal-length prompts. `Decoder` and `BatchGenerator` decode
prompts of any lengths together: rows are left-padded to a shared column (the KV cache's write
position), each row has its own positions and a mask that hides its padding, and rows join
(prefilled together) and leave (at their own stop) between any two steps: continuous batching,
used by `generate_batch`, `generate_text` with a list of prompts, and `scratchlm serve`.
"""

from __future__ import annotations

import codecs
import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from scratchlm.errors import ScratchError
from scratchlm.model.attention import padded_causal_mask
from scratchlm.model.gpt import GPT, check_token_ids


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


# Seeds torch.Generator.manual_seed takes: a signed or an unsigned 64-bit integer (a negative
# seed is read as its two's complement, so -1 and 2**64 - 1 are the same generator). Anything
# else is a ValueError deep inside torch, so it is refused where the options come in.
SEED_MIN, SEED_END = -2**63, 2**64


class SamplingError(ScratchError):
    """A sampling option out of range. `option` names it (the server's `param`; the CLI prints
    it as its flag) and `problem` says what is wrong with it and what to do."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option} {problem}")
        self.option, self.problem = option, problem


def check_sampling(temperature: float, top_k: int | None = None, top_p: float | None = None,
                   max_new_tokens: int | None = None, seed: int | None = None,
                   n: int = 1) -> None:
    """The one check of the sampling options that `stream`, `BatchGenerator`, the CLI and the
    server share; `n` samples take the seeds seed, seed + 1, ..., seed + n - 1."""
    if not temperature >= 0 or temperature == float("inf"):  # NaN fails every comparison
        raise SamplingError("temperature", f"must be a finite number >= 0 (0 is greedy), got "
                            f"{temperature}")
    if top_k is not None and top_k < 1:
        raise SamplingError("top_k", f"must be >= 1 (or unset: no limit), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:  # NaN fails too
        raise SamplingError("top_p", f"must be in (0, 1] (1: no limit), got {top_p}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise SamplingError("max_new_tokens", f"must be >= 1, got {max_new_tokens}")
    if seed is not None and not SEED_MIN <= seed <= SEED_END - n:
        what = f" (and seed + {n - 1} for {n} samples)" if n > 1 else ""
        raise SamplingError("seed", f"must be an integer from -2**63 to 2**64 - {n}, what "
                            f"torch's generator takes{what}; got {seed}, choose a smaller one")


def check_context(n_prompt: int, max_new_tokens: int, block_size: int,
                  sliding_window: bool = False,
                  fix: str = "shorten them or allow a sliding window") -> None:
    """A prompt and its new tokens must fit in the context, unless a sliding window keeps the
    last block_size of them."""
    if n_prompt + max_new_tokens > block_size and not sliding_window:
        raise ScratchError(
            f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context of {block_size}; {fix}")


def check_stop(stop: Sequence[str]) -> None:
    """An empty stop string would end every text before it began: refused, not dropped."""
    if any(s == "" for s in stop):
        raise SamplingError("stop", "strings must not be empty; drop the empty one")


def check_half_precision(quantize: str | None, device: str | torch.device) -> None:
    """bf16/fp16 weights are for a GPU: on a CPU their matmuls are far slower than fp32. The one
    check behind `generate`, `chat` and `serve`, made before the model loads."""
    if quantize in ("bf16", "fp16") and torch.device(device).type == "cpu":
        raise ScratchError(f"--quantize {quantize} is for a GPU (on this CPU bf16/fp16 matmuls "
                           "are far slower than fp32); use --quantize int8")


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
    check_sampling(temperature, top_k, top_p, seed=seed)
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ScratchError(f"prompt must be a (batch, length) tensor with length >= 1, "
                           f"got shape {tuple(idx.shape)}")
    block = model.config.block_size
    check_context(idx.size(1), max_new_tokens, block, sliding_window)
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


class TextStream:
    """Token ids in, text out: bytes are decoded incrementally (a character split across tokens
    comes out whole) and text is held back while it could still begin a stop string; at a stop
    string the text before it comes out and `stopped` is set."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        check_stop(stop)
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.stopped = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._text = ""  # decoded but not yet given out

    def push(self, token: int) -> str:
        """The text that can be shown once `token` is known ("" while held back)."""
        self._text += self._decoder.decode(self.tokenizer.token_bytes(token))
        cut = min((self._text.find(s) for s in self.stop if s in self._text), default=-1)
        if cut >= 0:
            out, self._text, self.stopped = self._text[:cut], "", True
            return out
        if len(self._text) <= self._hold:
            return ""
        out = self._text[:len(self._text) - self._hold]
        self._text = self._text[len(out):]
        return out

    def flush(self) -> str:
        """Whatever is held back, at the end of the sequence."""
        if self.stopped:
            return ""
        out, self._text = self._text + self._decoder.decode(b"", final=True), ""
        return out


def encode_prompt(tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a text prompt (special-token strings in it count as special tokens), or
    the ids as given."""
    ids = (tokenizer.encode(prompt, allowed_special="all") if isinstance(prompt, str)
           else list(prompt))
    if not ids:
        raise ScratchError("the prompt is empty; give at least one character")
    return ids


def stream_text(
    model: GPT,
    tokenizer,
    prompt: str | Sequence[int],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    stop_at_eot: bool = True,
    stop_tokens: Sequence[int] = (),
    **kwargs,
) -> Iterator[str]:
    """Yield the continuation of one prompt (text, or token ids) as text, piece by piece,
    ending at a stop token (`stop_tokens`, and <|endoftext|> with `stop_at_eot`) or before
    the first stop string (held back until it can no longer be the start of one)."""
    device = next(model.parameters()).device
    ids = encode_prompt(tokenizer, prompt)
    stops = list(stop_tokens) + ([tokenizer.eot_id] if stop_at_eot and tokenizer.eot_id
                                 is not None else [])
    text = TextStream(tokenizer, stop)
    for nxt in stream(model, torch.tensor([ids], device=device), max_new_tokens,
                      stop_tokens=stops, **kwargs):
        token = int(nxt[0])
        if token in stops:
            break
        piece = text.push(token)
        if piece:
            yield piece
        if text.stopped:
            return
    yield text.flush()


def generate_text(model: GPT, tokenizer, prompts: str | Sequence[str], max_new_tokens: int,
                  stop: Sequence[str] = (), stop_at_eot: bool = True, **kwargs
                  ) -> str | list[str]:
    """Continuations of one prompt (a string) or several (a list), as text. A list is
    generated as one batch (`generate_batch`): each prompt's text is the one it gets alone,
    with the same seed. With `sliding_window` the prompts of a list run one at a time."""
    if isinstance(prompts, str) or kwargs.get("sliding_window"):
        if not isinstance(prompts, str):
            return [generate_text(model, tokenizer, p, max_new_tokens, stop, stop_at_eot,
                                  **kwargs) for p in prompts]
        return "".join(stream_text(model, tokenizer, prompts, max_new_tokens, stop,
                                   stop_at_eot, **kwargs))
    kwargs.pop("sliding_window", None)
    use_kv_cache = kwargs.pop("use_kv_cache", True)
    stops = [tokenizer.eot_id] if stop_at_eot and tokenizer.eot_id is not None else []
    gens = [Generation(encode_prompt(tokenizer, p), max_new_tokens, stop_ids=stops,
                       text=TextStream(tokenizer, stop), **kwargs) for p in prompts]
    run_all(model, gens, use_kv_cache=use_kv_cache)
    return [g.output for g in gens]


# ------------------------------------------------------------------------------------------------
# batches of prompts of different lengths


class Decoder:
    """The forward passes of a batch whose rows come and go. Rows share the KV cache's write
    column (`cols`); row r's tokens fill columns start[r]..cols-1 (right-aligned, left-padded),
    so column j of row r is position j - start[r], and a mask hides the columns before start[r].

    `add` prefills new rows together (padded to the longest, in a cache of their own that is
    then copied into free rows, right-aligned to `cols`; a prompt longer than `cols` first
    moves every row right); `step` feeds every row one token; `remove` frees rows, the last
    live row taking the freed place, so live rows stay first. When the columns run out, the
    leading columns no live row uses are dropped: every row holds at most block_size tokens,
    so block_size columns always suffice. Without a KV cache every step recomputes the rows'
    whole sequences from the token table (the reference)."""

    def __init__(self, model: GPT, max_rows: int, use_kv_cache: bool = True) -> None:
        self.model = model
        self.block = model.config.block_size
        self.max_rows = max_rows
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(max_rows, self.block) if use_kv_cache else None
        self.tokens = None if use_kv_cache else torch.zeros(
            max_rows, self.block, dtype=torch.long, device=self.device)
        self.cols = 0
        self.starts: list[int] = []  # first column of each live row
        self.handles: list = []  # the caller's object for each live row, in row order

    def add(self, prompts: Sequence[Sequence[int]], handles: Sequence) -> torch.Tensor:
        """Prefill `prompts` into new rows -> the next-token logits of each, (k, vocab)."""
        k, n = len(prompts), len(self.handles)
        if n + k > self.max_rows:
            raise ScratchError(f"{n + k} rows asked of a batch of {self.max_rows}")
        P = max(len(p) for p in prompts)
        if P >= self.block:
            raise ScratchError(f"a prompt of {P} tokens leaves no room in the model's context "
                               f"of {self.block}")
        if P > self.cols:
            self._shift(P - self.cols)
        pads = [P - len(p) for p in prompts]
        ids = torch.zeros(k, P, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, pads[i]:] = torch.as_tensor(p, dtype=torch.long)
        ids = ids.to(self.device)
        positions, mask = self._layout(pads, P, P)
        if self.cache is not None:
            own = self.model.new_cache(k, P)
            logits, _ = self.model(ids, cache=own, last_only=True, positions=positions,
                                   mask=mask)
            self.cache.load_rows(n, own)
        else:
            logits, _ = self.model(ids, last_only=True, positions=positions, mask=mask)
            self.tokens[n:n + k, self.cols - P:self.cols] = ids
        self.starts += [self.cols - len(p) for p in prompts]
        self.handles += list(handles)
        return logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each live row its next token, tokens (n,) -> next-token logits (n, vocab)."""
        n = len(self.handles)
        if self.cols == self.block:
            drop = min(self.starts)
            if drop == 0:
                raise ScratchError(f"a row already holds the model's whole context of "
                                   f"{self.block} tokens; it cannot take another")
            self._shift(-drop)
        tokens = tokens.to(self.device)
        if self.cache is not None:
            positions, mask = self._layout(self.starts, 1, self.cols + 1)
            logits, _ = self.model(tokens[:, None], cache=self.cache, last_only=True,
                                   positions=positions, mask=mask)
        else:
            self.tokens[:n, self.cols] = tokens
            first = min(self.starts)  # recompute from the first column a live row uses
            L = self.cols + 1 - first
            positions, mask = self._layout([s - first for s in self.starts], L, L)
            logits, _ = self.model(self.tokens[:n, first:self.cols + 1], last_only=True,
                                   positions=positions, mask=mask)
        self.cols += 1
        return logits[:, -1]

    def remove(self, handles: Sequence) -> None:
        """Free the rows of `handles`."""
        for h in handles:
            i, last = self.handles.index(h), len(self.handles) - 1
            if i != last:
                if self.cache is not None:
                    self.cache.move_row(last, i)
                else:
                    self.tokens[i] = self.tokens[last]
                self.starts[i], self.handles[i] = self.starts[last], self.handles[last]
            self.starts.pop()
            self.handles.pop()
        if not self.handles:
            self.cols = 0
            if self.cache is not None:
                self.cache.crop(0)

    def clear(self) -> None:
        """Free every row at once. After a failed step the rows' bookkeeping may be half
        updated, so nothing of it is trusted (unlike `remove`, which moves rows)."""
        self.starts, self.handles, self.cols = [], [], 0
        if self.cache is not None:
            self.cache.crop(0)

    def _layout(self, starts: Sequence[int], T: int, S: int
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(positions (B, T), mask (B, T, S)) of T new tokens ending at column S for rows that
        begin at column starts[b]; (None, None) when every row begins at 0, where the plain
        causal path is the same thing and costs nothing extra."""
        if not any(starts):
            return None, None
        start = torch.tensor(starts, device=self.device)
        cols = torch.arange(S - T, S, device=self.device)
        positions = (cols[None, :] - start[:, None]).clamp(min=0)  # padding: position 0
        return positions, padded_causal_mask(start, T, S)

    def _shift(self, offset: int) -> None:
        if self.cache is not None:
            self.cache.shift(offset)
        elif offset > 0:
            self.tokens[:, offset:offset + self.cols] = self.tokens[:, :self.cols].clone()
        else:
            self.tokens[:, :self.cols + offset] = self.tokens[:, -offset:self.cols].clone()
        self.starts = [s + offset for s in self.starts]
        self.cols += offset


@dataclass(eq=False)
class Generation:
    """One sequence to generate: its prompt, how to sample, when to stop; filled in as it runs
    (`tokens`, `output`, `finish_reason`). With a seed it samples from a generator of its own,
    so what it produces does not depend on what else shares its batch."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: Sequence[int] = ()
    """Token ids that end it (the id is counted in `tokens`, never shown as text)."""
    text: TextStream | None = None
    """Decodes the new tokens and ends it at a stop string; None: token ids only."""
    logprobs: int | None = None
    """Record each new token's log-probability and this many most likely alternatives."""
    tokens: list[int] = field(default_factory=list)
    output: str = ""
    token_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None
    """"stop" (a stop token or string), "length" (max_new_tokens), "cancelled", "error"."""
    cancelled: bool = False
    """Set from any thread to drop it at the next step (a client that went away)."""
    generator: torch.Generator | None = field(default=None, repr=False)

    def accept(self, token: int) -> str:
        """Take the next token; returns the text it adds and sets `finish_reason` at the end."""
        self.tokens.append(token)
        piece = ""
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif self.text is not None:
            piece = self.text.push(token)
            if self.text.stopped:
                self.finish_reason = "stop"
        if self.finish_reason is None and len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None and self.text is not None:
            piece += self.text.flush()
        self.output += piece
        return piece


def sample_rows(logits: torch.Tensor, gens: Sequence[Generation]) -> list[int]:
    """One token per row of logits (k, vocab), each row with its generation's settings and
    generator (a row drawn alone draws the same token)."""
    picks = logits.argmax(dim=-1).tolist()
    for i, g in enumerate(gens):
        if g.temperature > 0:
            picks[i] = int(sample_next(logits[i:i + 1], g.temperature, g.top_k, g.top_p,
                                       g.generator)[0])
    return picks


def record_logprobs(logits: torch.Tensor, gens: Sequence[Generation], picks: list[int]) -> None:
    """Append the log-probability of each row's pick (under the model's own distribution, before
    temperature and filters) and its `logprobs` most likely tokens, for rows that ask."""
    for i, g in enumerate(gens):
        if g.logprobs is None:
            continue
        lp = logits[i].float().log_softmax(-1)
        top = lp.topk(g.logprobs) if g.logprobs else None
        alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top else []
        g.token_logprobs.append((float(lp[picks[i]]), alternatives))


class BatchGenerator:
    """Continuous batching: `submit` generations at any time; each `step` feeds every running
    row one token, then admits waiting generations into free rows (prefilled together), and
    returns [(generation, new text)] for each that advanced, and for each that was cancelled
    (finish_reason "cancelled", no new token). A finished or cancelled generation leaves its
    row at once."""

    def __init__(self, model: GPT, max_batch: int = 16, use_kv_cache: bool = True) -> None:
        self.model = model.eval()
        self.decoder = Decoder(model, max_batch, use_kv_cache)
        self.waiting: deque[Generation] = deque()
        self.device = self.decoder.device

    @property
    def running(self) -> list[Generation]:
        return self.decoder.handles

    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def submit(self, gen: Generation) -> None:
        """Queue a generation; bad settings or a prompt that does not fit are refused here."""
        check_sampling(gen.temperature, gen.top_k, gen.top_p, gen.max_new_tokens, gen.seed)
        if not gen.prompt:
            raise ScratchError("the prompt is empty; give at least one token")
        check_context(len(gen.prompt), gen.max_new_tokens, self.model.config.block_size,
                      fix="shorten them")
        check_token_ids(torch.tensor(gen.prompt), self.model.config.vocab_size)
        if gen.seed is not None and gen.generator is None:
            gen.generator = torch.Generator(self.device).manual_seed(gen.seed)
        self.waiting.append(gen)

    @torch.inference_mode()
    def step(self) -> list[tuple[Generation, str]]:
        gone = [g for g in [*self.running, *self.waiting] if g.cancelled]
        for g in gone:
            g.finish_reason = "cancelled"
        self.decoder.remove([g for g in gone if g in self.running])
        self.waiting = deque(g for g in self.waiting if not g.cancelled)
        events: list[tuple[Generation, str]] = [(g, "") for g in gone]
        if self.running:
            last = torch.tensor([g.tokens[-1] for g in self.running])
            events += self._advance(list(self.running), self.decoder.step(last))
        free = self.decoder.max_rows - len(self.running)
        if self.waiting and free:
            new = list(itertools.islice(self.waiting, free))
            logits = self.decoder.add([g.prompt for g in new], new)
            # Taken off the queue only once they hold rows: a prefill that raises leaves them
            # waiting, where fail_all finds them, instead of in neither place.
            for _ in new:
                self.waiting.popleft()
            events += self._advance(new, logits)
        return events

    def _advance(self, gens: list[Generation], logits: torch.Tensor
                 ) -> list[tuple[Generation, str]]:
        picks = sample_rows(logits, gens)
        record_logprobs(logits, gens, picks)
        events = [(g, g.accept(t)) for g, t in zip(gens, picks)]
        self.decoder.remove([g for g in gens if g.finish_reason is not None])
        return events

    def fail_all(self) -> list[Generation]:
        """End every generation with finish_reason "error" (after an exception in a step) and
        start again empty; returns them."""
        failed = list(self.running) + list(self.waiting)
        for g in failed:
            g.finish_reason = "error"
        self.decoder.clear()
        self.waiting.clear()
        return failed


def run_all(model: GPT, gens: Sequence[Generation], max_batch: int | None = None,
            use_kv_cache: bool = True) -> None:
    """Run generations to their end, together (at most `max_batch` rows at once)."""
    if not gens:
        return
    batcher = BatchGenerator(model, max_batch or len(gens), use_kv_cache)
    for g in gens:
        batcher.submit(g)
    while batcher.busy():
        batcher.step()


def generate_batch(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int | None = None,
    use_kv_cache: bool = True,
    max_batch: int | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt (lists of ids of any lengths), generated as one batch.
    A row ends at its own stop token (included) or after max_new_tokens. With a seed every
    row samples from its own generator seeded with it, so each row equals its prompt
    generated alone (`stream` on a batch of one) with that seed."""
    gens = [Generation(list(p), max_new_tokens, temperature, top_k, top_p, seed,
                       stop_ids=list(stop_tokens)) for p in prompts]
    run_all(model, gens, max_batch, use_kv_cache)
    return [g.tokens for g in gens]


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


def template_chat_ids(template, tokenizer, history: Sequence[tuple[str, str]], message: str,
                      max_tokens: int) -> list[int]:
    """The conversation so far plus the new message in the model's chat template
    (scratchlm.templates), ready for the reply, dropping the oldest turns until it fits in
    `max_tokens`."""
    turns = [m for u, a in history for m in ({"role": "user", "content": u},
                                             {"role": "assistant", "content": a})]
    last = [{"role": "user", "content": message}]
    while True:
        ids = template.encode(tokenizer, turns + last, add_generation_prompt=True)[0]
        if len(ids) <= max_tokens:
            return ids
        if not turns:
            raise ScratchError(f"the message alone is longer than the {max_tokens} tokens the "
                               "context leaves; shorten it or lower --max-new-tokens")
        turns = turns[2:]
