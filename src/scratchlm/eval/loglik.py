"""Scoring requests the way lm-evaluation-harness does, so that its numbers and ours agree to
float precision: the log-likelihood of a continuation after a context, the log-likelihood of
every token of a text (rolling windows), and greedy answers.

- A (context, continuation) pair is split into tokens as lm-eval's causal models split it:
  trailing whitespace of the context moves to the continuation, the whole string is encoded,
  and the continuation is what follows the context's own encoding. An empty context is
  replaced by <|endoftext|>.
- Inputs longer than the model's context keep their last block_size tokens.
- A text is scored in windows of block_size predictions, each token predicted from as many
  tokens before it as fit in one window (lm-eval's loglikelihood_rolling).
- Greedy answers stop at <|endoftext|> or max_new_tokens and are cut at the first stop string;
  the prompt keeps its last block_size - max_new_tokens tokens.

Batches are right-padded: under a causal mask, padding after a row's tokens changes none of
its logits, so a row scores the same alone or in any batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from scratchlm.errors import ScratchError
from scratchlm.model.gpt import GPT
from scratchlm.model.logprobs import IGNORE, sequence_logprobs

Pair = tuple[list[int], list[int]]  # (context token ids, continuation token ids)


def _eot(tokenizer) -> int:
    if tokenizer.eot_id is None:
        raise ScratchError("the tokenizer has no <|endoftext|> token, which an empty context "
                           "and rolling log-likelihoods start from; use a tokenizer with one")
    return tokenizer.eot_id


def encode_pairs(tokenizer, requests: Sequence[tuple[str, str]]) -> list[Pair]:
    """(context, continuation) strings -> token id pairs, split as lm-eval splits them."""
    texts: list[str] = []
    has_context: list[bool] = []
    for context, continuation in requests:
        if context:
            n_space = len(context) - len(context.rstrip())
            if n_space:
                context, continuation = context[:-n_space], context[-n_space:] + continuation
            texts += [context + continuation, context]
        else:
            texts.append(continuation)
        has_context.append(bool(context))
    ids = iter(tokenizer.encode_batch(texts, disallowed_special=()))
    pairs: list[Pair] = []
    for context in has_context:
        if context:
            whole, ctx = next(ids), next(ids)
            pairs.append((ctx, whole[len(ctx):]))
        else:
            cont = next(ids)
            eot = _eot(tokenizer)
            # A continuation that itself starts with <|endoftext|> is conditioned on it.
            pairs.append((cont[:1], cont[1:]) if cont and cont[0] == eot else ([eot], cont))
    return pairs


def _device(model: GPT) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_pairs(model: GPT, pairs: Sequence[Pair], batch_size: int = 16
                ) -> list[tuple[float, bool]]:
    """Per pair: (log p(continuation | context) summed over its tokens, whether greedy
    decoding would produce exactly the continuation)."""
    block, device = model.config.block_size, _device(model)
    for _, cont in pairs:
        if not cont:
            raise ScratchError("a continuation encodes to no tokens; every choice needs text")
        if len(cont) > block:
            raise ScratchError(f"a continuation of {len(cont)} tokens is longer than the "
                               f"model's context ({block}); shorten the choices")
    was_training = model.training
    model.eval()
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    # Longest first: a batch of similar lengths wastes little padding.
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    try:
        for b in range(0, len(order), batch_size):
            rows = order[b:b + batch_size]
            seqs = [(pairs[i][0] + pairs[i][1])[-(block + 1):] for i in rows]
            width = max(len(s) for s in seqs) - 1
            inputs = torch.zeros(len(rows), width, dtype=torch.long)
            targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
            for r, (i, seq) in enumerate(zip(rows, seqs)):
                n, n_cont = len(seq) - 1, len(pairs[i][1])
                inputs[r, :n] = torch.tensor(seq[:-1])
                targets[r, n - n_cont:n] = torch.tensor(seq[-n_cont:])
            inputs, targets = inputs.to(device), targets.to(device)
            logits, _ = model(inputs)  # (B, T, vocab)
            sums = sequence_logprobs(logits, targets)  # (B,)
            greedy = ((logits.argmax(-1) == targets) | (targets == IGNORE)).all(-1)  # (B,)
            for r, i in enumerate(rows):
                results[i] = (float(sums[r]), bool(greedy[r]))
    finally:
        model.train(was_training)
    return results


def rolling_windows(tokens: Sequence[int], prefix: int, block: int) -> list[Pair]:
    """Pairs that score every token of `tokens` exactly once: targets in chunks of `block`,
    each chunk's input the `block` tokens before its last target (the first chunk starts from
    `prefix`)."""
    seq = [prefix, *tokens]  # seq[k + 1] is tokens[k]
    pairs = []
    for start in range(0, len(tokens), block):
        end = min(start + block, len(tokens))
        first = max(0, end - block)
        pairs.append((seq[first:start + 1], seq[start + 1:end + 1]))
    return pairs


def rolling_loglikelihoods(model: GPT, tokenizer, texts: Sequence[str], batch_size: int = 16
                           ) -> list[float]:
    """log p(text), summed over all of its tokens, for each text."""
    eot = _eot(tokenizer)
    windows = [rolling_windows(ids, eot, model.config.block_size)
               for ids in tokenizer.encode_batch(list(texts), disallowed_special=())]
    scores = iter(score_pairs(model, [p for w in windows for p in w], batch_size))
    return [sum(next(scores)[0] for _ in w) for w in windows]


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = min((text.find(s) for s in until if s and s in text), default=len(text))
    return text[:cut]


@torch.no_grad()
def greedy_answers(model: GPT, tokenizer, prompts: Sequence[str],
                   until: Sequence[Sequence[str]], max_new_tokens: Sequence[int],
                   batch_size: int = 16) -> list[str]:
    """The greedy continuation of each prompt, cut at its stop strings. Prompts of the same
    length in tokens (and budget) are generated together through the KV cache."""
    from scratchlm.generate import generate

    block, device = model.config.block_size, _device(model)
    eot = tokenizer.eot_id
    encoded = tokenizer.encode_batch(list(prompts), disallowed_special=())
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (ids, new) in enumerate(zip(encoded, max_new_tokens)):
        if not ids:
            raise ScratchError("a generation prompt encodes to no tokens; give it text")
        if new >= block:
            raise ScratchError(f"max_new_tokens {new} leaves no room for the prompt in the "
                               f"model's context of {block}")
        encoded[i] = ids[-(block - new):]
        groups[(len(encoded[i]), new)].append(i)
    answers = [""] * len(prompts)
    was_training = model.training
    try:
        for (_, new), members in sorted(groups.items()):
            for b in range(0, len(members), batch_size):
                rows = members[b:b + batch_size]
                idx = torch.tensor([encoded[i] for i in rows], device=device)
                out = generate(model, idx, new, temperature=0.0,
                               stop_tokens=[eot] if eot is not None else [])
                for r, i in enumerate(rows):
                    ids = out[r, idx.size(1):].tolist()
                    if eot in ids:
                        ids = ids[:ids.index(eot)]
                    answers[i] = cut_at_stops(tokenizer.decode(ids), until[i])
    finally:
        model.train(was_training)
    return answers
