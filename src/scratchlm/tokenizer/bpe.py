"""Byte-level BPE (Sennrich et al. 2016; GPT-2's byte-level variant, Radford et al. 2019).

Text is split into chunks by a regex (so merges never cross a word and its punctuation), each
chunk is turned into its UTF-8 bytes, and learned merges glue adjacent tokens together. Every
byte is a token, so any string round-trips exactly.

State (and the saved format, `bpe.json`):
  byte_ids        256 ints: the token id of each byte value (the identity for tokenizers trained
                  here; a permutation for OpenAI's GPT-2 files)
  merges          [[a, b], ...] in priority order; merge i makes token id 256 + i
  special_tokens  {"<|endoftext|>": id, ...}, ids after the merged ones
  pattern         the pre-tokenization regex
"""

from __future__ import annotations

import heapq
import json
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Literal

import regex
from tqdm.auto import tqdm

from scratchlm.errors import ScratchError
from scratchlm.tokenizer.sources import Source, iter_source_text

# GPT-2's split: contractions, letters, digits, other symbols, each with at most one leading space.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4's (cl100k) split: case-insensitive contractions, digits in groups of at most three,
# and line breaks kept apart from other whitespace.
GPT4_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
FORMAT = "scratchlm-bpe"
FORMAT_VERSION = 1
FILENAME = "bpe.json"

Pair = tuple[int, int]
SpecialSet = Literal["all"] | Collection[str]


def resolve_pattern(pattern: str) -> str:
    """A pattern name ("gpt2", "gpt4") or a regex of one's own, compiled once to check it."""
    pattern = PATTERNS.get(pattern, pattern)
    try:
        compiled = regex.compile(pattern)
    except regex.error as e:
        raise ScratchError(f"pattern {pattern!r} is not a valid regex ({e}); "
                           f"use one of {sorted(PATTERNS)} or fix the regex") from None
    if compiled.match("") is not None:
        # An empty match splits nothing and makes the fast encoders loop or fail.
        raise ScratchError(f"pattern {pattern!r} matches the empty string; make every "
                           "alternative match at least one character (e.g. x+ rather than x*)")
    return pattern


def check_coverage(pattern: str, text: str, where: str = "the text") -> None:
    """Refuse a split pattern that leaves characters of `text` out of every chunk: they would
    be dropped silently, and decode(encode(x)) != x."""
    pos = 0
    for m in regex.finditer(pattern, text):
        if m.start() != pos:
            break
        pos = m.end()
    if pos != len(text):
        raise ScratchError(f"pattern {pattern!r} does not cover {where}: {text[pos:pos + 10]!r} "
                           f"at character {pos} falls outside every chunk and would be lost; "
                           "add an alternative that matches it (e.g. end with |\\s+|.)")


class BPETokenizer:
    """A byte-level BPE tokenizer: train, encode, decode, save, load."""

    def __init__(
        self,
        merges: Sequence[Pair],
        pattern: str = "gpt4",
        special_tokens: dict[str, int] | None = None,
        byte_ids: Sequence[int] | None = None,
    ) -> None:
        self.pattern = resolve_pattern(pattern)
        self.merges: list[Pair] = [(int(a), int(b)) for a, b in merges]
        self.byte_ids: list[int] = list(range(256)) if byte_ids is None else list(byte_ids)
        self.special_tokens: dict[str, int] = dict(special_tokens or {})
        if sorted(self.byte_ids) != list(range(256)):
            raise ScratchError("byte_ids must be a permutation of 0..255")
        n = 256 + len(self.merges)
        # vocab[i] is the byte string of token i; a merge's bytes are its two parts joined.
        self.vocab: list[bytes] = [b""] * n
        for byte, i in enumerate(self.byte_ids):
            self.vocab[i] = bytes([byte])
        for rank, (a, b) in enumerate(self.merges):
            if not (0 <= a < 256 + rank and 0 <= b < 256 + rank):
                raise ScratchError(f"merge {rank} ({a}, {b}) uses a token not yet made; "
                                   "the merges list is corrupt")
            self.vocab[256 + rank] = self.vocab[a] + self.vocab[b]
        # The merge of pair (a, b) makes id 256 + rank, so a lower id is an earlier merge.
        self._merge_id: dict[Pair, int] = {p: 256 + r for r, p in enumerate(self.merges)}
        for name, i in self.special_tokens.items():
            if i < n:
                raise ScratchError(f"special token {name!r} has id {i}, which an ordinary token "
                                   f"already uses; special ids start at {n}")
        self._special_by_id = {i: name for name, i in self.special_tokens.items()}
        self._split = regex.compile(self.pattern)
        self._cache: dict[str, list[int]] = {}

    # ----------------------------------------------------------------------------------------
    # sizes and lookups

    @property
    def vocab_size(self) -> int:
        """Ordinary tokens plus special tokens: the embedding table a model needs."""
        return max([256 + len(self.merges) - 1, *self.special_tokens.values()]) + 1

    @property
    def eot_id(self) -> int | None:
        """The end-of-text token that separates documents, if this tokenizer has one."""
        return self.special_tokens.get("<|endoftext|>")

    def token_bytes(self, i: int) -> bytes:
        if 0 <= i < len(self.vocab):
            return self.vocab[i]
        if i in self._special_by_id:
            return self._special_by_id[i].encode("utf-8")
        raise ScratchError(f"token id {i} is outside this tokenizer's vocabulary "
                           f"(size {self.vocab_size}); were these ids made by another tokenizer?")

    # ----------------------------------------------------------------------------------------
    # training

    @classmethod
    def train(
        cls,
        sources: Source | Iterable[Source],
        vocab_size: int,
        pattern: str = "gpt4",
        special_tokens: Sequence[str] = ("<|endoftext|>",),
        errors: str = "strict",
        progress: bool = True,
    ) -> BPETokenizer:
        """Learn `vocab_size - 256 - len(special_tokens)` merges from streamed text.

        The corpus is read once to count its regex chunks; merging then works on the distinct
        chunks only, keeping pair counts up to date incrementally and picking the most frequent
        pair from a heap, so no merge rescans the corpus. Ties go to the pair with the smaller
        ids (the pair whose parts were made earlier), so training is deterministic.
        Special tokens occurring in the text are cut out of it, never learned as merges.
        """
        pattern = resolve_pattern(pattern)
        if not all(special_tokens):
            raise ScratchError("a special token cannot be empty; give each one some text "
                               "(e.g. --special-tokens '<|endoftext|>')")
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ScratchError(f"vocab size {vocab_size} is too small: it must be at least "
                               f"256 bytes + {len(special_tokens)} special tokens")
        if len(set(special_tokens)) != len(special_tokens):
            raise ScratchError(f"special tokens {list(special_tokens)} contain a duplicate")
        chunks = count_chunks(sources, pattern, special_tokens, errors, progress)
        if not chunks:
            raise ScratchError("the training corpus is empty: give at least one non-empty text")
        merges = learn_merges(chunks, n_merges, progress)
        if len(merges) < n_merges:
            warnings.warn(f"asked for a vocabulary of {vocab_size} but the corpus only allows "
                          f"{256 + len(merges) + len(special_tokens)}: after {len(merges)} "
                          "merges no pair of tokens occurs twice (a larger or more varied "
                          "corpus would give more)", stacklevel=2)
        specials = {s: 256 + len(merges) + k for k, s in enumerate(special_tokens)}
        return cls(merges, pattern, specials)

    # ----------------------------------------------------------------------------------------
    # encoding (the from-scratch reference; see fast.py for the tiktoken / tokenizers paths)

    def encode(
        self,
        text: str,
        allowed_special: SpecialSet = (),
        disallowed_special: SpecialSet = "all",
    ) -> list[int]:
        """Token ids of `text`. Special tokens are refused unless allowed, as tiktoken does:
        `allowed_special` lists those to encode as special ids, and any other special token
        in `disallowed_special` found in the text is an error (pass `disallowed_special=()` to
        encode such strings as ordinary text)."""
        allowed = self._check_special(text, allowed_special, disallowed_special)
        if not allowed:
            return self.encode_ordinary(text)
        # Longest first, so that a special token that contains another one wins.
        split = regex.compile("(" + "|".join(
            regex.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")")
        ids: list[int] = []
        for k, part in enumerate(split.split(text)):
            # re.split with one group alternates: text, special, text, special, ...
            if k % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def _check_special(self, text: str, allowed_special: SpecialSet,
                       disallowed_special: SpecialSet) -> set[str]:
        """The allowed special tokens; raises if `text` holds a disallowed one."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ScratchError(f"allowed_special names {sorted(unknown)}, which this tokenizer "
                               f"does not have; it has {sorted(self.special_tokens)}")
        disallowed = (set(self.special_tokens) if disallowed_special == "all"
                      else set(disallowed_special)) - allowed
        for s in disallowed:
            if s in text:
                raise ScratchError(
                    f"text contains the special token {s!r}; pass allowed_special={{{s!r}}} to "
                    "encode it as a special token, or disallowed_special=() to encode it as text")
        return allowed

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text`, with special-token strings treated as plain text."""
        ids: list[int] = []
        for chunk in self._split.findall(text):
            cached = self._cache.get(chunk)
            if cached is None:
                cached = self._encode_chunk(_utf8(chunk))
                if len(self._cache) >= 200_000:  # bound memory on endless streams of new words
                    self._cache.clear()
                self._cache[chunk] = cached
            ids.extend(cached)
        return ids

    def _encode_chunk(self, data: bytes) -> list[int]:
        """Apply the merges to one chunk: repeatedly merge the adjacent pair that was learned
        earliest, all of its occurrences left to right, until no adjacent pair is a merge."""
        ids = [self.byte_ids[b] for b in data]
        merge_id = self._merge_id
        while len(ids) > 1:
            best = min(merge_id.get(p, 1 << 62) for p in zip(ids, ids[1:]))
            if best == 1 << 62:
                break
            ids = _merge_word(ids, self.merges[best - 256], best)
        return ids

    def encode_batch(
        self,
        texts: Sequence[str],
        allowed_special: SpecialSet = (),
        disallowed_special: SpecialSet = "all",
        fast: bool = True,
    ) -> list[list[int]]:
        """Encode many texts. `fast=True` runs them through tiktoken built from these merges
        (several threads, identical ids); `fast=False` through the reference encoder."""
        if not fast:
            return [self.encode(t, allowed_special, disallowed_special) for t in texts]
        from scratchlm.tokenizer.fast import to_tiktoken

        allowed: set[str] = set()
        for text in texts:
            allowed = self._check_special(text, allowed_special, disallowed_special)
        return to_tiktoken(self).encode_batch(list(texts), allowed_special=allowed,
                                              disallowed_special=())

    # ----------------------------------------------------------------------------------------
    # decoding

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes behind `ids` (a prefix may end inside a UTF-8 character)."""
        return b"".join(self.token_bytes(int(i)) for i in ids)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Text of `ids`; incomplete UTF-8 (a cut-off multi-byte character) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    # ----------------------------------------------------------------------------------------
    # persistence

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "byte_ids": self.byte_ids,
            "merges": [list(p) for p in self.merges],
            "special_tokens": self.special_tokens,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `bpe.json` (this format) and `tokenizer.json` (Hugging Face `tokenizers`)
        into `directory`, each atomically. Returns the path of `bpe.json`."""
        from scratchlm.tokenizer.fast import to_hf_tokenizer
        from scratchlm.utils import atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = atomic_write_text(directory / FILENAME, json.dumps(self.to_dict()))
        atomic_write_text(directory / "tokenizer.json", to_hf_tokenizer(self).to_str())
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> BPETokenizer:
        """Load a tokenizer saved by `save` (a directory, or the `bpe.json` file itself)."""
        path = Path(directory)
        if path.is_dir():
            path = path / FILENAME
        if not path.is_file():
            raise ScratchError(f"{path.parent}: no tokenizer here ({FILENAME} is missing); "
                               "train one with `scratchlm tokenizer train` or check the path")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ScratchError(f"{path}: not a readable tokenizer file ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ScratchError(f"{path}: not a scratchlm tokenizer (format must be {FORMAT!r})")
        if data.get("version") != FORMAT_VERSION:
            raise ScratchError(f"{path}: tokenizer format version {data.get('version')} is not "
                               f"supported (expected {FORMAT_VERSION}); upgrade scratchlm")
        try:
            return cls(data["merges"], data["pattern"], data["special_tokens"], data["byte_ids"])
        except (KeyError, TypeError, ValueError) as e:
            raise ScratchError(f"{path}: tokenizer file is corrupt ({e!r})") from None

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={sorted(self.special_tokens)})")


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ScratchError(f"text has a lone surrogate {text[e.start]!r} at character {e.start}, "
                           "which UTF-8 cannot encode; clean the text first") from None


def count_chunks(
    sources: Source | Iterable[Source],
    pattern: str,
    special_tokens: Sequence[str] = (),
    errors: str = "strict",
    progress: bool = True,
) -> Counter[str]:
    """How often each regex chunk occurs in the streamed corpus (special tokens cut out)."""
    split = regex.compile(pattern)
    cut = (regex.compile("|".join(regex.escape(s) for s in special_tokens))
           if special_tokens else None)
    counts: Counter[str] = Counter()
    checked = False
    with tqdm(desc="counting chunks", unit="char", unit_scale=True, disable=not progress) as bar:
        for text in iter_source_text(sources, errors):
            for part in (cut.split(text) if cut else (text,)):
                if not checked and part:  # the pattern must cover real text, not only ASCII
                    check_coverage(pattern, part[:100_000], "the training text")
                    checked = True
                counts.update(split.findall(part))
            bar.update(len(text))
    return counts


def learn_merges(chunks: Counter[str], n_merges: int, progress: bool = True) -> list[Pair]:
    """The BPE merge loop over distinct chunks ("words") with their counts."""
    words: list[list[int]] = [list(_utf8(c)) for c in chunks]
    freqs: list[int] = list(chunks.values())
    pair_counts: defaultdict[Pair, int] = defaultdict(int)
    where: defaultdict[Pair, set[int]] = defaultdict(set)  # pair -> words that may contain it
    for w, (word, f) in enumerate(zip(words, freqs)):
        for p in zip(word, word[1:]):
            pair_counts[p] += f
            where[p].add(w)
    # Max-heap by count via negation; entries go stale as counts change and are checked on pop.
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[Pair] = []
    with tqdm(total=n_merges, desc="merging", unit="merge", disable=not progress) as bar:
        while len(merges) < n_merges and heap:
            neg, pair = heapq.heappop(heap)
            count = pair_counts.get(pair, 0)
            if count != -neg:  # stale: re-queue with the true count, if any is left
                if count > 0:
                    heapq.heappush(heap, (-count, pair))
                continue
            new_id = 256 + len(merges)
            merges.append(pair)
            touched: set[Pair] = set()
            for w in where.pop(pair):
                word = words[w]
                merged = _merge_word(word, pair, new_id)
                if len(merged) == len(word):  # an earlier merge in this word used the pair up
                    continue
                f = freqs[w]
                for p in zip(word, word[1:]):
                    pair_counts[p] -= f
                for p in zip(merged, merged[1:]):
                    pair_counts[p] += f
                    if new_id in p:
                        where[p].add(w)
                        touched.add(p)
                words[w] = merged
            del pair_counts[pair]
            for p in touched:
                heapq.heappush(heap, (-pair_counts[p], p))
            bar.update(1)
    return merges


def _merge_word(word: list[int], pair: Pair, new_id: int) -> list[int]:
    """`word` with every occurrence of `pair`, scanning left to right, replaced by `new_id`."""
    a, b = pair
    out: list[int] = []
    i, n = 0, len(word)
    while i < n:
        if word[i] == a and i + 1 < n and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out
