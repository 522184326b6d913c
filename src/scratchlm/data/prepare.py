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
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from scratchlm.data.builtin import BUILTIN_NAME
from scratchlm.data.clean import QualityFilters, clean, resolve, rule_names
from scratchlm.data.config import DataConfig
from scratchlm.data.dedup import (
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
from scratchlm.data.words import SpacyRules, spacy_rules, use_spacy_rules
from scratchlm.errors import ScratchError
from scratchlm.tokenizer import BPETokenizer
from scratchlm.utils import atomic_write_text, stale_temporaries

MANIFEST = "manifest.json"
BATCH_CHARS = 1 << 19
# While a run is unfinished: its progress, and what the dedup indexes need to rebuild
STATE = ".prepare_state.json"
EXACT = ".prepare_exact.u64"
SIGNATURES = ".prepare_signatures.u16"
SPILL = ".prepare_index"  # the indexes' key runs too large for memory
ENGINES = ("local", "ray")


# ------------------------------------------------------------------------------------------------
# the worker side


_WORKER: dict = {}


def word_rules(cfg: DataConfig, builtin_only: bool) -> SpacyRules | None:
    """spaCy's word rules when the filters split words as datatrove does: read once in the
    main process and handed to the workers, which then never import spaCy."""
    filters = resolve(cfg.filters, builtin_only)
    return spacy_rules() if filters.steps and filters.words == "spacy" else None


def _init_worker(tokenizer_dir: str, cfg: DataConfig, builtin_only: bool = False,
                 rules: SpacyRules | None = None) -> None:
    if rules is not None:
        use_spacy_rules(rules)
    tok = BPETokenizer.load(tokenizer_dir)
    from scratchlm.tokenizer.fast import to_tiktoken

    _WORKER.update(enc=to_tiktoken(tok), eot=tok.eot_id, cfg=cfg, perms=permutations(cfg.dedup),
                   dtype=token_dtype(tok.vocab_size),
                   filters=QualityFilters(cfg.filters, builtin_only))


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
    failures, filtered = _WORKER["filters"](cleaned)
    # A text the filters pass but left without a word (C4 may keep no line) is empty.
    failures = [f if f or t.strip() else "empty" for f, t in zip(failures, filtered)]
    kept = [t for f, t in zip(failures, filtered) if f is None]
    near = cfg.dedup.near
    sigs = np.zeros((len(kept), cfg.dedup.num_perm if near else 0), np.uint16)
    keys = np.zeros((len(kept), cfg.dedup.bands if near else 0), np.uint64)
    if near and kept:
        # C4 joins kept lines with newlines: still only spaces and newlines after clean-up
        words = Words.of(kept, normalized=cfg.filters.normalize)
        sigs = minhash_batch(words, cfg.dedup, _WORKER["perms"]).astype(np.uint16)
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
            path = self.out / self._name()
            partial = ShardFile.partial_path(path)
            if not partial.exists() and path.exists():
                # Killed after this shard was finished but before the state that records it
                # was saved: the shard's first tokens are the partial ones the state counts.
                os.replace(path, partial)
            self.current = ShardFile(path, self.vocab, keep=state["partial"])


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


def _results(batches: Iterator[list[str]], tokenizer_dir: Path, cfg: DataConfig,
             builtin_only: bool) -> Iterator[Processed]:
    """Worker results in input order: a process pool, or this process when workers == 1."""
    workers = cfg.workers or os.cpu_count() or 1
    rules = word_rules(cfg, builtin_only)
    if workers == 1:
        _init_worker(str(tokenizer_dir), cfg, builtin_only, rules)
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

    with ctx.Pool(workers, initializer=_init_worker,
                  initargs=(str(tokenizer_dir), cfg, builtin_only, rules)) as pool:
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
    engine: str = "local",
    address: str | None = None,
) -> dict:
    """Run the pipeline on the files, directories and globs in `inputs` (or on `documents`,
    texts already in memory, named `documents_name` for resuming); returns the manifest (also
    written to out/manifest.json). `engine` "ray" runs it on a Ray cluster (`address`: "auto",
    "HOST:PORT", or None for a Ray instance of this machine's own); see scratchlm.data.ray."""
    cfg = cfg or DataConfig()
    out, tokenizer_dir = Path(out), Path(tokenizer_dir)
    tok = BPETokenizer.load(tokenizer_dir)
    named = [str(p) for p in inputs]
    check_inputs(out, tokenizer_dir, tok, cfg, named, documents, engine)
    builtin_only = documents_name == BUILTIN_NAME and not named and not cfg.val_inputs
    if engine == "ray":
        from scratchlm.data.ray_engine import prepare_ray

        if documents is not None and documents_name != BUILTIN_NAME:
            raise ScratchError("--engine ray reads its inputs on the cluster's nodes: give "
                               "files (or the built-in corpus), not texts in memory")
        if (out / STATE).is_file():  # the Ray engine neither resumes it nor may clobber it
            raise ScratchError(f"{out} holds an unfinished local run ({STATE}); resume it "
                               "with --engine local, or use another --out")

        return prepare_ray(named, tokenizer_dir, out, cfg, builtin=documents is not None,
                           builtin_only=builtin_only, address=address, progress=progress)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    key = _run_key(named or [documents_name], tokenizer_fingerprint(tokenizer_dir), cfg)
    state = _load_state(out, key)
    if state is None:
        _clear_leftovers(out, say=True)
    # A state save killed before its rename leaves its temporary file.
    for tmp in stale_temporaries(out / STATE):
        tmp.unlink(missing_ok=True)
    try:
        return _prepare_local(out, key, state, tok, tokenizer_dir, cfg, named, documents,
                              builtin_only, progress)
    except BaseException as e:
        failed(out, created, e)
        raise


def _clear_leftovers(out: Path, say: bool = False) -> None:
    """Remove the dedup logs, spilled index runs and partial shards of a run that saved no
    progress (a fresh run first clears those of one killed early: they resume nothing)."""
    found = [p for p in out.glob(".*") if p.name.startswith(".prepare_")
             or p.name.endswith(".partial")]
    if found and say:
        print(f"[data] {out}: removing {len(found)} leftover file(s) of an interrupted run that "
              "saved no progress")
    _remove_state(out)
    for p in found:
        if p.is_file():
            p.unlink(missing_ok=True)


def failed(out: Path, created: bool, error: BaseException) -> None:
    """After a failed run: progress it saved stays as its resume state (and the error says so);
    otherwise the partial files go, and `out` too if this run created it."""
    if (out / STATE).is_file():
        note = (f"the progress so far is kept in {out} (.prepare_* files): run the same "
                "command again to resume, or delete the directory to start over")
        if isinstance(error, ScratchError) and error.args:
            error.args = (f"{error.args[0]}; {note}", *error.args[1:])
        else:
            print(f"[data] {note}", file=sys.stderr)
        return
    _clear_leftovers(out)
    for split in ("train", "val"):  # shards of this run (one may finish before any state)
        for shard in out.glob(f"{split}_*.bin"):
            shard.unlink(missing_ok=True)
    if created:
        try:
            out.rmdir()  # only if empty: never a file this run did not write
        except OSError:
            pass


def _prepare_local(out: Path, key: str, state: dict | None, tok: BPETokenizer,
                   tokenizer_dir: Path, cfg: DataConfig, named: list[str],
                   documents: Iterable[str] | None, builtin_only: bool, progress: bool) -> dict:
    """The local engine's run, from the saved `state` if there is one."""
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
    for batch in _results(_batches(docs, cfg.batch_docs, splits), tokenizer_dir, cfg,
                          builtin_only):
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
            split = split_of(int(batch.exact[j]), forced_split, cfg.val_fraction)
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
        raise no_text_left()
    for w in writers.values():
        w.close()
    manifest = build_manifest(counts, writers, tok, tokenizer_dir, cfg, builtin_only,
                              time.perf_counter() - t0, "local")
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    _remove_state(out)
    return manifest


def check_inputs(out: Path, tokenizer_dir: Path, tok: BPETokenizer, cfg: DataConfig,
                 named: list[str], documents: Iterable[str] | None, engine: str) -> None:
    """Refuse, before anything is written, what a run could not finish."""
    if tok.eot_id is None:
        raise ScratchError(f"{tokenizer_dir}: the tokenizer has no <|endoftext|> token to "
                           "separate documents; train one with it")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ScratchError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if not named and documents is None:
        raise ScratchError("no input: give at least one file, directory or glob")
    if engine not in ENGINES:
        raise ScratchError(f"--engine must be one of {list(ENGINES)}, got {engine!r}")
    if (out / MANIFEST).is_file():
        raise ScratchError(f"{out} already holds prepared data ({MANIFEST}); use another "
                           "--out or delete it")


def no_text_left() -> ScratchError:
    return ScratchError("no text left after cleaning, filtering and dedup; check the inputs or "
                        "loosen data.filters (e.g. --data.filters.preset=none)")


def build_manifest(counts: Counts, writers: dict[str, ShardWriter], tok: BPETokenizer,
                   tokenizer_dir: Path, cfg: DataConfig, builtin_only: bool, seconds: float,
                   engine: str) -> dict:
    filters = resolve(cfg.filters, builtin_only)
    return {
        "format": "scratchlm-shards", "version": 1,
        "documents_in": counts.documents_in, "documents_kept": counts.documents_kept,
        "bytes_in": counts.bytes_in, "bytes_kept": counts.bytes_kept,
        "tokens": counts.tokens["train"] + counts.tokens["val"],
        "tokens_train": counts.tokens["train"], "tokens_val": counts.tokens["val"],
        "removed": {name: counts.removed.get(name, {"documents": 0, "bytes": 0})
                    for name in [*rule_names(filters), "exact_duplicate", "near_duplicate"]},
        "shards": writers["train"].shards + writers["val"].shards,
        "tokenizer": {"vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                      "fingerprint": tokenizer_fingerprint(tokenizer_dir)},
        "dtype": token_dtype(tok.vocab_size).name,
        "seconds": seconds,
        "engine": engine,
        "filters": asdict(filters),
        "config": asdict(cfg),
    }


def split_of(exact: int, forced: str | None, val_fraction: float) -> str:
    """Unless forced, a document's split follows from its text alone: stable across runs and
    engines."""
    return forced or ("val" if exact % 1_000_000 < val_fraction * 1_000_000 else "train")


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
