"""Text clean-up, and the quality filters FineWeb uses, as datatrove implements them.

Three filters, each rule by rule as in datatrove (`GopherRepetitionFilter`, `GopherQualityFilter`,
`C4QualityFilter`), word splitting included (scratchlm.data.words), with datatrove's defaults and
the name datatrove gives the rule a document fails ("top_2_gram", "gopher_short_doc",
"too_few_sentences", ...). The tests check every verdict and failing rule against datatrove on a
few thousand real and generated documents. A preset names the filters and their order (web:
FineWeb's; books: no C4 line rules). They run over a batch of documents at once: words hashed
through a per-process cache, n-gram counts by sorting numpy arrays, where datatrove joins and
counts strings in Python.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from dataclasses import dataclass
from functools import cache

import numpy as np
import regex

from scratchlm.data.config import (
    BOOKS,
    PRESETS,
    C4Config,
    FilterConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
)
from scratchlm.data.words import BASE, WordSplitter

# Control characters other than tab and newline, and the Unicode "format" characters that
# are invisible in text (zero-width spaces aside from the joiner that emoji need).
_CONTROL = regex.compile(r"[\p{Cc}--[\t\n]]|[\u200b\u200e\u200f\u2028\u2029\ufeff]",
                         flags=regex.V1)
_BLANKS = regex.compile(r"\n{3,}")


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


# ------------------------------------------------------------------------------------------------
# presets


# datatrove's defaults, the web preset's settings.
DATATROVE = {
    "gopher_repetition": GopherRepetitionConfig(
        dup_line_frac=0.3, dup_para_frac=0.3, dup_line_char_frac=0.2, dup_para_char_frac=0.2,
        top_n_grams=[0.2, 0.18, 0.16], dup_n_grams=[0.15, 0.14, 0.13, 0.12, 0.11, 0.10]),
    "gopher_quality": GopherQualityConfig(
        min_doc_words=50, max_doc_words=100_000, min_avg_word_length=3, max_avg_word_length=10,
        max_symbol_word_ratio=0.1, max_bullet_lines_ratio=0.9, max_ellipsis_lines_ratio=0.3,
        max_non_alpha_words_ratio=0.8, min_stop_words=2,
        stop_words=["the", "be", "to", "of", "and", "that", "have", "with"]),
    "c4": C4Config(
        remove_citations=True, filter_no_terminal_punct=True, min_num_sentences=5,
        min_words_per_line=3, max_word_length=1000, filter_lorem_ipsum=True,
        filter_javascript=True, filter_curly_bracket=True, filter_policy=True),
}


@dataclass(frozen=True)
class Filters:
    """A FilterConfig with its preset applied: every setting concrete."""

    preset: str
    steps: tuple[str, ...]
    words: str
    gopher_repetition: GopherRepetitionConfig
    gopher_quality: GopherQualityConfig
    c4: C4Config


def resolve(cfg: FilterConfig, builtin_only: bool = False) -> Filters:
    """The filters a config runs; `builtin_only`: the input is the built-in corpus alone (what
    preset "auto" looks at)."""
    preset = cfg.preset if cfg.preset != "auto" else ("books" if builtin_only else "web")
    sections = {}
    for name, defaults in DATATROVE.items():
        values = dataclasses.asdict(defaults)
        if preset == "books":
            values.update(BOOKS.get(name, {}))
        mine = dataclasses.asdict(getattr(cfg, name))
        values.update({k: v for k, v in mine.items() if v is not None})
        sections[name] = type(defaults)(**values)
    steps = tuple(cfg.steps) if cfg.steps is not None else PRESETS[preset]
    return Filters(preset, steps, cfg.words, **sections)


def rule_names(filters: Filters) -> list[str]:
    """Every rule name the filters can report, in the order they are tried (for report
    tables): "empty", then each step's."""
    names = ["empty"]
    for step in filters.steps:
        if step == "gopher_repetition":
            r = filters.gopher_repetition
            names += ["dup_para_frac", "dup_para_char_frac", "dup_line_frac",
                      "dup_line_char_frac"]
            names += [f"top_{n}_gram" for n in range(2, 2 + len(r.top_n_grams))]
            names += [f"duplicated_{n}_n_grams" for n in range(5, 5 + len(r.dup_n_grams))]
        elif step == "gopher_quality":
            names += ["gopher_short_doc", "gopher_long_doc", "gopher_below_avg_threshold",
                      "gopher_above_avg_threshold", "gopher_too_many_hashes",
                      "gopher_too_many_ellipsis", "gopher_too_many_bullets",
                      "gopher_too_many_end_ellipsis", "gopher_below_alpha_threshold",
                      "gopher_enough_stop_words"]
        else:
            names += ["lorem_ipsum", "curly_bracket", "too_few_sentences"]
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------------
# the filters over a batch


@dataclass
class Batch:
    """The words of a batch of texts: token ids into the splitter's table, concatenated."""

    texts: list[str]
    ids: np.ndarray  # (total,) int64
    bounds: np.ndarray  # (texts + 1,) int64

    def doc_of(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.texts)), np.diff(self.bounds))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (where datatrove would divide by zero, the rule passes)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def _ngram_keys(hashes: np.ndarray, powers: np.ndarray, up_to: int, sep: int | None):
    """(n, (positions,) uint64 hash of the string of the n words from each position) for
    n = 1 .. up_to: the words joined by chr(sep), or by nothing if sep is None (as datatrove
    joins them: "".join for duplicated n-grams, " ".join for the top ones). Arithmetic wraps
    around modulo 2^64, as the word hashes do."""
    keys = hashes
    with np.errstate(over="ignore"):
        for n in range(1, up_to + 1):
            if n > 1:
                prev = keys[:-1]
                if sep is not None:
                    prev = prev * np.uint64(BASE) + np.uint64(sep)
                keys = prev * powers[n - 1:] + hashes[n - 1:]
            yield n, keys


def _groups(doc: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group equal (doc, key) pairs: (an order that puts each group together; where each group
    starts in it; its size). One sort of the keys with the document mixed in (two pairs share
    a value by chance about once in 2^64 / pairs^2), several times faster than np.lexsort."""
    with np.errstate(over="ignore"):
        mixed = key ^ (doc.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    order = np.argsort(mixed)
    ordered = mixed[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = ordered[1:] != ordered[:-1]
    starts = np.flatnonzero(new)
    return order, starts, np.diff(np.append(starts, len(order)))


def _top_ngram_chars(pos: np.ndarray, key: np.ndarray, doc: np.ndarray, n: int,
                     cum: np.ndarray, n_docs: int) -> np.ndarray:
    """(n_docs,) characters of each document's most frequent n-gram times its count (Counter.
    most_common: among equally frequent ones, the first to occur); 0 without n-grams."""
    out = np.zeros(n_docs)
    if not len(pos):
        return out
    order, starts, counts = _groups(doc, key)
    first = np.minimum.reduceat(pos[order], starts)  # each group's first occurrence
    gdoc = doc[order[starts]]
    most = np.zeros(n_docs, dtype=np.int64)
    np.maximum.at(most, gdoc, counts)
    top = counts == most[gdoc]
    earliest = np.full(n_docs, np.iinfo(np.int64).max)
    np.minimum.at(earliest, gdoc[top], first[top])
    has = most > 0
    at = earliest[has]
    chars = cum[at + n] - cum[at] + (n - 1)  # its words and the spaces between
    out[has] = chars * most[has]
    return out


def _dup_ngram_chars(pos: np.ndarray, key: np.ndarray, doc: np.ndarray, n: int,
                     cum: np.ndarray, n_docs: int) -> np.ndarray:
    """(n_docs,) datatrove's find_all_duplicate: walking the n-grams in order, one equal to an
    n-gram met before counts its characters and the walk jumps past it. Only n-grams that
    occur twice or more can count or change what counts, so only they are walked."""
    out = np.zeros(n_docs)
    if not len(pos):
        return out
    order, starts, counts = _groups(doc, key)
    repeated = np.sort(order[np.repeat(counts > 1, counts)])  # indices, by position
    if not len(repeated):
        return out
    at = pos[repeated]
    chars = (cum[at + n] - cum[at]).tolist()
    seen: set[int] = set()
    current, skip_to = -1, -1
    for p, k, d, c in zip(at.tolist(), key[repeated].tolist(), doc[repeated].tolist(), chars):
        if d != current:
            current, skip_to = d, -1
            seen.clear()
        if p < skip_to:
            continue
        if k in seen:
            out[d] += c
            skip_to = p + n
        else:
            seen.add(k)
    return out


def _repeated(parts: list[str]) -> tuple[int, int]:
    """(elements equal to an earlier one, their characters), as datatrove's find_duplicates."""
    unique = set(parts)
    return len(parts) - len(unique), sum(map(len, parts)) - sum(map(len, unique))


_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile("\n+")


def _repetition_text(text: str, r: GopherRepetitionConfig) -> str | None:
    """The line and paragraph rules of GopherRepetitionFilter."""
    if not text:
        return "empty"
    paragraphs = _PARAGRAPHS.split(text.strip())
    dups, chars = _repeated(paragraphs)
    if r.dup_para_frac and dups / len(paragraphs) > r.dup_para_frac:
        return "dup_para_frac"
    if r.dup_para_char_frac and chars / len(text) > r.dup_para_char_frac:
        return "dup_para_char_frac"
    lines = _LINES.split(text)
    dups, chars = _repeated(lines)
    if r.dup_line_frac and dups / len(lines) > r.dup_line_frac:
        return "dup_line_frac"
    if r.dup_line_char_frac and chars / len(text) > r.dup_line_char_frac:
        return "dup_line_char_frac"
    return None


def gopher_repetition(batch: Batch, splitter: WordSplitter, r: GopherRepetitionConfig
                      ) -> list[str | None]:
    failures = [_repetition_text(t, r) for t in batch.texts]
    tops = dict(enumerate(r.top_n_grams or (), start=2))
    dups = dict(enumerate(r.dup_n_grams or (), start=5))
    if not (tops or dups) or not len(batch.ids):
        return failures
    table = splitter.table()
    n_docs = len(batch.texts)
    active = np.array([f is None for f in failures])
    length = np.array([len(t) for t in batch.texts], dtype=np.float64)
    doc_of = batch.doc_of()
    end = np.repeat(batch.bounds[1:], np.diff(batch.bounds))  # (total,) its document's end
    cum = np.concatenate(([0], np.cumsum(table.length[batch.ids])))
    hashes, powers = table.hashes[batch.ids], table.powers[batch.ids]
    spaced = dict(_ngram_keys(hashes, powers, max(tops, default=1), ord(" ")))
    for n, keys in _ngram_keys(hashes, powers, max([*tops, *dups]), None):
        if n not in tops and n not in dups:
            continue
        if n in tops:
            keys = spaced[n]
        pos = np.flatnonzero((np.arange(len(keys)) + n <= end[:len(keys)])
                             & active[doc_of[:len(keys)]])
        measure = _top_ngram_chars if n in tops else _dup_ngram_chars
        chars = measure(pos, keys[pos], doc_of[pos], n, cum, n_docs)
        frac = tops.get(n, dups.get(n))
        fail = active & (chars / np.maximum(length, 1) > frac)
        for d in np.flatnonzero(fail).tolist():
            failures[d] = f"top_{n}_gram" if n in tops else f"duplicated_{n}_n_grams"
        active &= ~fail
        if not active.any():
            break
    return failures


def gopher_quality(batch: Batch, splitter: WordSplitter, q: GopherQualityConfig
                   ) -> list[str | None]:
    table = splitter.table()
    n_docs = len(batch.texts)
    doc_of = batch.doc_of()
    ids = batch.ids
    n_words = np.diff(batch.bounds)
    wordlike = table.wordlike[ids]
    n_real = np.bincount(doc_of[wordlike], minlength=n_docs)
    real_chars = np.bincount(doc_of[wordlike], weights=table.length[ids][wordlike],
                             minlength=n_docs)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_len = real_chars / n_real  # nan without words, as np.mean([]): no rule fails
    alpha = _ratio(np.bincount(doc_of[table.alpha[ids]], minlength=n_docs), n_words)
    stop_ids = [splitter.ids[w] for w in q.stop_words or () if w in splitter.ids]
    present = np.isin(ids, stop_ids)
    # distinct stop words per document: distinct (document, id) pairs
    width = len(table.length) + 1
    pairs = np.unique(doc_of[present] * width + ids[present])
    n_stop = np.bincount(pairs // width, minlength=n_docs)
    failures: list[str | None] = []
    for d, text in enumerate(batch.texts):
        failures.append(_quality_rules(text, q, int(n_words[d]), int(n_real[d]), mean_len[d],
                                       alpha[d], int(n_stop[d])))
    return failures


def _quality_rules(text: str, q: GopherQualityConfig, n_words: int, n_real: int,
                   mean_len: float, alpha: float, n_stop: int) -> str | None:
    """GopherQualityFilter's rules, in its order, given one document's word counts."""
    if q.min_doc_words and n_real < q.min_doc_words:
        return "gopher_short_doc"
    if q.max_doc_words and n_real > q.max_doc_words:
        return "gopher_long_doc"
    if q.min_avg_word_length and mean_len < q.min_avg_word_length:
        return "gopher_below_avg_threshold"
    if q.max_avg_word_length and mean_len > q.max_avg_word_length:
        return "gopher_above_avg_threshold"
    if q.max_symbol_word_ratio and n_words:
        if text.count("#") / n_words > q.max_symbol_word_ratio:
            return "gopher_too_many_hashes"
        if (text.count("...") + text.count("…")) / n_words > q.max_symbol_word_ratio:
            return "gopher_too_many_ellipsis"
    lines = text.splitlines()
    if q.max_bullet_lines_ratio and lines:
        bullets = sum(1 for s in lines if s.lstrip().startswith(("•", "-")))
        if bullets / len(lines) > q.max_bullet_lines_ratio:
            return "gopher_too_many_bullets"
    if q.max_ellipsis_lines_ratio and lines:
        ending = sum(1 for s in lines if s.rstrip().endswith(("...", "…")))
        if ending / len(lines) > q.max_ellipsis_lines_ratio:
            return "gopher_too_many_end_ellipsis"
    if q.max_non_alpha_words_ratio and n_words and alpha < q.max_non_alpha_words_ratio:
        return "gopher_below_alpha_threshold"
    if q.min_stop_words and n_stop < q.min_stop_words:
        return "gopher_enough_stop_words"
    return None


_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_END_PUNCTUATION = (".", "?", "!", '"', "'")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
           "use cookies")


def c4(text: str, splitter: WordSplitter, c: C4Config) -> tuple[str | None, str]:
    """C4QualityFilter on one text: (the rule that drops it or None, the kept lines)."""
    sentences = 0
    kept = []
    for line in text.splitlines():
        line = line.strip()
        words = line.split()
        if c.max_word_length != -1 and max(map(len, words), default=0) > c.max_word_length:
            continue
        if c.remove_citations:
            line = _CITATION.sub("", line)
        if c.filter_no_terminal_punct and (not line.endswith(_END_PUNCTUATION)
                                           or line.endswith("...")):
            continue
        if len(words) < c.min_words_per_line:
            continue
        lower = line.lower()
        if c.filter_lorem_ipsum and "lorem ipsum" in lower:
            return "lorem_ipsum", text
        if c.filter_javascript and "javascript" in lower:
            continue
        if c.filter_curly_bracket and "{" in line:
            return "curly_bracket", text
        if c.filter_policy and any(p in lower for p in _POLICY):
            continue
        if c.min_num_sentences != -1:
            sentences += splitter.sentences(line)
        kept.append(line)
    if sentences < c.min_num_sentences:
        return "too_few_sentences", text
    return None, "\n".join(kept).strip()


class QualityFilters:
    """The configured filters, in order, over batches of texts. One per process: it keeps the
    word splitter's cache."""

    def __init__(self, cfg: FilterConfig, builtin_only: bool = False) -> None:
        self.filters = resolve(cfg, builtin_only)
        self.splitter = WordSplitter(self.filters.words) if self.filters.steps else None

    def names(self) -> list[str]:
        return rule_names(self.filters)

    def __call__(self, texts: list[str]) -> tuple[list[str | None], list[str]]:
        """(for each text the rule it fails or None, the texts as they go on: C4 keeps only
        some of a text's lines)."""
        texts = list(texts)
        failures: list[str | None] = ["empty" if not t else None for t in texts]
        f = self.filters
        if self.splitter is not None:
            self.splitter.start_batch()
        words: tuple[np.ndarray, np.ndarray] | None = None  # of all texts, split once
        for step in f.steps:
            todo = [i for i, x in enumerate(failures) if x is None]
            if not todo:
                break
            if step == "c4":
                results = [c4(texts[i], self.splitter, f.c4) for i in todo]
                for i, (failure, text) in zip(todo, results):
                    failures[i], texts[i] = failure, text
                words = None  # the texts changed
                continue
            if words is None:
                words = self.splitter.split(texts)
            ids, bounds = _select(*words, np.array(todo, dtype=np.int64))
            batch = Batch([texts[i] for i in todo], ids, bounds)
            run = gopher_repetition if step == "gopher_repetition" else gopher_quality
            section = f.gopher_repetition if step == "gopher_repetition" else f.gopher_quality
            for i, failure in zip(todo, run(batch, self.splitter, section)):
                failures[i] = failure
        return failures, texts


def _select(ids: np.ndarray, bounds: np.ndarray, docs: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """The words of some documents only, in the order given."""
    if len(docs) == len(bounds) - 1:
        return ids, bounds
    counts = np.diff(bounds)[docs]
    new_bounds = np.concatenate(([0], np.cumsum(counts)))
    # each selected document's range of positions, concatenated
    pos = np.repeat(bounds[docs] - new_bounds[:-1], counts) + np.arange(new_bounds[-1])
    return ids[pos], new_bounds


def quality_failures(texts: list[str], cfg: FilterConfig) -> list[str | None]:
    """For each text, the rule it fails or None (one-off use: a new word cache per call)."""
    return QualityFilters(cfg)(texts)[0]


def quality_failure(text: str, cfg: FilterConfig) -> str | None:
    """The rule one text fails, or None."""
    return quality_failures([text], cfg)[0]
