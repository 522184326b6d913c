"""Fast backends for the merges learned here: tiktoken and Hugging Face `tokenizers`.

Both are built from a BPETokenizer's own merges and must give the same ids as its from-scratch
encoder (tests check this on real corpora and fuzzed text); the from-scratch encoder stays the
reference, these are what large jobs use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tiktoken
    import tokenizers

    from scratchlm.tokenizer.bpe import BPETokenizer


def to_tiktoken(tok: BPETokenizer) -> tiktoken.Encoding:
    """A tiktoken Encoding over the same vocabulary, cached on the tokenizer.

    tiktoken merges by rank of the joined bytes, where rank is the token id; since merge i makes
    id 256 + i, a lower id is an earlier merge, exactly the priority the reference encoder uses.
    """
    enc = getattr(tok, "_tiktoken", None)
    if enc is None:
        import tiktoken

        ranks = {data: i for i, data in enumerate(tok.vocab)}
        enc = tiktoken.Encoding(f"scratchlm-{len(ranks)}", pat_str=tok.pattern,
                                mergeable_ranks=ranks, special_tokens=tok.special_tokens)
        tok._tiktoken = enc
    return enc


def to_hf_tokenizer(tok: BPETokenizer) -> tokenizers.Tokenizer:
    """A Hugging Face `tokenizers.Tokenizer` (save it as `tokenizer.json`): the same regex split,
    then GPT-2's byte-to-character map, then BPE over the same merges."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from scratchlm.tokenizer.gpt2 import token_to_str

    names = [token_to_str(b) for b in tok.vocab]
    model = models.BPE(
        vocab={name: i for i, name in enumerate(names)},
        merges=[(names[a], names[b]) for a, b in tok.merges],
        fuse_unk=False,
        byte_fallback=False,
    )
    hf = Tokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    # Specials in id order, so each lands on the id this tokenizer gave it.
    for name, _ in sorted(tok.special_tokens.items(), key=lambda kv: kv[1]):
        hf.add_special_tokens([AddedToken(name, special=True, normalized=False)])
    for name, i in tok.special_tokens.items():
        if hf.token_to_id(name) != i:
            raise ValueError(f"special token {name!r} would get id {hf.token_to_id(name)} in "
                             f"tokenizer.json instead of {i}; special ids must follow the merges")
    return hf
