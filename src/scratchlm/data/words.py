"""Words as datatrove's English filters see them, fast.

datatrove's Gopher filters split a text into words with spaCy's blank English tokenizer (and its
C4 filter counts sentences with spaCy's sentencizer), then strip the tokens and drop the empty
ones. spaCy splits a text at whitespace first and tokenizes each whitespace-free chunk on its own
(prefixes, suffixes, infixes, special cases such as "don't" -> "do", "n't"), so a text's words
are its chunks' words concatenated. `WordSplitter` runs spaCy's algorithm on each distinct chunk
once per process, with spaCy's own patterns and special cases (read from spaCy at run time,
never copied), and caches the answer; real text repeats its chunks (Zipf), so everything after
that is dict lookups and numpy over token ids. The tests check the words against spaCy on every
distinct chunk of the corpora and against `datatrove.utils.text.split_into_words`.

`words="whitespace"` splits at whitespace only (no spaCy), each chunk one word: cheaper, and
punctuation stays attached to its word."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import sys
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import regex

from scratchlm.errors import ScratchError
from scratchlm.utils import atomic_write_text

# The characters datatrove's Gopher quality filter treats as symbols: a word made only of these
# is not counted as a word (datatrove.utils.text.PUNCTUATION_SET). ASCII punctuation and a few
# typographic and CJK marks, the C0 and C1 controls except tab and newline, and the sentence
# terminators of every script: Unicode's Sentence_Terminal property, which datatrove lists by
# hand as of an older Unicode version, plus three Khmer signs. The test compares the sets.
_MARKS = ("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
          "«´»–—’“”„…∶━►、。〈〉《》「」【】！％（），．１：；？～")
_CONTROLS = "".join(map(chr, [*range(0, 9), 11, 12, *range(13, 32), *range(127, 160)]))
_TERMINAL_EXTRA = "\u17d6\u17d9\u17da"
_TERMINAL_NEWER = ("\u1b4e\u1b4f\u1b7f\u2024\u2cf9\u2cfa\u2cfb\u2e60\u2e61\ufe12\ufe15\ufe16"
                   "\U000113d4\U000113d5\U00016d6e\U00016d6f")


def _terminal_punctuation() -> frozenset[str]:
    every = np.arange(sys.maxunicode + 1, dtype="<u4").tobytes().decode("utf-32-le",
                                                                       "surrogatepass")
    found = set(regex.findall(r"\p{Sentence_Terminal}", every))
    return frozenset((found | set(_TERMINAL_EXTRA)) - set(_TERMINAL_NEWER))


SYMBOLS = frozenset(_MARKS + _CONTROLS) | _terminal_punctuation()

# A polynomial string hash modulo 2^64 with an odd base: a word's hash h and B^len let the hash
# of any concatenation of words be built from its parts' (h(a + b) = h(a) * B^len(b) + h(b)),
# which is what the repetition rules count ("".join of words) and compare.
BASE = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1

# Sentencizer classes of a token: what spaCy's sentencizer does when it reaches one.
ENDS = 0  # one of its punctuation characters: the sentence may end after it
SILENT = 1  # other punctuation: no effect
OPENS = 2  # anything else: starts a sentence if one may end before it


_WHITESPACE = (OPENS, OPENS, 0)  # a whitespace token: not punctuation


def _space_tokens(line: str) -> list[str]:
    """A line's chunks, and its whitespace runs that spaCy makes tokens of: a run after a chunk
    loses its first character if that is a space (it belongs to the chunk)."""
    out = []
    for part in regex.split(r"(\s+)", line):
        if part and part.isspace() and out and part[0] == " ":
            part = part[1:]
        if part:
            out.append(part)
    return out


def _string_hash(s: str) -> tuple[int, int]:
    """(h, B^len) of one string, modulo 2^64."""
    h = 0
    for ch in s:
        h = (h * BASE + ord(ch)) & _MASK
    return h, pow(BASE, len(s), 1 << 64)


@dataclass
class TokenTable:
    """Per distinct token (WordSplitter.strings): what the filters ask about it."""

    length: np.ndarray  # (tokens,) int64, characters
    wordlike: np.ndarray  # (tokens,) bool: has a character that is not a symbol
    alpha: np.ndarray  # (tokens,) bool: has a letter
    hashes: np.ndarray  # (tokens,) uint64 string hashes
    powers: np.ndarray  # (tokens,) uint64 B^len


@dataclass(frozen=True)
class SpacyRules:
    """What spaCy's blank English pipeline splits words and sentences with: its compiled
    prefix, suffix, infix and URL patterns, its special cases (chunk -> tokens) and its
    sentencizer's punctuation. Importing spaCy costs seconds (it imports thinc and torch), so
    they are read from spaCy once per spaCy version and kept as JSON in the user's cache
    directory; they pickle, so worker processes are handed them."""

    prefix: Callable
    suffix: Callable
    infixes: Callable
    url: Callable
    token_match: Callable | None
    specials: dict[str, tuple[str, ...]]
    ends: frozenset[str]


_SPACY: list[SpacyRules] = []


def _rules_cache() -> Path | None:
    """Where this spaCy version's rules are kept as JSON, so that later runs need not import
    spaCy (None without spaCy)."""
    try:
        version = importlib.metadata.version("spacy")
    except importlib.metadata.PackageNotFoundError:
        return None
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "scratchlm" / f"spacy-{version}-en-rules.json"


def _read_spacy() -> dict:
    """The rules from spaCy itself, as plain data (patterns as their source and flags)."""
    try:
        import spacy
        from spacy.pipeline import Sentencizer
    except ImportError:
        raise ScratchError("datatrove-style word splitting needs spaCy: pip install spacy "
                           "(or set data.filters.words=whitespace)") from None
    t = spacy.blank("en").tokenizer
    orth = 65  # spaCy's attribute id of a token's text
    if t.token_match is not None:
        raise ScratchError("this spaCy's English tokenizer has a token_match rule, which "
                           "scratchlm does not follow; pin spacy<4 or use words=whitespace")

    def source(method: Callable) -> list:
        return [method.__self__.pattern, method.__self__.flags]

    return {"prefix": source(t.prefix_search), "suffix": source(t.suffix_search),
            "infixes": source(t.infix_finditer), "url": source(t.url_match),
            "specials": {k: [a[orth] for a in v] for k, v in t.rules.items()},
            "ends": sorted(Sentencizer.default_punct_chars)}


def spacy_rules() -> SpacyRules:
    """This process's SpacyRules: handed over (`use_spacy_rules`), cached on disk for this
    spaCy version, or read from spaCy (and cached)."""
    if not _SPACY:
        cache = _rules_cache()
        data = None
        if cache is not None and cache.is_file():
            try:
                data = json.loads(cache.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = None  # unreadable: read spaCy again
        if data is None:
            data = _read_spacy()
            if cache is not None:
                try:
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(cache, json.dumps(data))
                except OSError:
                    pass  # a read-only home: read spaCy again next time
        compiled = {k: re.compile(*data[k]) for k in ("prefix", "suffix", "infixes", "url")}
        _SPACY.append(SpacyRules(
            compiled["prefix"].search, compiled["suffix"].search, compiled["infixes"].finditer,
            compiled["url"].match, None, {k: tuple(v) for k, v in data["specials"].items()},
            frozenset(data["ends"])))
    return _SPACY[0]


def use_spacy_rules(rules: SpacyRules) -> None:
    """Adopt rules read in another process (a worker is handed its parent's)."""
    _SPACY[:] = [rules]


class WordSplitter:
    """Text -> token ids (into `table()`), datatrove's words in order; `mode` "spacy" (datatrove's
    splitting) or "whitespace". Caches every chunk it has seen, up to `max_chunks` (then starts
    over, between calls)."""

    def __init__(self, mode: str = "spacy", max_chunks: int = 2_000_000) -> None:
        if mode not in ("spacy", "whitespace"):
            raise ScratchError(f"data.filters.words must be 'spacy' or 'whitespace', got {mode!r}")
        self.mode, self.max_chunks = mode, max_chunks
        self._rules: dict[str, tuple[str, ...]] = {}
        self._ends: frozenset[str] = frozenset()
        if mode == "spacy":
            self._load_spacy()
        self._reset()

    def _load_spacy(self) -> None:
        rules = spacy_rules()
        self._prefix, self._suffix, self._infixes = rules.prefix, rules.suffix, rules.infixes
        self._url, self._token_match = rules.url, rules.token_match
        self._rules, self._ends = rules.specials, rules.ends
        # After splitting, spaCy's tokenizer looks again for the special cases that its
        # patterns would split (":" ")" -> ":)"; not "cannot" -> "can" "not"): the pieces each
        # splits into, by their first piece.
        self._respecial: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        for k, v in self._rules.items():
            pieces = self._affixes(k, {})
            if (self._prefix(k) or self._suffix(k) or any(self._infixes(k))) and pieces != v:
                self._respecial.setdefault(pieces[0], []).append((pieces, k))

    def _rejoin(self, words: tuple[str, ...]) -> tuple[str, ...]:
        """spaCy's second look for special cases (Tokenizer._apply_special_cases): runs of
        pieces that spell a special case become its tokens, longer runs first, then earlier
        ones, never overlapping."""
        found = [(len(pieces), i, key) for i, w in enumerate(words)
                 for pieces, key in self._respecial.get(w, ())
                 if words[i:i + len(pieces)] == pieces]
        if not found:
            return words
        taken: set[int] = set()
        chosen = []
        for n, i, key in sorted(found, key=lambda m: (-m[0], m[1])):
            if i not in taken and i + n - 1 not in taken:
                chosen.append((i, n, key))
            taken.update(range(i, i + n))
        out: list[str] = []
        at = 0
        for i, n, key in sorted(chosen):
            out += words[at:i]
            out += self._rules[key]
            at = i + n
        return (*out, *words[at:])

    def _affixes(self, chunk: str, rules: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
        """spaCy's tokenizer on one whitespace-free chunk (Tokenizer._split_affixes and
        _attach_tokens), with its prefix, suffix and infix patterns and special cases `rules`."""
        s, prefixes, suffixes, last = chunk, [], [], 0
        while s and len(s) != last:
            if (self._token_match and self._token_match(s)) or s in rules:
                break
            last = len(s)
            m = self._prefix(s)
            pre = m.end() - m.start() if m else 0
            if pre and s[pre:] in rules:
                prefixes.append(s[:pre])
                s = s[pre:]
                break
            m = self._suffix(s[pre:])
            suf = m.end() - m.start() if m else 0
            if suf and s[:-suf] in rules:
                suffixes.append(s[-suf:])
                s = s[:-suf]
                break
            if pre and suf and pre + suf <= len(s):
                prefixes.append(s[:pre])
                suffixes.append(s[-suf:])
                s = s[pre:-suf]
            elif pre:
                prefixes.append(s[:pre])
                s = s[pre:]
            elif suf:
                suffixes.append(s[-suf:])
                s = s[:-suf]
        middle: list[str] = []
        if s in rules:
            middle = list(rules[s])
        elif s and ((self._token_match and self._token_match(s)) or self._url(s)):
            middle = [s]
        elif s:
            start = 0
            for m in self._infixes(s):
                if m.start() == 0:  # an infix at the very start splits nothing
                    continue
                if m.start() != start:
                    middle.append(s[start:m.start()])
                if m.start() != m.end():
                    middle.append(s[m.start():m.end()])
                start = m.end()
            if s[start:]:
                middle.append(s[start:])
        return (*prefixes, *middle, *reversed(suffixes))

    def _reset(self) -> None:
        self.chunks: dict[str, int] = {}  # chunk -> its number
        # chunk k's token ids are _flat[_start[k]:_start[k] + _length[k]]
        self._flat: list[int] = []
        self._start: list[int] = []
        self._length: list[int] = []
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.ids: dict[str, int] = {}
        self.summaries: dict[str, tuple[int, int, int]] = {}
        self.strings: list[str] = []
        self._classes: list[int] = []
        self._attrs: list[tuple] = []
        self._table: TokenTable | None = None

    def _token_id(self, token: str) -> int:
        i = self.ids.get(token)
        if i is None:
            i = self.ids[token] = len(self.strings)
            self.strings.append(token)
            h, power = _string_hash(token)
            if token in self._ends or (self.mode == "whitespace" and token[-1] in ".!?"):
                cls = ENDS
            elif all(unicodedata.category(c).startswith("P") for c in token):
                cls = SILENT
            else:
                cls = OPENS
            self._classes.append(cls)
            self._attrs.append((len(token), not SYMBOLS.issuperset(token),
                                any(c.isalpha() for c in token), h, power))
        return i

    def _split_chunks(self, chunks: Iterable[str]) -> None:
        """Add the words of new chunks to the cache."""
        todo = [c for c in chunks if c not in self.chunks]
        if not todo:
            return
        if self.mode == "whitespace":
            for c in todo:
                self._add_chunk(c, (c,))
            return
        for c in todo:
            self._add_chunk(c, self._spacy_words(c))

    def _spacy_words(self, chunk: str) -> tuple[str, ...]:
        rules = self._rules
        if chunk in rules:
            return rules[chunk]
        if chunk.isascii():
            # The commonest chunks, a word or a word and a comma or full stop, without the
            # regexes (the tests check them against spaCy): no affix or infix pattern splits
            # ASCII letters, and a "," ";" ":" "!" "?" after them, or a "." after a lower-case
            # letter, is a suffix.
            if chunk.isalpha():
                return (chunk,)
            word, last = chunk[:-1], chunk[-1]
            if word.isalpha() and word not in rules and (
                    last in ",;:!?" or (last == "." and word[-1].islower())):
                return word, last
        return self._rejoin(self._affixes(chunk, rules))

    def _add_chunk(self, chunk: str, words: Iterable[str]) -> None:
        ids = [self._token_id(w) for w in words]
        self.chunks[chunk] = len(self._start)
        self._start.append(len(self._flat))
        self._length.append(len(ids))
        self._flat += ids
        # The chunk's sentencizer classes summarised: (first, last) other than SILENT (SILENT
        # if none) and how many sentences start inside it.
        if len(ids) == 1:  # most chunks are one word: no sentence can start inside
            cls = self._classes[ids[0]]
            self.summaries[chunk] = (cls, cls, 0)
            return
        classes = [self._classes[i] for i in ids if self._classes[i] != SILENT]
        starts = sum(a == ENDS and b == OPENS for a, b in zip(classes, classes[1:]))
        self.summaries[chunk] = (classes[0], classes[-1], starts) if classes else (
            SILENT, SILENT, 0)

    def start_batch(self) -> None:
        """Forget the cache if it has grown past max_chunks (ids of earlier batches go stale),
        """
        if len(self.chunks) > self.max_chunks:
            self._reset()

    def split(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(token ids of all texts concatenated (total,) int64, (texts + 1,) bounds)."""
        split = [t.split() for t in texts]
        flat = list(chain.from_iterable(split))
        self._split_chunks(set(flat).difference(self.chunks))
        tokens, start, length = self._chunk_arrays()
        chunk = np.fromiter(map(self.chunks.__getitem__, flat), np.int64, len(flat))
        lengths = length[chunk]
        ends = np.concatenate(([0], np.cumsum(lengths)))  # (chunks + 1,)
        # each chunk's run of token ids, concatenated
        ids = tokens[np.repeat(start[chunk] - ends[:-1], lengths) + np.arange(ends[-1])]
        chunk_bounds = np.concatenate(([0], np.cumsum(list(map(len, split)), dtype=np.int64)))
        return ids, ends[chunk_bounds]

    def _chunk_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(_flat, _start, _length) as arrays, extended by what was added since last time."""
        if self._arrays is None or len(self._arrays[1]) != len(self._start):
            old = self._arrays or (np.zeros(0, np.int64),) * 3
            self._arrays = tuple(
                np.concatenate((o, np.array(new[len(o):], dtype=np.int64)))
                for o, new in zip(old, (self._flat, self._start, self._length)))
        return self._arrays

    def words(self, text: str) -> list[str]:
        """One text's words as strings (what datatrove's split_into_words returns)."""
        ids, _ = self.split([text])
        return [self.strings[i] for i in ids.tolist()]

    def sentences(self, line: str) -> int:
        """How many sentences spaCy's sentencizer finds in a line (datatrove's
        split_into_sentences): one, plus one for each token that is not punctuation and follows
        one of the sentencizer's punctuation characters with only other punctuation between.
        A run of whitespace other than one space after a token is a token of its own."""
        chunks = line.split()
        self._split_chunks(chunks)
        if " ".join(chunks) == line:  # the usual case: single spaces only
            parts = map(self.summaries.__getitem__, chunks)
        else:
            parts = (_WHITESPACE if p.isspace() else self.summaries[p]
                     for p in _space_tokens(line))
        count, last = 1, SILENT
        for first, final, inside in parts:
            count += inside + (last == ENDS and first == OPENS)
            if final != SILENT:
                last = final
        return count

    def table(self) -> TokenTable:
        """The token attributes as arrays, extended by the tokens added since last time."""
        old = self._table
        done = len(old.length) if old is not None else 0
        if old is None or done != len(self.strings):
            new = self._attrs[done:]
            cols = list(zip(*new)) if new else [()] * 5
            tail = TokenTable(
                length=np.array(cols[0], dtype=np.int64),
                wordlike=np.array(cols[1], dtype=bool),
                alpha=np.array(cols[2], dtype=bool),
                hashes=np.array(cols[3], dtype=np.uint64),
                powers=np.array(cols[4], dtype=np.uint64))
            if old is not None:
                tail = TokenTable(*(np.concatenate((a, b)) for a, b in
                                    zip(dataclasses.astuple(old), dataclasses.astuple(tail))))
            self._table = tail
        return self._table
