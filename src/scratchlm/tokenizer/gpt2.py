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
    """Build a BPETokenizer from OpenAI's GPT-2 `encoder.json` and `vocab.bpe` (Hugging Face's
    `vocab.json` and `merges.txt` are the same two files)."""
    encoder: dict[str, int] = json.loads(_read(Path(encoder_json), "encoder"))
    lines = _read(Path(vocab_bpe), "merges").split("\n")
    if not lines[0].startswith("#version"):
        raise ScratchError(f"{vocab_bpe}: not a GPT-2 merges file (no '#version' header)")
    pairs = [tuple(ln.split()) for ln in lines[1:] if ln.strip()]
    return from_encoder(encoder, pairs, GPT2_PATTERN, str(encoder_json))


def from_encoder(encoder: dict[str, int], pairs: list[tuple[str, str]], pattern: str,
                 source: str, specials: dict[str, int] | None = None) -> BPETokenizer:
    """A BPETokenizer from byte-level token names (GPT-2's byte-to-character map) and merges
    in rank order; merge i must make token 256 + i (true of GPT-2, of tiktoken-style
    vocabularies and of every tokenizer this project writes)."""
    byte_ids = [encoder[byte_to_unicode()[b]] for b in range(256)]
    merges = []
    for rank, (a, b) in enumerate(pairs):
        if encoder.get(a + b) != 256 + rank:
            raise ScratchError(f"{source}: token {a + b!r} has id {encoder.get(a + b)}, not "
                               f"{256 + rank}: merges and vocabulary do not belong together")
        merges.append((encoder[a], encoder[b]))
    if specials is None:
        specials = {t: i for t, i in encoder.items() if i >= 256 + len(merges)}
    return BPETokenizer(merges, pattern, specials, byte_ids)


def from_hf_json(path: str | os.PathLike) -> BPETokenizer:
    """A BPETokenizer from a Hugging Face byte-level BPE `tokenizer.json` (GPT-2's, Llama 3's,
    or one this project exported)."""
    data = json.loads(_read(Path(path), "tokenizer.json"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ScratchError(f"{path}: not a BPE tokenizer (model type {model.get('type')!r}); "
                           "only byte-level BPE tokenizers can be read")
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    split = [s for s in steps if s.get("type") == "Split"]
    if split and "Regex" in split[0].get("pattern", {}):
        pattern = split[0]["pattern"]["Regex"]
    elif any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps):
        pattern = GPT2_PATTERN
    else:
        raise ScratchError(f"{path}: no byte-level split pattern found in its pre_tokenizer")
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
             for m in model["merges"]]
    specials = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    return from_encoder(model["vocab"], pairs, pattern, str(path), specials)


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
