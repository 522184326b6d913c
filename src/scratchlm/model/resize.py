"""Adding tokens to a trained model: the tokenizer gets new special tokens (ids after its
last one) and the model's embedding (and an untied head) grows to hold them.

A new row starts as the mean of the trained rows (Hewitt 2021): a random row is far from
every trained one and makes the first predictions after it arbitrary, while the mean row
behaves like an average token until fine-tuning gives it a meaning. Rows the model already had
beyond the tokenizer's vocabulary (padding, never trained) are reset the same way when a new
token lands on them.
"""

from __future__ import annotations

import torch

from scratchlm.model.gpt import GPT, tied_weights
from scratchlm.tokenizer import BPETokenizer


def add_special_tokens(model: GPT, tokenizer: BPETokenizer, tokens: list[str]
                       ) -> tuple[GPT, BPETokenizer, list[str]]:
    """(model, tokenizer, the tokens that were new): the tokenizer with `tokens` added as
    special tokens where missing, and the model grown to its vocabulary (a new GPT when it
    must grow, else the same one with the new rows reset)."""
    new = [t for t in dict.fromkeys(tokens) if t not in tokenizer.special_tokens]
    if not new:
        return model, tokenizer, []
    start = tokenizer.vocab_size
    specials = {**tokenizer.special_tokens, **{t: start + i for i, t in enumerate(new)}}
    tokenizer = BPETokenizer(tokenizer.merges, tokenizer.pattern, specials, tokenizer.byte_ids)
    ids = list(range(start, tokenizer.vocab_size))
    if tokenizer.vocab_size > model.config.vocab_size:
        model = grow(model, tokenizer.vocab_size)
    with torch.no_grad():
        tables = [model.tok_emb.weight]
        if not tied_weights(model):
            tables.append(model.lm_head.weight)
        for table in tables:
            table[ids] = table[:start].mean(0)
    return model, tokenizer, new


def grow(model: GPT, vocab_size: int) -> GPT:
    """A new GPT with room for `vocab_size` tokens holding `model`'s weights, its new rows of
    the embedding (and of an untied head) set to the mean of the old ones. Also used to give a
    base the vocabulary of a LoRA adapter trained with added tokens (`lora.load_adapter`)."""
    import dataclasses

    old = model.config.vocab_size
    grown = GPT(dataclasses.replace(model.config, vocab_size=vocab_size)).to(
        model.tok_emb.weight.device)
    state = model.state_dict()
    with torch.no_grad():
        for name, p in grown.state_dict().items():
            if name in state and state[name].shape == p.shape:
                p.copy_(state[name])
            elif name in state:  # tok_emb / an untied lm_head: keep the trained rows
                p[:old].copy_(state[name])
                p[old:] = state[name].mean(0)
    grown.train(model.training)
    return grown
