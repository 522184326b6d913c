"""Text clean-up and heuristic quality filters of the kind used for C4, Gopher and FineWeb.

Each filter is a named threshold in `FilterConfig` (None switches it off); `quality_failure`
returns the name of the first filter a document fails, so a run can report how many documents
and bytes each one removed. Thresholds follow Gopher (Rae et al. 2021, appendix A) except where
a comment says why not.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from itertools import filterfalse

import numpy as np
import regex

from scratchlm.data.dedup import word_hashes

BULLETS = ("•", "·", "-", "*", "‣", "◦", "–")
ELLIPSES = ("...", "…")
# Control characters other than tab and newline, and the Unicode "format" characters that
# are invisible in text (zero-width spaces aside from the joiner that emoji need).
_CONTROL = regex.compile(r"[\p{Cc}--[\t\n]]|[\u200b\u200e\u200f\u2028\u2029\ufeff]",
                         flags=regex.V1)
_BLANKS = regex.compile(r"\n{3,}")
_ALPHA_WORD = regex.compile(r"\S*\p{L}\S*")


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
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    # str.split() splits on runs of any whitespace: per line, that collapses and strips them.
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


def _ngram_keys(ids: np.ndarray, up_to: int) -> Iterator[tuple[int, np.ndarray]]:
    """(n, a 64-bit key per word n-gram) for n = 1, 2, ... up_to: a polynomial hash of the word
    ids that wraps around, each n's keys made from the last's in one step."""
    keys = ids
    for n in range(1, min(up_to, len(ids)) + 1):
        if n > 1:
            with np.errstate(over="ignore"):
                keys = keys[:-1] * np.uint64(1_000_003) + ids[n - 1:]
        yield n, keys


def _run_lengths(ordered: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each run of equal values in a sorted array starts, and how long it is."""
    starts = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    edges = np.concatenate(([0], starts, [len(ordered)]))
    return edges[:-1], edges[1:] - edges[:-1]


def _ngram_failure(words: list[str], ids: np.ndarray, cfg: FilterConfig) -> str | None:
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    total = lengths.sum()
    top_limits = dict(zip((2, 3, 4), cfg.max_top_ngram_chars or ()))
    dup_limits = dict(zip(range(5, 11), cfg.max_dup_ngram_chars or ()))
    for n, keys in _ngram_keys(ids, max([*top_limits, *dup_limits], default=0)):
        if n in top_limits:
            ordered = np.sort(keys)
            run_starts, counts = _run_lengths(ordered)
            top = counts.argmax()
            if counts[top] > 1:
                first = int(np.argmax(keys == ordered[run_starts[top]]))  # one occurrence
                if lengths[first:first + n].sum() * counts[top] / total > top_limits[n]:
                    return f"top_{n}gram"
        elif n in dup_limits:
            order = np.argsort(keys)
            same = keys[order[1:]] == keys[order[:-1]]  # equal neighbours in sorted order
            repeated = np.zeros(len(keys), dtype=bool)
            repeated[1:] |= same
            repeated[:-1] |= same
            starts = order[repeated]  # n-grams that occur twice or more
            covered = np.zeros(len(words), dtype=bool)
            for k in range(n):  # mark every word of each repeated n-gram
                covered[starts + k] = True
            share = lengths[covered].sum() / total
            if share > dup_limits[n]:
                return f"dup_{n}gram"
            # Every word of a repeated longer n-gram lies in a repeated 5-gram, so the shares
            # only fall as n grows: below every remaining limit, no longer n can fail.
            if share <= min(dup_limits.values()):
                return None
    return None


def quality_failure(text: str, cfg: FilterConfig, words: list[str] | None = None,
                    ids: np.ndarray | None = None) -> str | None:
    """The name of the first quality filter `text` fails, or None if it passes them all.
    `words` (text.split()) and `ids` (their `word_hashes`: repetition is counted over
    lower-cased words) may be passed by a caller that needs them too."""
    words = text.split() if words is None else words
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
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if cfg.max_bullet_lines is not None and lines:
        bullets = sum(ln.lstrip().startswith(BULLETS) for ln in lines)
        if bullets / len(lines) > cfg.max_bullet_lines:
            return "bullet_lines"
    if cfg.max_ellipsis_lines is not None and lines:
        ellipses = sum(ln.rstrip().endswith(ELLIPSES) for ln in lines)
        if ellipses / len(lines) > cfg.max_ellipsis_lines:
            return "ellipsis_lines"
    if cfg.min_alpha_words is not None:
        # Words of letters only pass at C speed; the regex looks at the rest.
        others = list(filterfalse(str.isalpha, words))
        alpha = n - len(others) + len(_ALPHA_WORD.findall(" ".join(others)))
        if alpha / n < cfg.min_alpha_words:
            return "alpha_words"
    if cfg.max_duplicate_line_chars is not None and lines:
        counts = Counter(lines)
        dup_chars = sum(len(ln) * c for ln, c in counts.items() if c > 1)
        if dup_chars / sum(map(len, lines)) > cfg.max_duplicate_line_chars:
            return "duplicate_lines"
    return _ngram_failure(words, word_hashes(words) if ids is None else ids, cfg)


def filter_names(cfg: FilterConfig) -> list[str]:
    """Every name `quality_failure` can return for this config, for zeroed report tables."""
    names = ["min_words", "max_words", "mean_word_length", "symbol_ratio", "bullet_lines",
             "ellipsis_lines", "alpha_words", "duplicate_lines"]
    names += [f"top_{n}gram" for n in (2, 3, 4)[:len(cfg.max_top_ngram_chars or ())]]
    names += [f"dup_{n}gram" for n in range(5, 11)[:len(cfg.max_dup_ngram_chars or ())]]
    return names
