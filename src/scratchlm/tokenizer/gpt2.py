"""OpenAI's GPT-2 tokenizer files (`encoder.json` + `vocab.bpe`) in and out of scratchlm.

GPT-2 stores byte-level tokens as printable strings: each byte is mapped to one unicode
character (printable bytes to themselves, the rest to code points from 256 up), so that merges
can be written as whitespace-separated text. The same mapping names tokens in Hugging Face's
byte-level `tokenizer.json`.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

from scratchlm.errors import ScratchError
from scratchlm.tokenizer.bpe import GPT2_PATTERN, BPETokenizer

EOT = "<|endoftext|>"


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:  # whitespace and control bytes: move out of the way, in byte order
            table[b] = chr(256 + extra)
            extra += 1
    return table


@cache
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def token_to_str(data: bytes) -> str:
    """A token's bytes as GPT-2 / Hugging Face write them."""
    table = byte_to_unicode()
    return "".join(table[b] for b in data)


def str_to_token(text: str) -> bytes:
    table = unicode_to_byte()
    return bytes(table[c] for c in text)


def _read(path: Path, what: str) -> str:
    if not path.is_file():
        raise ScratchError(f"{path}: GPT-2 {what} file not found; pass the path to OpenAI's "
                           f"{path.name}")
    return path.read_text(encoding="utf-8")


def from_gpt2(encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> BPETokenizer:
    """Build a BPETokenizer from OpenAI's GPT-2 `encoder.json` and `vocab.bpe`."""
    encoder: dict[str, int] = json.loads(_read(Path(encoder_json), "encoder"))
    lines = _read(Path(vocab_bpe), "merges").split("\n")
    if not lines[0].startswith("#version"):
        raise ScratchError(f"{vocab_bpe}: not a GPT-2 merges file (no '#version' header)")
    byte_ids = [encoder[byte_to_unicode()[b]] for b in range(256)]
    merges = []
    for rank, line in enumerate(ln for ln in lines[1:] if ln.strip()):
        a, b = line.split()
        if encoder[a + b] != 256 + rank:
            raise ScratchError(f"{encoder_json}: token {a + b!r} has id {encoder[a + b]}, not "
                               f"{256 + rank}: the two files do not belong together")
        merges.append((encoder[a], encoder[b]))
    specials = {t: i for t, i in encoder.items() if i >= 256 + len(merges)}
    return BPETokenizer(merges, GPT2_PATTERN, specials, byte_ids)


def save_gpt2(tokenizer: BPETokenizer, directory: str | os.PathLike) -> None:
    """Write `encoder.json` and `vocab.bpe` in OpenAI's GPT-2 format."""
    from scratchlm.utils import atomic_write_text

    directory = Path(directory)
    encoder = {token_to_str(tokenizer.vocab[i]): i for i in range(len(tokenizer.vocab))}
    encoder.update(tokenizer.special_tokens)
    merges = [f"{token_to_str(tokenizer.vocab[a])} {token_to_str(tokenizer.vocab[b])}"
              for a, b in tokenizer.merges]
    atomic_write_text(directory / "encoder.json", json.dumps(encoder, ensure_ascii=False))
    atomic_write_text(directory / "vocab.bpe", "\n".join(["#version: 0.2", *merges]) + "\n")


def tiktoken_gpt2(gpt2_dir: str | os.PathLike):
    """tiktoken's own `gpt2` encoding, built offline from the same two files: the reference
    that `from_gpt2` must match id for id (tiktoken.get_encoding("gpt2") would download them)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    d = Path(gpt2_dir)
    ranks = data_gym_to_mergeable_bpe_ranks(str(d / "vocab.bpe"), str(d / "encoder.json"))
    # tiktoken's r50k split: the GPT-2 pattern with possessive quantifiers (same chunks, faster).
    pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
    return tiktoken.Encoding("gpt2", pat_str=pat, mergeable_ranks=ranks,
                             special_tokens={EOT: 50256})
