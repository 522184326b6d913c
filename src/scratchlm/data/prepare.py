"""`scratchlm data prepare`: read -> clean -> filter -> dedup -> tokenize -> shards.

Worker processes clean, filter, sign (MinHash) and tokenize batches of documents in parallel;
the main process keeps the order, runs the stateful dedup and writes shards. After every shard
it saves its progress (documents consumed, counters, dedup state, unflushed tokens) atomically,
so a re-run after an interruption resumes without redoing finished shards and produces the same
shards as an uninterrupted run. `manifest.json` records every count at the end.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from scratchlm.data.clean import FilterConfig, clean, filter_names, quality_failure
from scratchlm.data.dedup import (
    DedupConfig,
    NearDuplicateIndex,
    band_keys,
    exact_key,
    minhash,
    permutations,
    word_hashes,
)
from scratchlm.data.readers import iter_documents
from scratchlm.data.shards import ShardFile, token_dtype
from scratchlm.errors import ScratchError
from scratchlm.tokenizer import BPETokenizer
from scratchlm.utils import atomic_path, atomic_write_text

MANIFEST = "manifest.json"
STATE = ".prepare_state.npz"


@dataclass
class DataConfig:
    inputs: list[str] = field(default_factory=lambda: ["builtin"])
    """Files, directories or globs to prepare; "builtin" is the built-in Shakespeare corpus."""
    val_inputs: list[str] = field(default_factory=list)
    """Files held out whole for validation; when given, val_fraction is not used and every
    document of `inputs` goes to training."""
    shards: str | None = None
    """An already prepared shard directory; None = prepare data.inputs into RUN/data."""
    text_field: str = "text"
    """JSONL field / Parquet column holding the text."""
    separator: str | None = None
    """Split plain-text files into documents at this string (None: a file is a document)."""
    errors: str = "strict"
    """Invalid UTF-8: "strict" stops with the file and offset, "replace" uses U+FFFD."""
    val_fraction: float = 0.01
    """Share of documents (chosen by a hash of their text) held out for validation."""
    shard_tokens: int = 50_000_000
    """Tokens per shard file."""
    workers: int = 0
    """Worker processes for cleaning, filtering and tokenizing (0 = one per CPU core; 1 = all
    in this process)."""
    batch_docs: int = 64
    """Documents per task sent to a worker."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """Clean-up and quality filters."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Exact and near-duplicate removal."""


# ------------------------------------------------------------------------------------------------
# the worker side


_WORKER: dict = {}


def _init_worker(tokenizer_dir: str, cfg: DataConfig) -> None:
    tok = BPETokenizer.load(tokenizer_dir)
    from scratchlm.tokenizer.fast import to_tiktoken

    _WORKER.update(enc=to_tiktoken(tok), eot=tok.eot_id, cfg=cfg, perms=permutations(cfg.dedup),
                   dtype=token_dtype(tok.vocab_size))


def _process(texts: list[str]) -> list[tuple]:
    """Per document: (bytes in, failure or None, bytes kept, exact key, (MinHash signature,
    band keys), tokens)."""
    cfg: DataConfig = _WORKER["cfg"]
    out = []
    cleaned = [clean(t, cfg.filters) for t in texts]
    for raw, text in zip(texts, cleaned):
        n_in = len(raw.encode("utf-8"))
        # Words and their hashes once, for the repetition filters and MinHash alike.
        words = text.split()
        short = cfg.filters.min_words is not None and len(words) < cfg.filters.min_words
        ids = None if short else word_hashes(words)  # a short document fails first anyway
        failure = quality_failure(text, cfg.filters, words, ids) if text else "empty"
        if failure:
            out.append((n_in, failure, 0, None, (None, None), None))
            continue
        sig = keys = None
        if cfg.dedup.near:
            sig = minhash(ids, cfg.dedup, _WORKER["perms"])
            keys = band_keys(sig, cfg.dedup.bands)
        # Special-token strings inside a document are text, never control tokens.
        ids = _WORKER["enc"].encode(text, disallowed_special=())
        tokens = np.array([_WORKER["eot"], *ids], dtype=_WORKER["dtype"])  # the shards' dtype
        out.append((n_in, None, len(text.encode("utf-8")), exact_key(text), (sig, keys), tokens))
    return out


# ------------------------------------------------------------------------------------------------
# the main side


@dataclass
class Counts:
    documents_in: int = 0
    bytes_in: int = 0
    documents_kept: int = 0
    bytes_kept: int = 0
    tokens: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    removed: dict = field(default_factory=dict)  # stage -> {"documents": n, "bytes": n}

    def remove(self, stage: str, n_bytes: int) -> None:
        entry = self.removed.setdefault(stage, {"documents": 0, "bytes": 0})
        entry["documents"] += 1
        entry["bytes"] += n_bytes


class ShardWriter:
    """Streams one split's tokens into shard files of `shard_tokens` tokens each."""

    def __init__(self, out: Path, split: str, shard_tokens: int, vocab_size: int) -> None:
        self.out, self.split, self.size, self.vocab = out, split, shard_tokens, vocab_size
        self.shards: list[dict] = []
        self.current: ShardFile | None = None

    def _name(self) -> str:
        return f"{self.split}_{len(self.shards):06d}.bin"

    def add(self, tokens: np.ndarray) -> bool:
        """Append a document's tokens; True if a shard was completed."""
        wrote = False
        while len(tokens):  # a long document may fill several shards
            if self.current is None:
                self.current = ShardFile(self.out / self._name(), self.vocab)
            take = min(len(tokens), self.size - self.current.count)
            self.current.write(tokens[:take])
            tokens = tokens[take:]
            if self.current.count == self.size:
                self._finish()
                wrote = True
        return wrote

    def _finish(self) -> None:
        finish_shard(self.current)
        self.shards.append({"file": self._name(), "split": self.split,
                            "tokens": self.current.count})
        self.current = None

    def close(self) -> None:
        if self.current is not None and self.current.count:
            self._finish()
        elif self.current is not None:
            self.current.discard()
            self.current = None

    def state(self) -> dict:
        if self.current is not None:
            self.current.sync()
        return {"shards": self.shards, "partial": self.current.count if self.current else 0}

    def restore(self, state: dict) -> None:
        self.shards = state["shards"]
        if state["partial"]:
            self.current = ShardFile(self.out / self._name(), self.vocab, keep=state["partial"])


def finish_shard(shard: ShardFile) -> None:
    """Complete a shard (a function of its own so that tests can interrupt a run here)."""
    shard.finish()


def tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    """A short hash of the tokenizer file: shards remember it, and the loader checks it."""
    return hashlib.sha256((tokenizer_dir / "bpe.json").read_bytes()).hexdigest()[:16]


def _run_key(inputs: list[str], tokenizer_fp: str, cfg: DataConfig) -> str:
    """What a resumable state must match: the same inputs, tokenizer and settings."""
    blob = json.dumps([inputs, tokenizer_fp, asdict(cfg)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_state(out: Path, key: str, docs_done: int, counts: Counts, seen: set[int],
                index: NearDuplicateIndex | None, writers: dict[str, ShardWriter]) -> None:
    meta = {"key": key, "docs_done": docs_done, "counts": asdict(counts),
            "writers": {s: w.state() for s, w in writers.items()}}
    with atomic_path(out / STATE) as tmp, open(tmp, "wb") as f:
        np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                 seen=np.fromiter(seen, dtype=np.uint64, count=len(seen)),
                 signatures=index.state() if index else np.zeros((0, 0), np.uint32))


def _load_state(out: Path, key: str) -> dict | None:
    path = out / STATE
    if not path.is_file():
        return None
    with np.load(path) as z:
        meta = json.loads(z["meta"].tobytes())
        if meta["key"] != key:
            raise ScratchError(f"{out} holds an unfinished run with other inputs, tokenizer or "
                               "settings; use another --out or delete that directory")
        meta["seen"] = set(z["seen"].tolist())
        meta["signatures"] = z["signatures"]
    return meta


def _batches(docs: Iterator[tuple[str, str | None]], size: int,
             splits: collections.deque) -> Iterator[list[str]]:
    """Texts for the workers, batch by batch; each document's forced split (or None) is
    queued in `splits` in the same order, for the main process to pair with the results."""
    while batch := list(itertools.islice(docs, size)):
        splits.extend(split for _, split in batch)
        yield [text for text, _ in batch]


def _results(batches: Iterator[list[str]], tokenizer_dir: Path, cfg: DataConfig
             ) -> Iterator[list[tuple]]:
    """Worker results in input order: a process pool, or this process when workers == 1."""
    workers = cfg.workers or os.cpu_count() or 1
    if workers == 1:
        _init_worker(str(tokenizer_dir), cfg)
        yield from map(_process, batches)
        return
    ctx = mp.get_context("spawn")  # no fork: the parent may hold threads (tiktoken, torch)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_dir), cfg)) as pool:
        yield from pool.imap(_process, batches)


def prepare(
    inputs: Iterable[str | os.PathLike],
    tokenizer_dir: str | os.PathLike,
    out: str | os.PathLike,
    cfg: DataConfig | None = None,
    progress: bool = True,
    documents: Iterable[str] | None = None,
    documents_name: str = "documents",
) -> dict:
    """Run the pipeline on the files, directories and globs in `inputs` (or on `documents`,
    texts already in memory, named `documents_name` for resuming); returns the manifest (also
    written to out/manifest.json)."""
    cfg = cfg or DataConfig()
    out, tokenizer_dir = Path(out), Path(tokenizer_dir)
    tok = BPETokenizer.load(tokenizer_dir)
    if tok.eot_id is None:
        raise ScratchError(f"{tokenizer_dir}: the tokenizer has no <|endoftext|> token to "
                           "separate documents; train one with it")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ScratchError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    named = [str(p) for p in inputs]
    if not named and documents is None:
        raise ScratchError("no input: give at least one file, directory or glob")
    if (out / MANIFEST).is_file():
        raise ScratchError(f"{out} already holds prepared data ({MANIFEST}); use another "
                           "--out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    key = _run_key(named or [documents_name], tokenizer_fingerprint(tokenizer_dir), cfg)
    state = _load_state(out, key)

    counts = Counts(**state["counts"]) if state else Counts()
    seen: set[int] = state["seen"] if state else set()  # 64 bits of each exact key
    index = None
    if cfg.dedup.near:
        index = NearDuplicateIndex.from_state(cfg.dedup, state["signatures"]) if state \
            else NearDuplicateIndex(cfg.dedup)
    writers = {s: ShardWriter(out, s, cfg.shard_tokens, tok.vocab_size) for s in ("train", "val")}
    docs_done = 0
    if state:
        docs_done = state["docs_done"]
        for s, w in writers.items():
            w.restore(state["writers"][s])
        print(f"[data] resuming after {docs_done:,} documents "
              f"({sum(len(w.shards) for w in writers.values())} shards already written)")

    def read(paths: list[str]) -> Iterator[str]:
        return (d.text for d in iter_documents(paths, cfg.text_field, cfg.separator,
                                               cfg.errors))

    forced = "train" if cfg.val_inputs else None
    docs: Iterator[tuple[str, str | None]] = (
        (text, forced) for text in (iter(documents) if documents is not None else read(named)))
    if cfg.val_inputs:
        docs = itertools.chain(docs, ((text, "val") for text in read(cfg.val_inputs)))
    docs = itertools.islice(docs, docs_done, None)  # resuming: skip what is in the shards
    splits: collections.deque = collections.deque()
    t0 = time.perf_counter()
    bar = tqdm(desc="preparing", unit="doc", disable=not progress)
    for results in _results(_batches(docs, cfg.batch_docs, splits), tokenizer_dir, cfg):
        for n_in, failure, n_kept, ekey, (sig, band), tokens in results:
            forced_split = splits.popleft()
            docs_done += 1
            counts.documents_in += 1
            counts.bytes_in += n_in
            if failure:
                counts.remove(failure, n_in)
                continue
            if cfg.dedup.exact:
                short = int.from_bytes(ekey[:8], "little")
                if short in seen:
                    counts.remove("exact_duplicate", n_in)
                    continue
                seen.add(short)
            if index is not None:
                if index.find(sig, band) is not None:
                    counts.remove("near_duplicate", n_in)
                    continue
                index.add(sig, band)
            counts.documents_kept += 1
            counts.bytes_kept += n_kept
            # Unless forced, the split follows from the text alone: stable across runs.
            split = forced_split or ("val" if int.from_bytes(ekey[:4], "little") % 1_000_000
                                     < cfg.val_fraction * 1_000_000 else "train")
            counts.tokens[split] += len(tokens)
            if writers[split].add(tokens):
                _save_state(out, key, docs_done, counts, seen, index, writers)
        bar.update(len(results))
        bar.set_postfix(MB=f"{counts.bytes_in / 1e6:.1f}", kept=counts.documents_kept)
    bar.close()
    if counts.documents_kept == 0:
        for w in writers.values():
            w.close()  # nothing was written: only empty partial files to remove
        (out / STATE).unlink(missing_ok=True)
        raise ScratchError("no text left after cleaning, filtering and dedup; check the inputs "
                           "or loosen data.filters (e.g. --data.filters.min_words=5)")
    for w in writers.values():
        w.close()
    manifest = {
        "format": "scratchlm-shards", "version": 1,
        "documents_in": counts.documents_in, "documents_kept": counts.documents_kept,
        "bytes_in": counts.bytes_in, "bytes_kept": counts.bytes_kept,
        "tokens": counts.tokens["train"] + counts.tokens["val"],
        "tokens_train": counts.tokens["train"], "tokens_val": counts.tokens["val"],
        "removed": {name: counts.removed.get(name, {"documents": 0, "bytes": 0})
                    for name in ["empty", *filter_names(cfg.filters), "exact_duplicate",
                                 "near_duplicate"]},
        "shards": writers["train"].shards + writers["val"].shards,
        "tokenizer": {"vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                      "fingerprint": tokenizer_fingerprint(tokenizer_dir)},
        "dtype": token_dtype(tok.vocab_size).name,
        "seconds": time.perf_counter() - t0,
        "config": asdict(cfg),
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    (out / STATE).unlink(missing_ok=True)
    return manifest


def summary_table(manifest: dict) -> str:
    """The counts of a manifest as a small table for the terminal."""
    rows = [("documents in", f"{manifest['documents_in']:,}",
             f"{manifest['bytes_in'] / 1e6:,.2f} MB")]
    for name, r in manifest["removed"].items():
        if r["documents"]:
            rows.append((f"  removed: {name}", f"{r['documents']:,}",
                         f"{r['bytes'] / 1e6:,.2f} MB"))
    rows.append(("documents kept", f"{manifest['documents_kept']:,}",
                 f"{manifest['bytes_kept'] / 1e6:,.2f} MB"))
    rows.append(("tokens (train / val)", f"{manifest['tokens_train']:,}",
                 f"{manifest['tokens_val']:,}"))
    rows.append(("shards", f"{len(manifest['shards'])}", manifest["dtype"]))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{w}}  {b:>12}  {c:>12}" for a, b, c in rows)
