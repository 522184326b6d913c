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
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from scratchlm.data.clean import FilterConfig, clean, filter_names, quality_failures
from scratchlm.data.dedup import (
    DedupConfig,
    ExactIndex,
    NearDuplicateIndex,
    Words,
    band_keys,
    exact_key,
    minhash_batch,
    permutations,
)
from scratchlm.data.readers import iter_documents
from scratchlm.data.shards import ShardFile, token_dtype
from scratchlm.errors import ScratchError
from scratchlm.tokenizer import BPETokenizer
from scratchlm.utils import atomic_write_text

MANIFEST = "manifest.json"
BATCH_CHARS = 1 << 19
# While a run is unfinished: its progress, and what the dedup indexes need to rebuild
STATE = ".prepare_state.json"
EXACT = ".prepare_exact.u64"
SIGNATURES = ".prepare_signatures.u16"
SPILL = ".prepare_index"  # the indexes' key runs too large for memory


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
    batch_docs: int = 256
    """Most documents per task sent to a worker (fewer when they are long: BATCH_CHARS)."""
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


@dataclass
class Processed:
    """A batch of documents after a worker: all the main process needs, a few arrays per batch
    rather than objects per document (which would cost more to send than to compute)."""

    bytes_in: list[int]
    failures: list[str | None]
    """The first filter each document fails, or None: the k documents that pass follow."""
    bytes_kept: list[int]  # (k,)
    exact: np.ndarray  # (k,) uint64 exact-duplicate keys
    signatures: np.ndarray  # (k, num_perm) uint16 (low bits of MinHash; (k, 0) if near is off)
    band_keys: np.ndarray  # (k, bands) uint64
    tokens: np.ndarray  # every passing document's tokens, each led by <|endoftext|>
    token_bounds: np.ndarray  # (k + 1,) where each document's tokens start


def _encode(text: str) -> np.ndarray:
    enc = _WORKER["enc"]
    try:  # straight into an array, no Python list (tiktoken 0.9+); special tokens are text here
        return enc.encode_to_numpy(text, disallowed_special=())
    except UnicodeEncodeError:  # lone surrogates: encode() repairs them
        return np.array(enc.encode(text, disallowed_special=()), dtype=np.uint32)


def _process(texts: list[str]) -> Processed:
    cfg: DataConfig = _WORKER["cfg"]
    cleaned = [clean(t, cfg.filters) for t in texts]
    split = [t.split() for t in cleaned]
    # hashed once, for the repetition filters and MinHash
    words = Words.of(cleaned, split, normalized=cfg.filters.normalize)
    failures = quality_failures(cleaned, cfg.filters, split, words)
    passed = np.array([i for i, f in enumerate(failures) if f is None], dtype=np.int64)
    kept = [cleaned[i] for i in passed.tolist()]
    sigs = np.zeros((len(kept), 0), np.uint16)
    keys = np.zeros((len(kept), 0), np.uint64)
    if cfg.dedup.near and kept:
        sigs = minhash_batch(words.select(passed), cfg.dedup, _WORKER["perms"]).astype(np.uint16)
        keys = band_keys(sigs, cfg.dedup.bands)
    eot = np.array([_WORKER["eot"]], dtype=np.uint32)
    encoded = [_encode(t) for t in kept]
    bounds = np.concatenate(([0], np.cumsum([len(x) + 1 for x in encoded], dtype=np.int64)))
    tokens = np.concatenate([part for x in encoded for part in (eot, x)] or [eot[:0]],
                            dtype=_WORKER["dtype"], casting="unsafe")  # ids fit: token_dtype
    return Processed(bytes_in=[len(t.encode("utf-8")) for t in texts], failures=failures,
                     bytes_kept=[len(t.encode("utf-8")) for t in kept],
                     exact=np.fromiter(map(exact_key, kept), np.uint64, len(kept)),
                     signatures=sigs, band_keys=keys, tokens=tokens, token_bounds=bounds)


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
        # Documents not yet written: one write a batch, not one a document. (They are views of
        # the batch's arrays: `flush` after each batch, not to keep every batch alive.)
        self.pending: list[np.ndarray] = []
        self.buffered = 0

    def _name(self) -> str:
        return f"{self.split}_{len(self.shards):06d}.bin"

    def add(self, tokens: np.ndarray) -> bool:
        """Append a document's tokens; True if a shard was completed."""
        room = self.size - self.current.count - self.buffered if self.current else 0
        if len(tokens) < room:  # the shard is not full after it
            self.pending.append(tokens)
            self.buffered += len(tokens)
            return False
        self.flush()
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

    def flush(self) -> None:
        if self.pending:
            self.current.write(np.concatenate(self.pending))
            self.pending, self.buffered = [], 0

    def _finish(self) -> None:
        finish_shard(self.current)
        self.shards.append({"file": self._name(), "split": self.split,
                            "tokens": self.current.count})
        self.current = None

    def close(self) -> None:
        self.flush()
        if self.current is not None and self.current.count:
            self._finish()
        elif self.current is not None:
            self.current.discard()
            self.current = None

    def state(self) -> dict:
        self.flush()
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


def _save_state(out: Path, key: str, docs_done: int, counts: Counts, logged: dict[str, int],
                writers: dict[str, ShardWriter]) -> None:
    """Progress up to input document `docs_done`, with how many records of each dedup log
    (EXACT, SIGNATURES) are those documents' (the logs may hold later ones, from the rest of a
    batch, which a resumed run drops)."""
    atomic_write_text(out / STATE, json.dumps({
        "key": key, "docs_done": docs_done, "counts": asdict(counts), "logged": logged,
        "writers": {s: w.state() for s, w in writers.items()}}))


def _remove_state(out: Path) -> None:
    for name in (STATE, EXACT, SIGNATURES):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / SPILL, ignore_errors=True)


def _load_state(out: Path, key: str) -> dict | None:
    path = out / STATE
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state["key"] != key:
        raise ScratchError(f"{out} holds an unfinished run with other inputs, tokenizer or "
                           "settings; use another --out or delete that directory")
    return state


def _batches(docs: Iterator[tuple[str, str | None]], size: int,
             splits: collections.deque) -> Iterator[list[str]]:
    """Texts for the workers, batch by batch: `size` documents, or fewer that hold
    BATCH_CHARS characters (a worker's memory grows with its batch's words). Each document's
    forced split (or None) is queued in `splits` in the same order, for the main process to
    pair with the results."""
    batch: list[str] = []
    chars = 0
    for text, split in docs:
        batch.append(text)
        splits.append(split)
        chars += len(text)
        if len(batch) == size or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _results(batches: Iterator[list[str]], tokenizer_dir: Path, cfg: DataConfig
             ) -> Iterator[Processed]:
    """Worker results in input order: a process pool, or this process when workers == 1."""
    workers = cfg.workers or os.cpu_count() or 1
    if workers == 1:
        _init_worker(str(tokenizer_dir), cfg)
        yield from map(_process, batches)
        return
    ctx = mp.get_context("spawn")  # no fork: the parent may hold threads (tiktoken, torch)
    # Pool.imap keeps every finished result until it is taken: at most 4 batches a worker in
    # flight, so that memory stays bounded when this process falls behind.
    slots = threading.Semaphore(4 * workers)

    def throttled() -> Iterator[list[str]]:
        for batch in batches:
            slots.acquire()
            yield batch

    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_dir), cfg)) as pool:
        for result in pool.imap(_process, throttled()):
            slots.release()
            yield result


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
    logged = state["logged"] if state else {"exact": 0, "near": 0}
    exact = ExactIndex(out / EXACT, logged["exact"], out / SPILL / "exact") \
        if cfg.dedup.exact else None
    index = NearDuplicateIndex(cfg.dedup, out / SIGNATURES, logged["near"], out / SPILL / "near") \
        if cfg.dedup.near else None
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
    for batch in _results(_batches(docs, cfg.batch_docs, splits), tokenizer_dir, cfg):
        # Dedup the batch's passing documents at once, in input order; for each, how many
        # records the dedup logs hold once it is done (for _save_state).
        numbers = docs_done + np.flatnonzero([f is None for f in batch.failures])
        exact_dup = np.zeros(len(numbers), dtype=bool)
        exact_logged = np.zeros(len(numbers), dtype=np.int64)
        if exact is not None:
            exact_logged += exact.size
            exact_dup = exact.dedup(batch.exact, numbers)
            exact_logged += np.cumsum(~exact_dup)
        near_dup = np.zeros(len(numbers), dtype=bool)
        near_logged = np.zeros(len(numbers), dtype=np.int64)
        if index is not None:
            near_logged += index.size
            near_dup[~exact_dup] = index.dedup(batch.signatures[~exact_dup],
                                               batch.band_keys[~exact_dup]) >= 0
            near_logged += np.cumsum(~exact_dup & ~near_dup)
        passed = 0
        for n_in, failure in zip(batch.bytes_in, batch.failures):
            forced_split = splits.popleft()
            docs_done += 1
            counts.documents_in += 1
            counts.bytes_in += n_in
            if failure:
                counts.remove(failure, n_in)
                continue
            j, passed = passed, passed + 1
            if exact_dup[j] or near_dup[j]:
                counts.remove("exact_duplicate" if exact_dup[j] else "near_duplicate", n_in)
                continue
            counts.documents_kept += 1
            counts.bytes_kept += batch.bytes_kept[j]
            # Unless forced, the split follows from the text alone: stable across runs.
            split = forced_split or ("val" if int(batch.exact[j]) % 1_000_000
                                     < cfg.val_fraction * 1_000_000 else "train")
            tokens = batch.tokens[batch.token_bounds[j]:batch.token_bounds[j + 1]]
            counts.tokens[split] += len(tokens)
            if writers[split].add(tokens):
                for dedup_index in (exact, index):
                    if dedup_index is not None:
                        dedup_index.log.sync()
                _save_state(out, key, docs_done, counts, {"exact": int(exact_logged[j]),
                                                          "near": int(near_logged[j])}, writers)
        for w in writers.values():
            w.flush()
        bar.update(len(batch.failures))
        bar.set_postfix(MB=f"{counts.bytes_in / 1e6:.1f}", kept=counts.documents_kept)
    bar.close()
    for dedup_index in (exact, index):
        if dedup_index is not None:
            dedup_index.close()
    if counts.documents_kept == 0:
        for w in writers.values():
            w.close()  # nothing was written: only empty partial files to remove
        _remove_state(out)
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
                    for name in [*filter_names(cfg.filters), "exact_duplicate",
                                 "near_duplicate"]},
        "shards": writers["train"].shards + writers["val"].shards,
        "tokenizer": {"vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                      "fingerprint": tokenizer_fingerprint(tokenizer_dir)},
        "dtype": token_dtype(tok.vocab_size).name,
        "seconds": time.perf_counter() - t0,
        "config": asdict(cfg),
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    _remove_state(out)
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
