"""`scratchlm data prepare --engine ray`: the same pipeline as distributed work on a Ray cluster.

1. Map, one task per input file (the built-in corpus in parts of 100 scenes): read, clean,
   filter, MinHash and tokenize, with the local engine's own worker code (prepare._process).
   A task returns its documents' counts, tokens and signatures as objects in Ray's object store,
   and its exact keys and LSH band keys split into `partitions` by key.
2. Exact dedup, one task per partition: every key's documents across the cluster meet in one
   task, which keeps the first in input order.
3. Band grouping, one task per partition: documents sharing a band key (exact duplicates left
   out) become candidate pairs.
4. Near dedup, one task: each candidate pair is confirmed by its signatures (the share of equal
   16-bit values, as the local index compares them) and the documents are resolved in input
   order: a document is a near duplicate if a confirmed partner before it was kept. That is the
   local engine's rule, so both engines keep the same documents (tested).
5. The driver writes the shards a part at a time, in input order: the same files, byte for
   byte, as the local engine. It holds one part's results at a time, and the object references.

Ray retries a task whose worker dies (tasks are deterministic, and each part's results are
whole objects, so a retried part is neither lost nor counted twice); a run whose driver dies
starts over, and a run that fails removes the shards it wrote (this engine keeps no resume
state). Input files and the tokenizer must be readable at the same path on every node.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from scratchlm.data import prepare as local
from scratchlm.data.config import DataConfig
from scratchlm.data.readers import expand_paths, iter_documents
from scratchlm.errors import ScratchError
from scratchlm.tokenizer import BPETokenizer
from scratchlm.utils import atomic_write_text

SCENES_PER_PART = 100
PART_BITS = 32  # a document's global number: part << PART_BITS | its number in the part
MAX_RETRIES = 3


@dataclass(frozen=True)
class Part:
    """A unit of map work: one input file, or scenes [start, stop) of the built-in corpus."""

    path: str | None
    start: int = 0
    stop: int = 0
    split: str | None = None  # forced split ("train" / "val"), as data.val_inputs asks


def import_ray():
    try:
        import ray
    except ImportError:
        raise ScratchError("--engine ray needs Ray: pip install 'scratchlm[cluster]' (or "
                           "pip install 'ray>=2.9')") from None
    return ray


def plan_parts(named: list[str], cfg: DataConfig, builtin: bool) -> list[Part]:
    """The map tasks, in input order (the local engine's order of documents)."""
    forced = "train" if cfg.val_inputs else None
    parts = []
    if builtin:
        from scratchlm.data.builtin import iter_scenes

        n = sum(1 for _ in iter_scenes())
        parts += [Part(None, a, min(a + SCENES_PER_PART, n), forced)
                  for a in range(0, n, SCENES_PER_PART)]
    parts += [Part(str(p), split=forced) for p in expand_paths(named)] if named else []
    if cfg.val_inputs:
        parts += [Part(str(p), split="val") for p in expand_paths(cfg.val_inputs)]
    return parts


# ------------------------------------------------------------------------------------------------
# tasks (plain functions, made remote when Ray is imported)


_TOKENIZERS: dict[str, str] = {}  # fingerprint -> a directory on this worker


def _tokenizer_dir(files: dict[str, bytes]) -> str:
    """The tokenizer the driver sent, written once per worker process."""
    key = hashlib.sha256(files["bpe.json"]).hexdigest()[:16]
    if key not in _TOKENIZERS:
        where = Path(tempfile.mkdtemp(prefix="scratchlm-tok-"))
        for name, data in files.items():
            (where / name).write_bytes(data)
        _TOKENIZERS[key] = str(where)
    return _TOKENIZERS[key]


def _texts(part: Part, cfg: DataConfig):
    if part.path is None:
        from itertools import islice

        from scratchlm.data.builtin import iter_scenes

        return (s.text for s in islice(iter_scenes(), part.start, part.stop))
    return (d.text for d in iter_documents([part.path], cfg.text_field, cfg.separator,
                                           cfg.errors))


def map_part(index: int, part: Part, cfg: DataConfig, tokenizer: dict[str, bytes],
             builtin_only: bool, rules, partitions: int, fault: str | None):
    """Read, clean, filter, sign and tokenize one part. Returns (meta, tokens, signatures,
    *partitions): partition p holds the exact keys and band keys k with k % partitions == p,
    each with its document's global number."""
    key = json.dumps([asdict(cfg), builtin_only, sorted(tokenizer)], default=str) + \
        hashlib.sha256(tokenizer["bpe.json"]).hexdigest()
    if local._WORKER.get("key") != key:  # a worker process serves many tasks
        local._init_worker(_tokenizer_dir(tokenizer), cfg, builtin_only, rules)
        local._WORKER["key"] = key
    results = []
    batch: list[str] = []
    for text in _texts(part, cfg):
        batch.append(text)
        if len(batch) == cfg.batch_docs:
            results.append(local._process(batch))
            batch = []
            if fault and len(results) == 2 and not os.path.exists(fault):
                # fault injection for the tests: this worker dies mid-part, once
                Path(fault).touch()
                os.kill(os.getpid(), signal.SIGKILL)
    if batch:
        results.append(local._process(batch))
    return _pack(index, results, cfg, partitions)


def _pack(index: int, results: list, cfg: DataConfig, partitions: int) -> tuple:
    failures = [f for r in results for f in r.failures]
    bytes_in = np.array([b for r in results for b in r.bytes_in], dtype=np.int64)
    passing = np.array([i for i, f in enumerate(failures) if f is None], dtype=np.int64)
    removed: dict[str, list[int]] = {}
    for f, b in zip(failures, bytes_in.tolist()):
        if f is not None:
            entry = removed.setdefault(f, [0, 0])
            entry[0] += 1
            entry[1] += b
    token_parts = [r.tokens[:r.token_bounds[-1]] for r in results]
    lengths = np.concatenate([np.diff(r.token_bounds) for r in results] or [np.zeros(0, int)])
    exact = np.concatenate([r.exact for r in results] or [np.zeros(0, np.uint64)])
    sigs = np.concatenate([r.signatures for r in results] or
                          [np.zeros((0, cfg.dedup.num_perm if cfg.dedup.near else 0),
                                    np.uint16)])
    bands = np.concatenate([r.band_keys for r in results] or [np.zeros((0, 0), np.uint64)])
    meta = {"documents": len(failures), "bytes": int(bytes_in.sum()), "removed": removed,
            "passing": passing, "bytes_in": bytes_in[passing],
            "bytes_kept": np.array([b for r in results for b in r.bytes_kept], np.int64),
            "exact": exact, "token_bounds": np.concatenate(([0], np.cumsum(lengths)))}
    tokens = np.concatenate(token_parts) if token_parts else np.zeros(0, np.uint16)
    gids = (np.int64(index) << PART_BITS) + np.arange(len(passing), dtype=np.int64)
    band_gids = np.repeat(gids, bands.shape[1]) if bands.size else np.zeros(0, np.int64)
    flat = bands.ravel()
    out = []
    for p in range(partitions):
        e = exact % np.uint64(partitions) == p
        b = flat % np.uint64(partitions) == p
        out.append((exact[e], gids[e], flat[b], band_gids[b]))
    return (meta, tokens, sigs, *out)


def exact_reduce(*partition: tuple) -> np.ndarray:
    """One partition's exact keys from every part: the global numbers of the documents whose
    key an earlier document (in input order) has."""
    keys = np.concatenate([p[0] for p in partition] or [np.zeros(0, np.uint64)])
    gids = np.concatenate([p[1] for p in partition] or [np.zeros(0, np.int64)])
    order = np.lexsort((gids, keys))
    k = keys[order]
    later = np.zeros(len(k), dtype=bool)
    later[1:] = k[1:] == k[:-1]
    return np.sort(gids[order][later])


def band_reduce(n_exact: int, *args) -> np.ndarray:
    """One partition's band keys from every part: (pairs, 2) int64 global numbers (earlier,
    later) of documents that share a band key, exact duplicates (the first n_exact arrays)
    left out."""
    exact = np.concatenate(args[:n_exact] or [np.zeros(0, np.int64)])
    keys = np.concatenate([p[2] for p in args[n_exact:]] or [np.zeros(0, np.uint64)])
    gids = np.concatenate([p[3] for p in args[n_exact:]] or [np.zeros(0, np.int64)])
    keep = ~np.isin(gids, exact)
    keys, gids = keys[keep], gids[keep]
    order = np.lexsort((gids, keys))
    keys, gids = keys[order], gids[order]
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    sizes = np.diff(np.append(starts, len(keys)))
    pairs = []
    for s, n in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist()):
        group = gids[s:s + n]
        i, j = np.triu_indices(n, 1)
        pairs.append(np.stack([group[i], group[j]], axis=1))
    if not pairs:
        return np.zeros((0, 2), np.int64)
    return np.unique(np.concatenate(pairs), axis=0)


def near_reduce(n_parts: int, threshold: float, n_exact: int, signatures: list, *args):
    """Confirm the candidate pairs and resolve them in input order; for each part, (its exact
    duplicates, its near duplicates) as document numbers within the part's passing ones."""
    ray = import_ray()
    exact = np.concatenate(args[:n_exact] or [np.zeros(0, np.int64)])
    pairs = np.concatenate(args[n_exact:] or [np.zeros((0, 2), np.int64)])
    if len(pairs):
        pairs = np.unique(pairs, axis=0)
    mask = np.int64((1 << PART_BITS) - 1)
    confirmed = np.zeros(len(pairs), dtype=bool)
    part_i, part_j = pairs[:, 0] >> PART_BITS, pairs[:, 1] >> PART_BITS
    for pi in np.unique(part_i).tolist():
        sig_i = ray.get(signatures[pi])
        for pj in np.unique(part_j[part_i == pi]).tolist():
            sig_j = sig_i if pj == pi else ray.get(signatures[pj])
            rows = np.flatnonzero((part_i == pi) & (part_j == pj))
            a, b = sig_i[pairs[rows, 0] & mask], sig_j[pairs[rows, 1] & mask]
            confirmed[rows] = np.mean(a == b, axis=1) >= threshold
    edges = pairs[confirmed]
    edges = edges[np.lexsort((edges[:, 0], edges[:, 1]))]  # by the later document
    removed: set[int] = set()
    for i, j in edges.tolist():
        if i not in removed and j not in removed:  # i was kept: j duplicates it
            removed.add(j)
    near = np.array(sorted(removed), dtype=np.int64)
    out = []
    for p in range(n_parts):
        lo, hi = np.int64(p) << PART_BITS, np.int64(p + 1) << PART_BITS
        out.append((exact[(exact >= lo) & (exact < hi)] & mask,
                    near[(near >= lo) & (near < hi)] & mask))
    return tuple(out) if n_parts > 1 else out[0]


# ------------------------------------------------------------------------------------------------
# the driver


def prepare_ray(named: list[str], tokenizer_dir: Path, out: Path, cfg: DataConfig,
                builtin: bool, builtin_only: bool, address: str | None = None,
                progress: bool = True, partitions: int | None = None,
                fault: str | None = None) -> dict:
    """The Ray engine behind `prepare(..., engine="ray")`: the same shards and manifest."""
    ray = import_ray()
    parts = plan_parts(named, cfg, builtin)
    if not parts:
        raise ScratchError("no input: give at least one file, directory or glob")
    if len(parts) >= 1 << 31:
        raise ScratchError(f"{len(parts)} input files: more than the Ray engine numbers")
    tok = BPETokenizer.load(tokenizer_dir)
    tokenizer = {p.name: p.read_bytes() for p in tokenizer_dir.iterdir() if p.is_file()}
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     **({"num_cpus": cfg.workers} if address is None and cfg.workers else {}))
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ScratchError(f"cannot reach a Ray cluster at {address!r} ({e}); start one "
                               "with `ray start --head` or leave out --address") from None
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        manifest = _run(ray, parts, tok, tokenizer_dir, tokenizer, out, cfg, builtin_only,
                        partitions or max(1, int(ray.cluster_resources().get("CPU", 1))),
                        progress, fault)
        manifest["seconds"] = time.perf_counter() - t0
        atomic_write_text(out / local.MANIFEST, json.dumps(manifest, indent=2))
        return manifest
    except BaseException as e:
        # No resume state on this engine: a failed run removes what it wrote.
        local.failed(out, created, e)
        raise _one_line(ray, e) from None
    finally:
        if started:
            ray.shutdown()


def _one_line(ray, error: BaseException) -> BaseException:
    """A task's ScratchError (a damaged input) as itself, and Ray's own failures (a worker
    that died more than MAX_RETRIES times, a lost node) as one line, not a remote traceback."""
    if isinstance(error, ray.exceptions.RayTaskError):
        cause = error.cause
        if isinstance(cause, ScratchError):
            return ScratchError(_first_line(cause))
        return ScratchError(f"a Ray task failed ({type(cause).__name__}: {_first_line(cause)}); "
                            "run again, or with --engine local to see where")
    if isinstance(error, ray.exceptions.RayError):
        return ScratchError(f"the Ray cluster failed the run ({_first_line(error)}); check "
                            "`ray status` and run again")
    return error


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _run(ray, parts: list[Part], tok: BPETokenizer, tokenizer_dir: Path,
         tokenizer: dict[str, bytes], out: Path, cfg: DataConfig, builtin_only: bool,
         partitions: int, progress: bool, fault: str | None) -> dict:
    remote = ray.remote(max_retries=MAX_RETRIES)
    mapper = remote(map_part).options(num_returns=3 + partitions)
    cfg_ref, tok_ref = ray.put(cfg), ray.put(tokenizer)
    rules_ref = ray.put(local.word_rules(cfg, builtin_only))
    maps = [mapper.remote(i, p, cfg_ref, tok_ref, builtin_only, rules_ref, partitions, fault)
            for i, p in enumerate(parts)]
    by_partition = [[m[3 + p] for m in maps] for p in range(partitions)]
    exact = [remote(exact_reduce).remote(*refs) for refs in by_partition] \
        if cfg.dedup.exact else []
    pairs = [remote(band_reduce).remote(len(exact), *exact, *refs) for refs in by_partition] \
        if cfg.dedup.near else []
    removed = remote(near_reduce).options(num_returns=len(parts)).remote(
        len(parts), cfg.dedup.threshold, len(exact), [m[2] for m in maps], *exact, *pairs)
    removed = removed if isinstance(removed, list) else [removed]
    del by_partition, exact, pairs

    counts = local.Counts()
    writers = {s: local.ShardWriter(out, s, cfg.shard_tokens, tok.vocab_size)
               for s in ("train", "val")}
    bar = tqdm(desc="writing", unit="part", total=len(parts), disable=not progress)
    for k, part in enumerate(parts):
        meta, tokens, (exact_dup, near_dup) = ray.get([maps[k][0], maps[k][1], removed[k]])
        maps[k] = removed[k] = None  # let the object store drop them
        _write_part(meta, tokens, exact_dup, near_dup, part, cfg, counts, writers)
        bar.update(1)
    bar.close()
    if counts.documents_kept == 0:
        for w in writers.values():
            w.close()
        raise local.no_text_left()
    for w in writers.values():
        w.close()
    return local.build_manifest(counts, writers, tok, tokenizer_dir, cfg, builtin_only, 0.0,
                                "ray")


def _write_part(meta: dict, tokens: np.ndarray, exact_dup: np.ndarray, near_dup: np.ndarray,
                part: Part, cfg: DataConfig, counts: local.Counts,
                writers: dict[str, local.ShardWriter]) -> None:
    counts.documents_in += meta["documents"]
    counts.bytes_in += meta["bytes"]
    for name, (n, b) in meta["removed"].items():
        entry = counts.removed.setdefault(name, {"documents": 0, "bytes": 0})
        entry["documents"] += n
        entry["bytes"] += b
    gone = {int(j): "exact_duplicate" for j in exact_dup.tolist()}
    gone.update({int(j): "near_duplicate" for j in near_dup.tolist()})
    bounds = meta["token_bounds"]
    for j in range(len(meta["passing"])):
        if j in gone:
            counts.remove(gone[j], int(meta["bytes_in"][j]))
            continue
        counts.documents_kept += 1
        counts.bytes_kept += int(meta["bytes_kept"][j])
        split = local.split_of(int(meta["exact"][j]), part.split, cfg.val_fraction)
        doc = tokens[bounds[j]:bounds[j + 1]]
        counts.tokens[split] += len(doc)
        writers[split].add(doc)
    for w in writers.values():
        w.flush()
