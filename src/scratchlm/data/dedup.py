"""Deduplication: exact (a hash of normalised text) and near (MinHash + LSH banding).

MinHash (Broder 1997): each document's set of word 5-gram shingles is summarised by its
minimum under `num_perm` random hash functions; two signatures agree in a position with
probability equal to the sets' Jaccard similarity. LSH banding splits the signature into `bands`
bands of `rows` values, and documents sharing any whole band become candidates; a candidate
pair is a duplicate when the share of agreeing signature positions reaches `threshold`. The
first document of a cluster (in input order) is kept, so the result is deterministic.

Everything here works on batches of documents at once (numpy over their words concatenated),
because per-document numpy calls on short documents cost more than the arithmetic they do.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain

import numpy as np

_NGRAM = np.uint64(1_000_003)  # multiplier of the polynomial n-gram hash


@dataclass
class DedupConfig:
    exact: bool = True
    """Drop documents whose normalised text (lower-cased, whitespace collapsed) was seen."""
    near: bool = True
    """Drop near-duplicates found by MinHash + LSH."""
    threshold: float = 0.8
    """Estimated Jaccard similarity of word shingles at which two documents are duplicates."""
    num_perm: int = 128
    """MinHash signature length."""
    bands: int = 16
    """LSH bands (num_perm / bands rows each): 16 x 8 makes pairs above ~0.7 candidates."""
    shingle: int = 5
    """Words per shingle."""
    seed: int = 0
    """Seed of the hash permutations (a run is deterministic for a given seed)."""


def exact_key(text: str) -> int:
    """64 bits of a hash of the text lower-cased with its whitespace collapsed."""
    digest = hashlib.blake2b(" ".join(text.lower().split()).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


# ------------------------------------------------------------------------------------------------
# words and their n-grams


@dataclass
class Words:
    """The words of a batch of documents, as the repetition filters and MinHash need them:
    a 32-bit hash (CRC-32, the same in every process and run) of each lower-cased word and its
    length in characters, all documents concatenated; document d's words are
    ids[bounds[d]:bounds[d + 1]]."""

    ids: np.ndarray  # (total,) uint64
    lengths: np.ndarray  # (total,) int64
    bounds: np.ndarray  # (documents + 1,) int64

    @classmethod
    def of(cls, texts: list[str], split: list[list[str]] | None = None) -> Words:
        """The words of `texts`; `split` is [t.split() for t in texts], if the caller has it."""
        split = [t.split() for t in texts] if split is None else split
        counts = list(map(len, split))
        total = sum(counts)
        # Lower-casing a text changes no whitespace, so its words are the lower-cased words.
        lowered = chain.from_iterable(t.lower().split() for t in texts)
        ids = np.fromiter(map(zlib.crc32, map(str.encode, lowered)), np.uint64, total)
        lengths = np.fromiter(map(len, chain.from_iterable(split)), np.int64, total)
        return cls(ids, lengths, np.concatenate(([0], np.cumsum(counts, dtype=np.int64))))

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def doc_of(self) -> np.ndarray:
        """(total,) the document of each word."""
        return np.repeat(np.arange(len(self)), np.diff(self.bounds))

    def select(self, docs: np.ndarray) -> Words:
        """The words of some documents only, in the order given."""
        counts = np.diff(self.bounds)[docs]
        # positions: each selected document's range, concatenated
        pos = np.repeat(self.bounds[docs] - np.cumsum(counts) + counts, counts) + np.arange(
            counts.sum())
        return Words(self.ids[pos], self.lengths[pos], np.concatenate(([0], np.cumsum(counts))))


def ngram_keys(ids: np.ndarray, up_to: int) -> Iterator[tuple[int, np.ndarray]]:
    """(n, a 64-bit key for the n-gram starting at each position) for n = 1, 2, ... up_to: a
    polynomial hash of the word ids that wraps around, each n's keys made from the last's in
    one step. Over concatenated documents, callers drop the n-grams that cross a boundary."""
    keys = ids
    for n in range(1, min(up_to, len(ids)) + 1):
        if n > 1:
            with np.errstate(over="ignore"):
                keys = keys[:-1] * _NGRAM + ids[n - 1:]
        yield n, keys


def inside(words: Words, n: int) -> np.ndarray:
    """(total - n + 1,) whether the n-gram starting at each position lies within a document."""
    ends = np.repeat(words.bounds[1:], np.diff(words.bounds))
    return np.arange(len(ends) - n + 1) + n <= ends[:len(ends) - n + 1]


def shingles(words: Words, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each document's word n-grams (all its words as one if it has fewer than n), hashed to
    32 bits: (shingles (total,) uint32, (documents + 1,) bounds)."""
    counts = np.diff(words.bounds)
    if (counts < 1).any():
        raise ValueError("a document without words has no shingles")
    short = np.flatnonzero(counts < n)
    if len(short):  # rare (a filter usually drops such documents): one shingle each
        return _shingles_with_short(words, n, short)
    *_, (_, keys) = ngram_keys(words.ids, n)
    keys = keys[inside(words, n)]
    folded = ((keys ^ (keys >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return folded, np.concatenate(([0], np.cumsum(counts - n + 1)))


def _shingles_with_short(words: Words, n: int, short: np.ndarray) -> tuple[np.ndarray,
                                                                           np.ndarray]:
    parts = []
    for d in range(len(words)):
        one = words.select(np.array([d]))
        parts.append(shingles(one, min(n, len(one.ids)))[0])
    return np.concatenate(parts), np.concatenate(([0], np.cumsum([len(p) for p in parts])))


# ------------------------------------------------------------------------------------------------
# MinHash and LSH


def permutations(cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of each of the num_perm hash functions h(x) = (a x + b) mod 2^32, a odd: a
    permutation of the 32-bit values. Shingle hashes are already well mixed, so these behave as
    random permutations for MinHash (the planted-duplicate test measures it), and 32-bit
    arithmetic is four times faster in numpy than 64-bit."""
    rng = np.random.default_rng(cfg.seed)
    a = rng.integers(0, 2**32, size=cfg.num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**32, size=cfg.num_perm, dtype=np.uint64)
    return a.astype(np.uint32), b.astype(np.uint32)


def minhash_batch(words: Words, cfg: DedupConfig,
                  perms: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(documents, num_perm) uint32 MinHash signatures of a batch of documents (each with at
    least one word). A multiset's minima are its set's, so repeated shingles need no removal."""
    a, b = perms
    x, bounds = shingles(words, cfg.shingle)
    sig = np.empty((len(words), cfg.num_perm), dtype=np.uint32)
    sig.fill(np.iinfo(np.uint32).max)
    step = 8192  # bounded (num_perm, step) temporaries
    for lo in range(0, len(x), step):
        hi = min(lo + step, len(x))
        h = a[:, None] * x[None, lo:hi]  # wraps around: mod 2^32
        h += b[:, None]
        # the documents with shingles in [lo, hi), and where each starts there
        first, last = np.searchsorted(bounds, lo, "right") - 1, np.searchsorted(bounds, hi)
        starts = np.maximum(bounds[first:last], lo) - lo
        mins = sig[first:last]  # a view
        np.minimum(mins, np.minimum.reduceat(h, starts, axis=1).T, out=mins)
    return sig


def minhash(text: str, cfg: DedupConfig, perms: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(num_perm,) uint32: the MinHash signature of one text."""
    return minhash_batch(Words.of([text]), cfg, perms)[0]


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """The hashed word n-grams of one text (what its MinHash signature summarises)."""
    return shingles(Words.of([text]), n)[0]


def band_keys(sigs: np.ndarray, bands: int) -> np.ndarray:
    """(documents, bands) uint64: a hash of each LSH band of each signature (of the low 16 bits
    of its values, all that `NearDuplicateIndex` keeps), its band number mixed in. The same in
    every process and run."""
    sigs = np.atleast_2d(sigs)
    rows = sigs.astype(np.uint16).astype(np.uint64).reshape(len(sigs), bands, -1)
    powers = np.uint64(0x9E3779B97F4A7C15) ** np.arange(1, rows.shape[2] + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        keys = (rows * powers).sum(axis=2, dtype=np.uint64)
        keys += np.arange(bands, dtype=np.uint64) * np.uint64(0xD6E8FEB86659FD93)
    return keys


# ------------------------------------------------------------------------------------------------
# the stateful side: sets of keys seen so far


class SortedRuns:
    """A growing multiset of uint64 keys, each with an int64 value, looked up a batch at a time:
    a few sorted numpy arrays ("runs") searched by bisection. A batch becomes a new run; two
    neighbouring runs merge when the older is at most twice the newer, so there are O(log n)
    runs and each key is copied O(log n) times (a log-structured merge). 16 bytes a key, against
    ~100 in a dict."""

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (keys sorted, values)

    def __len__(self) -> int:
        return sum(len(k) for k, _ in self.runs)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every stored (key, value) whose key is among `keys`: (positions in `keys`,
        values)."""
        where, values = [], []
        for run, vals in self.runs:
            lo = np.searchsorted(run, keys, "left")
            hi = np.searchsorted(run, keys, "right")
            hit = np.flatnonzero(hi > lo)
            for i in hit.tolist():  # hits are rare; a key usually occurs once
                where += [i] * int(hi[i] - lo[i])
                values += vals[lo[i]:hi[i]].tolist()
        return np.array(where, dtype=np.int64), np.array(values, dtype=np.int64)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        found = np.zeros(len(keys), dtype=bool)
        for run, _ in self.runs:
            pos = np.minimum(np.searchsorted(run, keys), len(run) - 1)
            found |= run[pos] == keys
        return found

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        self.runs.append((keys[order], values[order]))
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            newer = self.runs.pop()
            self.runs[-1] = _merge(self.runs[-1], newer)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.runs:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        return (np.concatenate([k for k, _ in self.runs]),
                np.concatenate([v for _, v in self.runs]))


def _merge(older: tuple[np.ndarray, np.ndarray], newer: tuple[np.ndarray, np.ndarray]
           ) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted runs as one; equal keys keep the older run's first (in insertion order)."""
    (ka, va), (kb, vb) = older, newer
    pos = np.searchsorted(ka, kb, "right") + np.arange(len(kb))  # kb's places in the result
    keys = np.empty(len(ka) + len(kb), dtype=ka.dtype)
    values = np.empty(len(keys), dtype=va.dtype)
    from_b = np.zeros(len(keys), dtype=bool)
    from_b[pos] = True
    keys[pos], values[pos] = kb, vb
    keys[~from_b], values[~from_b] = ka, va
    return keys, values


class NearDuplicateIndex:
    """The kept documents' signatures and band keys. Signatures (their low 16 bits: two
    different values then agree by chance 1 time in 65,536 per position, which moves an
    estimated similarity by ~1e-5) go to a file, read back only to confirm a candidate, so
    memory holds just the band keys (`SortedRuns`, 16 bytes each, `bands` a document)."""

    def __init__(self, cfg: DedupConfig, path: str | os.PathLike | None = None,
                 keep: int = 0) -> None:
        """Signatures go to `path` (an anonymous temporary file if None); keep > 0 reopens an
        existing file and rebuilds the index from its first `keep` signatures."""
        if cfg.num_perm % cfg.bands:
            raise ValueError(f"bands ({cfg.bands}) must divide num_perm ({cfg.num_perm})")
        self.cfg = cfg
        self.row = cfg.num_perm * 2  # bytes per stored signature
        if path is None:
            self.file = tempfile.TemporaryFile()
        else:
            self.file = open(path, "r+b" if keep else "w+b")
            self.file.truncate(keep * self.row)
        self.size = 0
        self.bands = SortedRuns()
        for lo in range(0, keep, 1 << 14):
            self.file.seek(lo * self.row)
            sigs = np.frombuffer(self.file.read(min(1 << 14, keep - lo) * self.row), np.uint16)
            self._append(sigs.reshape(-1, cfg.num_perm), write=False)
        self.file.seek(0, os.SEEK_END)

    def signature(self, doc: int) -> np.ndarray:
        return np.frombuffer(os.pread(self.file.fileno(), self.row, doc * self.row), np.uint16)

    def dedup(self, sigs: np.ndarray, keys: np.ndarray | None = None) -> np.ndarray:
        """Look up a batch of signatures in input order, each against the kept documents and the
        batch's earlier ones, and add those that are new. Returns (batch,) int64: the document a
        signature duplicates, or -1 for those now kept. `keys` are their `band_keys`, when the
        caller has them."""
        sigs = np.atleast_2d(sigs).astype(np.uint16)
        keys = band_keys(sigs, self.cfg.bands) if keys is None else keys
        m, bands = keys.shape
        candidates: dict[int, list[int]] = {}  # batch position -> kept documents
        where, docs = self.bands.find(keys.ravel())
        for i, d in zip((where // bands).tolist(), docs.tolist()):
            candidates.setdefault(i, []).append(d)
        # The batch against itself: equal keys between two of its signatures.
        flat = keys.ravel()
        order = np.argsort(flat, kind="stable")
        same = np.flatnonzero(flat[order[1:]] == flat[order[:-1]])
        earlier: dict[int, list[int]] = {}  # batch position -> earlier batch positions
        for s in same.tolist():
            first, later = order[s] // bands, order[s + 1] // bands
            if first != later:
                earlier.setdefault(int(later), []).append(int(first))
        result = np.full(m, -1, dtype=np.int64)
        for i in sorted(candidates.keys() | earlier.keys()):
            # Earlier kept batch documents get numbers self.size, self.size + 1, ... in order.
            kept_before = np.cumsum(result[:i] < 0) - 1 + self.size  # (i,) their numbers
            mine = {int(kept_before[j]): j for j in earlier.get(i, []) if result[j] < 0}
            for doc in sorted(set(candidates.get(i, [])) | mine.keys()):
                other = sigs[mine[doc]] if doc in mine else self.signature(doc)
                if np.mean(other == sigs[i]) >= self.cfg.threshold:
                    result[i] = doc
                    break
        kept = result < 0
        self._append(sigs[kept], keys[kept])
        return result

    def _append(self, sigs: np.ndarray, keys: np.ndarray | None = None,
                write: bool = True) -> None:
        keys = band_keys(sigs, self.cfg.bands) if keys is None else keys
        docs = np.repeat(np.arange(self.size, self.size + len(sigs)), keys.shape[1])
        self.bands.add(keys.ravel(), docs)
        if write:
            self.file.write(np.ascontiguousarray(sigs, dtype=np.uint16).tobytes())
            self.file.flush()
        self.size += len(sigs)

    def close(self) -> None:
        self.file.close()

