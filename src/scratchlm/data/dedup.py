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

# Permutations are h(x) = (a x + b) mod p with a, b uniform below p: a universal family only if
# a ranges over all of [1, p). p just below 2^32 keeps a * x + b below 2^64 (no overflow).
_PRIME = np.uint64(4_294_967_291)  # the largest prime below 2^32


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
    rng = np.random.default_rng(cfg.seed)
    a = rng.integers(1, int(_PRIME), size=cfg.num_perm, dtype=np.uint64)
    b = rng.integers(0, int(_PRIME), size=cfg.num_perm, dtype=np.uint64)
    return a, b


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """A 32-bit hash per word n-gram of the lower-cased text (all words if fewer than n)."""
    words = [zlib.crc32(w.encode()) for w in text.lower().split()]
    if not words:
        return np.zeros(1, dtype=np.uint64)
    ids = np.array(words, dtype=np.uint64)
    n = min(n, len(ids))
    keys = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            keys = keys * np.uint64(0x100000001B3) + ids[k:len(ids) - n + 1 + k]
    return (keys ^ (keys >> np.uint64(32))) & np.uint64(0xFFFFFFFF)


def minhash(text: str, cfg: DedupConfig, perms: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The MinHash signature, (num_perm,) uint32."""
    a, b = perms
    x = np.unique(shingle_hashes(text, cfg.shingle)) % _PRIME  # a set: repeats do not matter
    sig = np.full(cfg.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
    for start in range(0, len(x), 4096):  # bounded (num_perm, 4096) temporaries
        chunk = x[start:start + 4096]
        sig = np.minimum(sig, ((a[:, None] * chunk[None, :] + b[:, None]) % _PRIME).min(1))
    return sig.astype(np.uint32)


class NearDuplicateIndex:
    """The signatures of kept documents, bucketed by band. Kept compact, since it grows with
    every kept document: signatures in one growing array, and each band's contents hashed to
    a Python int (salted per process, which is fine: the index is rebuilt from the signatures
    on resume) mapping to a document, or to a list of them when several share it."""

    def __init__(self, cfg: DedupConfig) -> None:
        if cfg.num_perm % cfg.bands:
            raise ValueError(f"bands ({cfg.bands}) must divide num_perm ({cfg.num_perm})")
        self.cfg = cfg
        self.rows = cfg.num_perm // cfg.bands
        self.buckets: dict[int, int | list[int]] = {}
        self.signatures = np.zeros((1024, cfg.num_perm), dtype=np.uint32)
        self.size = 0

    def _keys(self, sig: np.ndarray) -> list[int]:
        r = self.rows
        return [hash((band, sig[band * r:(band + 1) * r].tobytes()))
                for band in range(self.cfg.bands)]

    def find(self, sig: np.ndarray) -> int | None:
        """Index of a kept document this signature duplicates, else None."""
        seen: set[int] = set()
        for key in self._keys(sig):
            docs = self.buckets.get(key)
            for other in (docs,) if isinstance(docs, int) else docs or ():
                if other in seen:
                    continue
                seen.add(other)
                if np.mean(self.signatures[other] == sig) >= self.cfg.threshold:
                    return other
        return None

    def add(self, sig: np.ndarray) -> int:
        doc = self.size
        if doc == len(self.signatures):
            self.signatures = np.concatenate([self.signatures, np.zeros_like(self.signatures)])
        self.signatures[doc] = sig
        self.size += 1
        for key in self._keys(sig):
            docs = self.buckets.get(key)
            if docs is None:
                self.buckets[key] = doc
            elif isinstance(docs, int):
                self.buckets[key] = [docs, doc]
            else:
                docs.append(doc)
        return doc

    def state(self) -> np.ndarray:
        """All kept signatures, (n, num_perm): enough to rebuild the index on resume."""
        return self.signatures[:self.size]

    @classmethod
    def from_state(cls, cfg: DedupConfig, signatures: np.ndarray) -> NearDuplicateIndex:
        index = cls(cfg)
        for sig in signatures:
            index.add(sig)
        return index
