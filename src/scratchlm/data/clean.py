"""Text clean-up and heuristic quality filters of the kind used for C4, Gopher and FineWeb.

Each filter is a named threshold in `FilterConfig` (None switches it off); `quality_failure`
returns the name of the first filter a document fails, so a run can report how many documents
and bytes each one removed. Thresholds follow Gopher (Rae et al. 2021, appendix A) except where
a comment says why not.
"""

from __future__ import annotations

import string
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from itertools import filterfalse
from operator import methodcaller

import numpy as np
import regex

from scratchlm.data.dedup import Words, inside, ngram_keys

BULLETS = ("•", "·", "-", "*", "‣", "◦", "–")
ELLIPSES = ("...", "…")
# Control characters other than tab and newline, and the Unicode "format" characters that
# are invisible in text (zero-width spaces aside from the joiner that emoji need).
_CONTROL = regex.compile(r"[\p{Cc}--[\t\n]]|[\u200b\u200e\u200f\u2028\u2029\ufeff]",
                         flags=regex.V1)
_BLANKS = regex.compile(r"\n{3,}")
_ALPHA_WORD = regex.compile(r"\S*\p{L}\S*")
_STRIP_PUNCTUATION = methodcaller("strip", string.punctuation)


@dataclass
class FilterConfig:
    normalize: bool = True
    """NFC normalisation, control characters removed, horizontal whitespace collapsed, lines
    stripped, runs of blank lines cut to one."""
    boilerplate: list[str] = field(default_factory=lambda: [
        "javascript", "cookie policy", "use cookies", "privacy policy", "terms of use",
        "all rights reserved", "click here", "subscribe to our newsletter"])
    """Lines containing any of these phrases (case-insensitive) are dropped (C4's rule)."""
    min_words: int | None = 50
    """Fewest words a document may have."""
    max_words: int | None = 100_000
    """Most words a document may have."""
    min_mean_word_length: float | None = 3.0
    """Shortest mean word length (characters)."""
    max_mean_word_length: float | None = 10.0
    """Longest mean word length (characters)."""
    max_symbol_ratio: float | None = 0.1
    """Most '#' and ellipses per word."""
    max_bullet_lines: float | None = 0.9
    """Largest share of lines starting with a bullet."""
    max_ellipsis_lines: float | None = 0.3
    """Largest share of lines ending in an ellipsis."""
    min_alpha_words: float | None = 0.8
    """Smallest share of words containing a letter."""
    max_duplicate_line_chars: float | None = 0.2
    """Largest share of characters in lines that occur more than once. (Gopher also bounds the
    share of duplicated lines, 0.3, which drops drama: speaker names repeat on short lines.)"""
    max_top_ngram_chars: list[float] | None = field(default_factory=lambda: [0.20, 0.18, 0.16])
    """For word 2-, 3-, 4-grams: largest share of characters in the most frequent one (words
    compared lower-cased, here and below)."""
    max_dup_ngram_chars: list[float] | None = field(
        default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])
    """For word 5- to 10-grams: largest share of characters in n-grams occurring twice or more."""


def normalize_text(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    # The common case first: no control, format or separator characters, and no whitespace
    # but " " and newlines (isprintable() is False for all others), with no runs of spaces
    # nor spaces around a newline: then the general path below would change nothing.
    if (not text.replace("\n", "").isprintable() or "  " in text or " \n" in text
            or "\n " in text):
        text = _CONTROL.sub("", text)
        # str.split() splits at runs of any whitespace: per line, collapses and strips them.
        text = "\n".join(" ".join(line.split()) for line in text.split("\n"))
    if "\n\n\n" in text:
        text = _BLANKS.sub("\n\n", text)
    return text.strip()


@cache
def _boilerplate_regex(phrases: tuple[str, ...]) -> regex.Pattern:
    return regex.compile("|".join(regex.escape(p) for p in phrases), flags=regex.IGNORECASE)


def drop_boilerplate(text: str, phrases: list[str]) -> str:
    if not phrases:
        return text
    lowered = text.lower()
    # The common case, no phrase anywhere: plain substring searches are far faster than one
    # case-insensitive regex alternation.
    if not any(p.lower() in lowered for p in phrases):
        return text
    pattern = _boilerplate_regex(tuple(phrases))
    return "\n".join(line for line in text.split("\n") if not pattern.search(line))


def clean(text: str, cfg: FilterConfig) -> str:
    if cfg.normalize:
        text = normalize_text(text)
    return drop_boilerplate(text, cfg.boilerplate)


def _runs(keys: np.ndarray, docs: np.ndarray, n_docs: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Group equal (document, key) pairs: (the pairs' order, sorted by document then key;
    where each group starts in that order; its length; its document)."""
    # One sort of 64-bit values, the document in the top bits and the key's top bits below it
    # (two different n-grams of a document share those by chance ~1 time in 2^40): a plain
    # argsort of one array is several times faster than np.lexsort or a stable argsort.
    shift = np.uint64(64 - max(1, (n_docs - 1).bit_length()))
    packed = (docs.astype(np.uint64) << shift) | (keys >> (np.uint64(64) - shift))
    order = np.argsort(packed)
    ordered = packed[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    counts = np.diff(np.append(starts, len(order)))
    return order, starts, counts, (ordered[starts] >> shift).astype(np.int64)


def _top_ngram_share(words: Words, n: int, pos: np.ndarray, keys: np.ndarray,
                     doc_of: np.ndarray, total: np.ndarray) -> np.ndarray:
    """(documents,) share of word characters in each document's most frequent n-gram among
    those starting at `pos` (0 when none occurs twice). Ties go to the smallest key."""
    share = np.zeros(len(words))
    if not len(pos):
        return share
    order, starts, counts, run_doc = _runs(keys, doc_of[pos], len(words))
    # Per document, the first run (smallest key) of the largest count.
    by_count = np.lexsort((np.arange(len(starts)), -counts, run_doc))
    first = by_count[np.flatnonzero(np.diff(run_doc[by_count], prepend=-1) != 0)]
    first = first[counts[first] > 1]
    where = np.minimum.reduceat(pos[order], starts)[first]  # its first occurrence
    cum = np.concatenate(([0], np.cumsum(words.lengths)))
    chars = cum[where + n] - cum[where]
    share[run_doc[first]] = chars * counts[first] / total[run_doc[first]]
    return share


def _dup_ngram_share(words: Words, n: int, pos: np.ndarray, keys: np.ndarray,
                     doc_of: np.ndarray, total: np.ndarray) -> np.ndarray:
    """(documents,) share of word characters covered by n-grams, among those starting at
    `pos`, that occur twice or more in their document."""
    if not len(pos):
        return np.zeros(len(words))
    order, _, counts, _ = _runs(keys, doc_of[pos], len(words))
    repeated = pos[order[np.repeat(counts > 1, counts)]]  # n-grams occurring twice or more
    covered = np.zeros(len(words.ids), dtype=bool)
    for k in range(n):  # mark every word of each repeated n-gram
        covered[repeated + k] = True
    chars = np.bincount(doc_of[covered], weights=words.lengths[covered], minlength=len(words))
    return chars / total


def _repetition_failures(words: Words, cfg: FilterConfig) -> list[str | None]:
    """The Gopher repetition rules over a batch of documents at once: for each, the first of
    top_2gram .. top_4gram, dup_5gram .. dup_10gram it fails, or None."""
    top_limits = dict(zip((2, 3, 4), cfg.max_top_ngram_chars or ()))
    dup_limits = dict(zip(range(5, 11), cfg.max_dup_ngram_chars or ()))
    failures: list[str | None] = [None] * len(words)
    doc_of = words.doc_of()
    total = np.maximum(np.bincount(doc_of, weights=words.lengths, minlength=len(words)), 1)
    active = np.ones(len(words), dtype=bool)  # documents not yet decided
    for n, keys in ngram_keys(words.ids, max([*top_limits, *dup_limits], default=0)):
        if n not in top_limits and n not in dup_limits:
            continue
        pos = np.flatnonzero(inside(words, n) & active[doc_of[:len(keys)]])
        share_of = _top_ngram_share if n in top_limits else _dup_ngram_share
        share = share_of(words, n, pos, keys[pos], doc_of, total)
        limit = top_limits.get(n, dup_limits.get(n))
        for d in np.flatnonzero(active & (share > limit)).tolist():
            failures[d] = f"top_{n}gram" if n in top_limits else f"dup_{n}gram"
        active &= share <= limit
        if n in dup_limits:
            # Every word of a repeated longer n-gram lies in a repeated 5-gram, so the shares
            # only fall as n grows: below every remaining limit, no longer n can fail.
            active &= share > min(dup_limits.values())
        if not active.any():
            break
    return failures


def _simple_failure(text: str, words: list[str], cfg: FilterConfig) -> str | None:
    """The first of the filters other than the repetition rules that `text` fails."""
    if not text:
        return "empty"
    n = len(words)
    if cfg.min_words is not None and n < cfg.min_words:
        return "min_words"
    if cfg.max_words is not None and n > cfg.max_words:
        return "max_words"
    if n == 0:
        return "min_words"
    mean_len = sum(map(len, words)) / n
    if cfg.min_mean_word_length is not None and mean_len < cfg.min_mean_word_length:
        return "mean_word_length"
    if cfg.max_mean_word_length is not None and mean_len > cfg.max_mean_word_length:
        return "mean_word_length"
    if cfg.max_symbol_ratio is not None:
        symbols = text.count("#") + sum(text.count(e) for e in ELLIPSES)
        if symbols / n > cfg.max_symbol_ratio:
            return "symbol_ratio"
    # (map and filter with str methods: loops in C, several times faster than generators)
    lines = list(filter(str.strip, text.split("\n")))  # the non-blank ones
    if cfg.max_bullet_lines is not None and lines:
        bullets = sum(map(methodcaller("startswith", BULLETS), map(str.lstrip, lines)))
        if bullets / len(lines) > cfg.max_bullet_lines:
            return "bullet_lines"
    if cfg.max_ellipsis_lines is not None and lines:
        ellipses = sum(map(methodcaller("endswith", ELLIPSES), map(str.rstrip, lines)))
        if ellipses / len(lines) > cfg.max_ellipsis_lines:
            return "ellipsis_lines"
    if cfg.min_alpha_words is not None:
        # Words of letters only, bare or in punctuation, pass at C speed; the regex looks at
        # the rest (stripping punctuation removes no letter).
        others = list(filterfalse(str.isalpha, map(_STRIP_PUNCTUATION, filterfalse(
            str.isalpha, words))))
        alpha = n - len(others) + len(_ALPHA_WORD.findall(" ".join(others)))
        if alpha / n < cfg.min_alpha_words:
            return "alpha_words"
    if cfg.max_duplicate_line_chars is not None and lines:
        counts = Counter(lines)
        dup_chars = sum(len(ln) * c for ln, c in counts.items() if c > 1)
        if dup_chars / sum(map(len, lines)) > cfg.max_duplicate_line_chars:
            return "duplicate_lines"
    return None


def quality_failures(texts: list[str], cfg: FilterConfig, split: list[list[str]] | None = None,
                     words: Words | None = None) -> list[str | None]:
    """For each text, the name of the first filter it fails ("empty" for no text at all), or
    None if it passes them all. A caller that has them passes `split` ([t.split() for t in
    texts]) and `words` (`Words.of(texts)`)."""
    split = [t.split() for t in texts] if split is None else split
    failures = [_simple_failure(t, w, cfg) for t, w in zip(texts, split)]
    todo = np.array([i for i, f in enumerate(failures) if f is None], dtype=np.int64)
    if len(todo) and (cfg.max_top_ngram_chars or cfg.max_dup_ngram_chars):
        words = Words.of(texts, split) if words is None else words
        for i, failure in zip(todo.tolist(), _repetition_failures(words.select(todo), cfg)):
            failures[i] = failure
    return failures


def quality_failure(text: str, cfg: FilterConfig) -> str | None:
    """The first filter one text fails, or None."""
    return quality_failures([text], cfg)[0]


def filter_names(cfg: FilterConfig) -> list[str]:
    """Every name `quality_failure` can return for this config, for zeroed report tables."""
    names = ["empty", "min_words", "max_words", "mean_word_length", "symbol_ratio", "bullet_lines",
             "ellipsis_lines", "alpha_words", "duplicate_lines"]
    names += [f"top_{n}gram" for n in (2, 3, 4)[:len(cfg.max_top_ngram_chars or ())]]
    names += [f"dup_{n}gram" for n in range(5, 11)[:len(cfg.max_dup_ngram_chars or ())]]
    return names
