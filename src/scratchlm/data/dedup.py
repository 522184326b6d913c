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
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path

import numpy as np

from scratchlm.data.config import DedupConfig
from scratchlm.errors import ScratchError

_NGRAM = np.uint64(1_000_003)  # multiplier of the polynomial n-gram hash


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
    def of(cls, texts: list[str], split: list[list[str]] | None = None,
           normalized: bool = False) -> Words:
        """The words of `texts`; `split` is [t.split() for t in texts], if the caller has it.
        `normalized`: the texts' only whitespace is " " and newlines (as after clean-up)."""
        split = [t.split() for t in texts] if split is None else split
        counts = list(map(len, split))
        total = sum(counts)
        # Lower-casing changes no whitespace, so a text's words are its lower-cased words.
        if normalized:  # then bytes.split() splits where str.split() does: the whole batch
            lowered = "\n".join(texts).lower().encode("utf-8", "surrogatepass").split()
            assert len(lowered) == total, "Words.of: the texts hold other whitespace"
        else:
            lowered = map(partial(str.encode, encoding="utf-8", errors="surrogatepass"),
                          chain.from_iterable(t.lower().split() for t in texts))
        ids = np.fromiter(map(zlib.crc32, lowered), np.uint64, total)
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
    if (counts < n).any():  # rare (a filter usually drops such documents)
        return _shingles_one_by_one(words, n)
    *_, (_, keys) = ngram_keys(words.ids, n)
    keys = keys[inside(words, n)]
    folded = ((keys ^ (keys >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return folded, np.concatenate(([0], np.cumsum(counts - n + 1)))


def _shingles_one_by_one(words: Words, n: int) -> tuple[np.ndarray, np.ndarray]:
    """`shingles` document by document, a short one giving its words as one shingle."""
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
    a few sorted arrays ("runs") searched by bisection. A batch becomes a new run; two
    neighbouring runs merge when the older is at most twice the newer, so there are O(log n)
    runs and each key is copied O(log n) times (a log-structured merge). Runs of more than
    `in_memory` keys are merged chunk by chunk into files under `spill` and memory-mapped, so
    the memory a process allocates stays bounded however many keys there are (the kernel keeps
    the files' pages cached as memory allows)."""

    def __init__(self, spill: Path | None = None, in_memory: int = 1 << 18) -> None:
        """`spill`: a directory of the runs' own (emptied first); None keeps all in memory."""
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (keys sorted, values)
        self.spill, self.in_memory, self.files = spill, in_memory, 0
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)  # runs of an interrupted process
            spill.mkdir(parents=True)

    def __len__(self) -> int:
        return sum(len(k) for k, _ in self.runs)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every stored (key, value) whose key is among `keys`: (positions in `keys`,
        values)."""
        order = np.argsort(keys)  # numpy's bisection is several times faster on sorted keys
        ordered = keys[order]
        where, values = [], []
        for run, vals in self.runs:
            lo = np.searchsorted(run, ordered)
            for i in np.flatnonzero(run[np.minimum(lo, len(run) - 1)] == ordered).tolist():
                hi = lo[i]  # hits are rare, and a key usually occurs once in a run
                while hi < len(run) and run[hi] == ordered[i]:
                    where.append(int(order[i]))
                    values.append(int(vals[hi]))
                    hi += 1
        return np.array(where, dtype=np.int64), np.array(values, dtype=np.int64)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        order = np.argsort(keys)
        ordered = keys[order]
        found = np.zeros(len(keys), dtype=bool)
        for run, _ in self.runs:
            found[order] |= run[np.minimum(np.searchsorted(run, ordered), len(run) - 1)] == ordered
        return found

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        self.runs.append((keys[order], values[order].astype(np.int64)))
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            newer = self.runs.pop()
            self.runs[-1] = self._merge(self.runs[-1], newer)

    def _merge(self, older: tuple[np.ndarray, np.ndarray], newer: tuple[np.ndarray, np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray]:
        if self.spill is None or len(older[0]) + len(newer[0]) <= self.in_memory:
            return _merge(older, newer)
        (ka, va), (kb, vb) = older, newer
        stem = self.spill / f"run{self.files}"
        self.files += 1
        with open(f"{stem}.keys", "wb") as fk, open(f"{stem}.values", "wb") as fv:
            b = 0
            for a in range(0, len(ka), 1 << 16):  # a chunk of the older run at a time ...
                chunk = ka[a:a + (1 << 16)]
                # ... with the newer run's keys up to its last (all that are left at the end)
                end = len(kb) if a + len(chunk) == len(ka) else int(
                    np.searchsorted(kb, chunk[-1], "right"))
                keys, values = _merge((chunk, va[a:a + len(chunk)]), (kb[b:end], vb[b:end]))
                keys.tofile(fk)
                values.tofile(fv)
                b = end
        for run in (older, newer):
            if isinstance(run[0], np.memmap):
                os.unlink(run[0].filename)
                os.unlink(run[1].filename)
        return (np.memmap(f"{stem}.keys", np.uint64, "r"),
                np.memmap(f"{stem}.values", np.int64, "r"))


def _merge(older: tuple[np.ndarray, np.ndarray], newer: tuple[np.ndarray, np.ndarray]
           ) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted runs as one, in memory."""
    (ka, va), (kb, vb) = older, newer
    pos = np.searchsorted(ka, kb, "right") + np.arange(len(kb))  # kb's places in the result
    keys = np.empty(len(ka) + len(kb), dtype=np.uint64)
    values = np.empty(len(keys), dtype=np.int64)
    from_b = np.zeros(len(keys), dtype=bool)
    from_b[pos] = True
    keys[pos], values[pos] = kb, vb
    keys[~from_b], values[~from_b] = ka, va
    return keys, values


class _Log:
    """An append-only file of fixed-size records (what an index needs to rebuild itself when
    a run resumes): `keep` > 0 reopens one and drops what follows its first `keep` records."""

    def __init__(self, path: str | os.PathLike | None, dtype: np.dtype, width: int,
                 keep: int = 0) -> None:
        self.dtype, self.width = np.dtype(dtype), width
        self.row = self.dtype.itemsize * width
        if path is None:
            self.file = tempfile.TemporaryFile()
        else:
            self.file = open(path, "r+b" if keep else "w+b")
            if os.fstat(self.file.fileno()).st_size < keep * self.row:
                self.file.close()
                raise ScratchError(f"{path} holds fewer records than the saved progress says "
                                   "it should; delete the output directory to start over")
            self.file.truncate(keep * self.row)
        self.size = keep

    def chunks(self, rows: int = 1 << 14) -> Iterator[np.ndarray]:
        for lo in range(0, self.size, rows):
            n = min(rows, self.size - lo)
            yield np.frombuffer(os.pread(self.file.fileno(), n * self.row, lo * self.row),
                                self.dtype).reshape(n, self.width)

    def read(self, i: int) -> np.ndarray:
        return np.frombuffer(os.pread(self.file.fileno(), self.row, i * self.row), self.dtype)

    def append(self, rows: np.ndarray) -> None:
        self.file.seek(0, os.SEEK_END)
        self.file.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self.file.flush()
        self.size += len(rows)

    def sync(self) -> None:
        """Make the records durable (before a saved progress counts them)."""
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


class ExactIndex:
    """The exact-duplicate keys seen so far: (key, input document number) records in a log,
    and the keys in `SortedRuns` for lookups."""

    def __init__(self, path: str | os.PathLike | None = None, keep: int = 0,
                 spill: Path | None = None) -> None:
        self.log = _Log(path, np.uint64, 2, keep)
        self.keys = SortedRuns(spill)
        for rows in self.log.chunks():
            self.keys.add(rows[:, 0].copy(), rows[:, 1].astype(np.int64))

    @property
    def size(self) -> int:
        return self.log.size

    def dedup(self, keys: np.ndarray, numbers: np.ndarray) -> np.ndarray:
        """(batch,) bool: which of a batch of keys (of input documents `numbers`) were seen,
        before or earlier in the batch; adds the others."""
        first = np.zeros(len(keys), dtype=bool)
        first[np.unique(keys, return_index=True)[1]] = True
        seen = ~first | self.keys.contains(keys)
        self.keys.add(keys[~seen], numbers[~seen])
        self.log.append(np.stack([keys[~seen], numbers[~seen].astype(np.uint64)], axis=1))
        return seen

    def close(self) -> None:
        self.log.close()


class NearDuplicateIndex:
    """The kept documents' signatures and band keys. Signatures (their low 16 bits: two
    different values then agree by chance 1 time in 65,536 per position, which moves an
    estimated similarity by ~1e-5) go to a log file, read back only to confirm a candidate;
    band keys go to `SortedRuns` (`bands` a document)."""

    def __init__(self, cfg: DedupConfig, path: str | os.PathLike | None = None,
                 keep: int = 0, spill: Path | None = None) -> None:
        """Signatures go to `path` (an anonymous temporary file if None); keep > 0 reopens an
        existing file and rebuilds the index from its first `keep` signatures. Band keys
        beyond what memory holds go to files under `spill` (None: all in memory)."""
        if cfg.num_perm % cfg.bands:
            raise ValueError(f"bands ({cfg.bands}) must divide num_perm ({cfg.num_perm})")
        self.cfg = cfg
        self.log = _Log(path, np.uint16, cfg.num_perm, keep)
        self.bands = SortedRuns(spill)
        start = 0
        for sigs in self.log.chunks():
            self._add_keys(start, band_keys(sigs, cfg.bands))
            start += len(sigs)

    @property
    def size(self) -> int:
        return self.log.size

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
                other = sigs[mine[doc]] if doc in mine else self.log.read(doc)
                if np.mean(other == sigs[i]) >= self.cfg.threshold:
                    result[i] = doc
                    break
        kept = result < 0
        self._add_keys(self.size, keys[kept])
        self.log.append(sigs[kept])
        return result

    def _add_keys(self, start: int, keys: np.ndarray) -> None:
        """The band keys of documents start, start + 1, ..."""
        self.bands.add(keys.ravel(), np.repeat(np.arange(start, start + len(keys)),
                                               keys.shape[1]))

    def close(self) -> None:
        self.log.close()
