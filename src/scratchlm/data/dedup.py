"""Deduplication: exact (a hash of normalised text) and near (MinHash + LSH banding).

MinHash (Broder 1997): each document's set of word 5-gram shingles is summarised by its
minimum under `num_perm` random hash functions; two signatures agree in a position with
probability equal to the sets' Jaccard similarity. LSH banding splits the signature into `bands`
bands of `rows` values, and documents sharing any whole band become candidates; a candidate
pair is a duplicate when the share of agreeing signature positions reaches `threshold`. The
first document of a cluster (in input order) is kept, so the result is deterministic.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

import numpy as np

# Hash functions are multiply-add-shift (Dietzfelbinger et al. 1997): h(x) = ((a x + b) mod 2^64)
# >> 32 with a odd, for 32-bit x: a 2-universal family into 32 bits whose mod is the machine's
# own wrap-around, twice as fast in numpy as (a x + b) mod p for a prime p.
_SHIFT = np.uint64(32)
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


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(" ".join(text.lower().split()).encode(), digest_size=16).digest()


def permutations(cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of each of the num_perm hash functions: a odd, both uniform 64-bit."""
    rng = np.random.default_rng(cfg.seed)
    a = rng.integers(0, 2**64 - 1, size=cfg.num_perm, dtype=np.uint64, endpoint=True)
    b = rng.integers(0, 2**64 - 1, size=cfg.num_perm, dtype=np.uint64, endpoint=True)
    return a | np.uint64(1), b


def word_hashes(words: list[str]) -> np.ndarray:
    """A 32-bit hash (CRC-32) per lower-cased word, the same in every process and run."""
    return np.fromiter(map(zlib.crc32, map(str.encode, map(str.lower, words))),
                       dtype=np.uint64, count=len(words))


def shingle_hashes(text: str | np.ndarray, n: int) -> np.ndarray:
    """A 32-bit hash per word n-gram (all words if fewer than n) of a text, or of its words'
    `word_hashes` (which a caller that has them passes, to save the work)."""
    ids = word_hashes(text.split()) if isinstance(text, str) else text
    if not len(ids):
        return np.zeros(1, dtype=np.uint64)
    n = min(n, len(ids))
    keys = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            keys = keys * np.uint64(0x100000001B3) + ids[k:len(ids) - n + 1 + k]
    return (keys ^ (keys >> _SHIFT)) & np.uint64(0xFFFFFFFF)


def minhash(text: str | np.ndarray, cfg: DedupConfig,
            perms: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The MinHash signature, (num_perm,) uint32, of a text or of its words' `word_hashes`."""
    a, b = perms
    x = np.unique(shingle_hashes(text, cfg.shingle))  # a set: repeats do not matter
    sig = np.full(cfg.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
    for start in range(0, len(x), 4096):  # bounded (num_perm, 4096) temporaries
        h = a[:, None] * x[None, start:start + 4096]  # wraps around: mod 2^64
        h += b[:, None]
        h >>= _SHIFT
        np.minimum(sig, h.min(1), out=sig)
    return sig.astype(np.uint32)


def band_keys(sig: np.ndarray, bands: int) -> np.ndarray:
    """(bands,) uint64: a hash of each LSH band of a signature (of the low 16 bits of its
    values, all that `NearDuplicateIndex` keeps), its band number mixed in, never 0 (the empty
    slot of the index). The same in every process and run."""
    rows = sig.astype(np.uint16).astype(np.uint64).reshape(bands, -1)  # (bands, rows)
    powers = np.uint64(0x9E3779B97F4A7C15) ** np.arange(1, rows.shape[1] + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        keys = (rows * powers).sum(axis=1, dtype=np.uint64)
        keys += np.arange(bands, dtype=np.uint64) * np.uint64(0xD6E8FEB86659FD93)
    return keys | np.uint64(1)


class NearDuplicateIndex:
    """The signatures of kept documents and their band keys, compact because the index grows
    with every kept document (~450 bytes each, against ~2.5 KB in a plain dict of keys to
    signatures): each signature's low 16 bits (two different values then agree by chance 1 time
    in 65,536 per position, which moves an estimated similarity by ~1e-5), and the band keys in
    a sorted numpy array of (key, document) searched by bisection, with the newest keys in a
    small dict merged into it every `merge_every` keys (a log-structured merge)."""

    def __init__(self, cfg: DedupConfig, merge_every: int = 1 << 16) -> None:
        if cfg.num_perm % cfg.bands:
            raise ValueError(f"bands ({cfg.bands}) must divide num_perm ({cfg.num_perm})")
        self.cfg, self.merge_every = cfg, merge_every
        self.signatures = np.zeros((1024, cfg.num_perm), dtype=np.uint16)
        self.size = 0
        self.keys = np.zeros(0, dtype=np.uint64)  # sorted
        self.docs = np.zeros(0, dtype=np.int32)  # the document of each key
        self.recent: dict[int, int | list[int]] = {}
        self.n_recent = 0

    def find(self, sig: np.ndarray, keys: np.ndarray | None = None) -> int | None:
        """Index of a kept document this signature duplicates, else None. `keys` are its
        `band_keys`, when the caller has them."""
        keys = band_keys(sig, self.cfg.bands) if keys is None else keys
        candidates: set[int] = set()
        if len(self.keys):
            lo = np.searchsorted(self.keys, keys)
            for i in np.flatnonzero(self.keys[np.minimum(lo, len(self.keys) - 1)] == keys):
                hi = lo[i]  # the run of equal keys from lo[i] on: usually one
                while hi < len(self.keys) and self.keys[hi] == keys[i]:
                    hi += 1
                candidates.update(self.docs[lo[i]:hi].tolist())
        for key in keys.tolist():
            docs = self.recent.get(key)
            if docs is not None:
                candidates.update((docs,) if isinstance(docs, int) else docs)
        low = sig.astype(np.uint16)
        for other in sorted(candidates):
            if np.mean(self.signatures[other] == low) >= self.cfg.threshold:
                return other
        return None

    def add(self, sig: np.ndarray, keys: np.ndarray | None = None) -> int:
        doc = self.size
        if doc == len(self.signatures):
            self.signatures = np.concatenate([self.signatures, np.zeros_like(self.signatures)])
        self.signatures[doc] = sig.astype(np.uint16)
        self.size += 1
        keys = band_keys(sig, self.cfg.bands) if keys is None else keys
        for key in keys.tolist():
            docs = self.recent.get(key)
            if docs is None:
                self.recent[key] = doc
            elif isinstance(docs, int):
                self.recent[key] = [docs, doc]
            else:
                docs.append(doc)
        self.n_recent += len(keys)
        if self.n_recent >= self.merge_every:
            self._merge()
        return doc

    def _merge(self) -> None:
        """Move the recent keys into the sorted arrays."""
        pairs = [(k, d) for k, v in self.recent.items() for d in ((v,) if isinstance(v, int)
                                                                  else v)]
        keys = np.concatenate([self.keys, np.fromiter((k for k, _ in pairs), np.uint64,
                                                      len(pairs))])
        docs = np.concatenate([self.docs, np.fromiter((d for _, d in pairs), np.int32,
                                                      len(pairs))])
        order = np.argsort(keys, kind="stable")
        self.keys, self.docs = keys[order], docs[order]
        self.recent, self.n_recent = {}, 0

    def state(self) -> np.ndarray:
        """All kept signatures (low 16 bits), (n, num_perm): enough to rebuild the index on
        resume, with the band keys that came with them."""
        return self.signatures[:self.size]

    @classmethod
    def from_state(cls, cfg: DedupConfig, signatures: np.ndarray) -> NearDuplicateIndex:
        index = cls(cfg)
        for sig in signatures:
            index.add(sig)
        return index
