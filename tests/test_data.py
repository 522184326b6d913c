"""The data pipeline: readers, filters, dedup quality, shards, resumable prepare, the loader."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from scratchlm.data import prepare as prepare_mod
from scratchlm.data.clean import (
    FilterConfig,
    clean,
    normalize_text,
    quality_failure,
)
from scratchlm.data.dedup import (
    DedupConfig,
    ExactIndex,
    NearDuplicateIndex,
    SortedRuns,
    Words,
    minhash,
    minhash_batch,
    permutations,
    shingle_hashes,
)
from scratchlm.data.loader import TokenLoader, iter_eval_windows
from scratchlm.data.prepare import DataConfig, prepare
from scratchlm.data.readers import iter_documents
from scratchlm.data.shards import open_shard, read_header, write_shard
from scratchlm.errors import ScratchError
from scratchlm.tokenizer import BPETokenizer
from scratchlm.utils import atomic_write_text, stale_temporaries


def books() -> FilterConfig:
    """Paragraphs of prose: the books preset (web's C4 rules want five sentences each)."""
    return FilterConfig(preset="books")


@pytest.fixture(scope="module")
def austen_paragraphs(shared_data: Path) -> list[str]:
    """Real prose documents: Austen paragraphs of 120 words or more."""
    text = (shared_data / "corpus" / "austen" / "emma.txt").read_text(encoding="utf-8")
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    return [p for p in paras if len(p.split()) >= 120]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, shakespeare: str) -> Path:
    out = tmp_path_factory.mktemp("tok")
    BPETokenizer.train(shakespeare, 1000, progress=False).save(out)
    return out


# ------------------------------------------------------------------------------------------------
# readers


def test_readers_all_formats(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    (tmp_path / "a.txt").write_text("first document\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("one\n===\ntwo\n===\nthree", encoding="utf-8")
    rows = [{"text": "json one", "id": 1}, {"text": "json two", "id": 2}]
    lines = "\n".join(json.dumps(r) for r in rows) + "\n\n"
    (tmp_path / "c.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    (tmp_path / "e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pq.write_table(pa.table({"text": ["pq one", None, "pq two"]}), tmp_path / "f.parquet")

    docs = list(iter_documents([tmp_path / "a.txt"]))
    assert [d.text for d in docs] == ["first document\n"]
    docs = list(iter_documents([tmp_path / "b.txt"], separator="\n===\n"))
    assert [d.text for d in docs] == ["one", "two", "three"]
    for name in ["c.jsonl", "d.jsonl.gz", "e.jsonl.zst"]:
        docs = list(iter_documents([tmp_path / name]))
        assert [d.text for d in docs] == ["json one", "json two"] and docs[1].meta == {"id": 2}
    assert [d.text for d in iter_documents([tmp_path / "f.parquet"])] == ["pq one", "pq two"]
    assert len(list(iter_documents([str(tmp_path / "*.jsonl*")]))) == 6
    assert len(list(iter_documents([tmp_path]))) == 1 + 1 + 6 + 2  # b.txt is one document


def test_reader_errors(tmp_path: Path) -> None:
    with pytest.raises(ScratchError, match="no such file"):
        list(iter_documents([tmp_path / "missing.txt"]))
    with pytest.raises(ScratchError, match="matches no file"):
        list(iter_documents([str(tmp_path / "*.jsonl")]))
    (tmp_path / "x.jsonl").write_text('{"body": "a"}\n')
    with pytest.raises(ScratchError, match=r"x.jsonl:1: no field 'text' \(found \['body'\]\)"):
        list(iter_documents([tmp_path / "x.jsonl"]))
    (tmp_path / "y.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(ScratchError, match="y.jsonl:2: not valid JSON"):
        list(iter_documents([tmp_path / "y.jsonl"]))
    (tmp_path / "z.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ScratchError, match="z.txt: not valid UTF-8 at byte offset 3"):
        list(iter_documents([tmp_path / "z.txt"]))
    assert list(iter_documents([tmp_path / "z.txt"], errors="replace"))[0].text == "caf\ufffd"
    (tmp_path / "p.parquet").write_bytes(b"not parquet")
    with pytest.raises(ScratchError, match="not a readable Parquet file"):
        list(iter_documents([tmp_path / "p.parquet"]))



def test_truncated_or_damaged_compressed_input_is_one_line(tmp_path: Path) -> None:
    """A cut .gz or .zst is an error naming the file, never its first half read as a whole
    (zstandard's own stream reader ends quietly at a cut); a file of several zstd frames is
    read whole."""
    import zstandard

    lines = "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(3000))
    data = lines.encode()
    zst = zstandard.ZstdCompressor()
    gz = gzip.compress(data)
    cases = {"cut.jsonl.gz": gz[:len(gz) // 2], "cut.txt.gz": gz[:-8],
             "cut.jsonl.zst": zst.compress(data)[:-100], "cut.txt.zst": zst.compress(data)[:-3],
             "junk.txt.gz": b"not gzip", "junk.jsonl.zst": b"not zstd at all"}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        kind = name.rsplit(".", 1)[1]
        with pytest.raises(ScratchError, match=rf"{name}: the {kind} stream is truncated or "
                                               "damaged .*; download or compress it again"):
            list(iter_documents([tmp_path / name]))
    half = len(data) // 2
    cut = data.rindex(b"\n", 0, half) + 1
    (tmp_path / "frames.jsonl.zst").write_bytes(zst.compress(data[:cut]) + zst.compress(data[cut:]))
    assert len(list(iter_documents([tmp_path / "frames.jsonl.zst"]))) == 3000
    (tmp_path / "empty.txt.zst").write_bytes(b"")
    assert [d.text for d in iter_documents([tmp_path / "empty.txt.zst"])] == [""]

# ------------------------------------------------------------------------------------------------
# cleaning and filters


def test_normalize_text() -> None:
    raw = "Cafe\u0301\r\n\x00tab\there   and\u200b there  \n\n\n\n\nend \ufeff"
    assert normalize_text(raw) == "Café\ntab here and there\n\nend"
    cfg = FilterConfig(boilerplate=["use cookies"])
    assert clean("keep me\nWe use cookies on this site.\nand me", cfg) == "keep me\nand me"


def test_each_rule_catches_its_case(austen_paragraphs: list[str]) -> None:
    """A few hand-made cases, each failing the rule it names under the web preset (the full
    agreement with datatrove is in test_data_filters.py)."""
    cfg = FilterConfig(preset="web")
    good = "\n".join(austen_paragraphs[:3])
    assert quality_failure(good, cfg) is None
    cases = {
        "gopher_short_doc": " ".join(good.split()[:40]),
        "top_2_gram": " ".join(["of the"] * 60) + " " + good[:300],
        "duplicated_5_n_grams": " ".join(good.split() + good.split()[:150]),
        "dup_line_frac": "\n".join(["The same line, over and over again."] * 20 + [good]),
        "gopher_too_many_bullets": "\n".join(f"- {' '.join(good.split()[9 * i:9 * i + 9])}"
                                             for i in range(40)),
        "too_few_sentences": good.replace(".", ""),
        "curly_bracket": good + "\nA line with {braces} in it ends here.",
    }
    for name, text in cases.items():
        assert quality_failure(text, cfg) == name, name
    assert all(quality_failure(t, FilterConfig(preset="none")) is None for t in cases.values())


# ------------------------------------------------------------------------------------------------
# deduplication with planted near-duplicates


def test_minhash_of_a_batch_is_each_documents(austen_paragraphs: list[str]) -> None:
    cfg = DedupConfig()
    perms = permutations(cfg)
    long = " ".join(austen_paragraphs[:120])  # more shingles than one hashing block (8,192)
    assert len(long.split()) > 9000
    for docs in ([austen_paragraphs[0], long, *austen_paragraphs[1:5]],
                 ["two words", austen_paragraphs[0], "x"]):  # fewer words than a shingle
        batch = minhash_batch(Words.of(docs), cfg, perms)
        assert np.array_equal(batch, np.stack([minhash(d, cfg, perms) for d in docs]))
    assert (batch[0] != batch[2]).all() and len(set(batch[1].tolist())) > 100


@pytest.mark.parametrize("spill", [False, True])
def test_sorted_runs_find_what_a_dict_finds(tmp_path: Path, spill: bool) -> None:
    rng = np.random.default_rng(0)
    runs = SortedRuns(tmp_path / "runs" if spill else None, in_memory=3000)
    truth: dict[int, list[int]] = {}
    for batch in range(40):
        keys = rng.integers(0, 5000, size=300).astype(np.uint64)  # many repeats
        values = np.arange(batch * 300, batch * 300 + 300)
        runs.add(keys, values)
        for k, v in zip(keys.tolist(), values.tolist()):
            truth.setdefault(k, []).append(v)
        queries = rng.integers(0, 6000, size=200).astype(np.uint64)
        where, found = runs.find(queries)
        got = {}
        for i, v in zip(where.tolist(), found.tolist()):
            got.setdefault(i, []).append(v)
        want = {i: truth[q] for i, q in enumerate(queries.tolist()) if q in truth}
        assert {i: sorted(v) for i, v in got.items()} == {i: sorted(v) for i, v in want.items()}
        assert runs.contains(queries).tolist() == [q in truth for q in queries.tolist()]
    assert len(runs) == 40 * 300 and len(runs.runs) <= 8  # O(log n) runs
    if spill:  # the large runs live in memory-mapped files
        assert any(isinstance(k, np.memmap) for k, _ in runs.runs)
        assert len(list((tmp_path / "runs").glob("*.keys"))) == sum(
            isinstance(k, np.memmap) for k, _ in runs.runs)


def test_exact_index_rebuilds_from_its_log(tmp_path: Path) -> None:
    index = ExactIndex(tmp_path / "exact.log")
    keys = np.array([5, 7, 5, 9], dtype=np.uint64)
    assert index.dedup(keys, np.arange(4)).tolist() == [False, False, True, False]
    assert index.dedup(np.array([9, 11], np.uint64), np.arange(4, 6)).tolist() == [True, False]
    index.close()
    again = ExactIndex(tmp_path / "exact.log", keep=2)  # the first two records: 5 and 7
    assert again.dedup(np.array([7, 9, 5], np.uint64), np.arange(3)).tolist() == [True, False,
                                                                                  True]
    again.close()
    with pytest.raises(ScratchError, match="fewer records than the saved progress"):
        ExactIndex(tmp_path / "exact.log", keep=50)


def shingle_set(text: str) -> set[int]:
    return set(shingle_hashes(text, 5).tolist())


def jaccard(a: str, b: str) -> float:
    x, y = shingle_set(a), shingle_set(b)
    return len(x & y) / len(x | y)


def test_minhash_estimates_jaccard(austen_paragraphs: list[str]) -> None:
    cfg = DedupConfig()
    perms = permutations(cfg)
    a = austen_paragraphs[3]
    words = a.split()
    b = " ".join(words[:len(words) // 2] + ["changed"] + words[len(words) // 2 + 1:])
    est = np.mean(minhash(a, cfg, perms) == minhash(b, cfg, perms))
    assert abs(est - jaccard(a, b)) < 0.1
    assert np.mean(minhash(a, cfg, perms) == minhash(austen_paragraphs[4], cfg, perms)) < 0.05


def test_planted_near_duplicates_recall_and_precision(austen_paragraphs: list[str]) -> None:
    """Edited copies at known Jaccard similarity: pairs above 0.9 must be found (recall), and
    what is removed must really be near-duplicates (precision)."""
    rng = np.random.default_rng(0)
    bases = austen_paragraphs[:300]
    vocab = sorted({w for p in bases for w in p.split()})
    docs, twin_of = list(bases), {}
    for i, base in enumerate(bases):
        words = base.split()
        edits = int(rng.choice([1, 2, 4, 8, 16]))  # a spread of similarities, 0.9+ down to ~0.4
        for pos in rng.choice(len(words), size=edits, replace=False):
            words[pos] = vocab[rng.integers(len(vocab))]
        twin_of[len(docs)] = i
        docs.append(" ".join(words))
    order = rng.permutation(len(docs))
    cfg = DedupConfig()
    perms = permutations(cfg)
    sigs = np.stack([minhash(docs[d], cfg, perms) for d in order])

    def run(batch: int) -> dict[int, int]:
        """doc -> the kept doc it duplicates, looking documents up `batch` at a time."""
        index, kept, removed = NearDuplicateIndex(cfg), [], {}
        for lo in range(0, len(order), batch):
            for d, hit in zip(order[lo:lo + batch], index.dedup(sigs[lo:lo + batch])):
                if hit < 0:
                    kept.append(int(d))  # kept documents are numbered in order
                else:
                    removed[int(d)] = kept[hit]
        assert index.size == len(kept)
        return removed

    removed = run(64)
    assert run(1) == removed  # a batch looks up against itself as one-by-one lookups would
    pairs = [(c, b) for c, b in twin_of.items()]
    sims = {p: jaccard(docs[p[0]], docs[p[1]]) for p in pairs}
    high = [p for p in pairs if sims[p] > 0.9]
    found = [p for p in high if p[0] in removed or p[1] in removed]
    assert len(high) >= 50 and len(found) / len(high) >= 0.95
    true_dups = [d for d, k in removed.items() if jaccard(docs[d], docs[k]) >= 0.7]
    assert len(removed) >= 50 and len(true_dups) / len(removed) >= 0.95
    low = [p for p in pairs if sims[p] < 0.5]
    assert low and not any(p[0] in removed or p[1] in removed for p in low)


# ------------------------------------------------------------------------------------------------
# shards


def test_shard_round_trip_and_corruption(tmp_path: Path) -> None:
    small = np.arange(1000, dtype=np.uint32) % 50257
    write_shard(tmp_path / "s.bin", small, 50257)
    assert read_header(tmp_path / "s.bin") == (2, 1000, 50257)
    assert np.array_equal(open_shard(tmp_path / "s.bin"), small)
    big = np.array([0, 70000, 100255], dtype=np.uint32)
    write_shard(tmp_path / "b.bin", big, 100256)
    assert read_header(tmp_path / "b.bin")[0] == 4
    assert np.array_equal(open_shard(tmp_path / "b.bin"), big)
    data = (tmp_path / "s.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(data[:-10])
    with pytest.raises(ScratchError, match="truncated"):
        open_shard(tmp_path / "t.bin")
    (tmp_path / "f.bin").write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ScratchError, match="foreign or corrupt"):
        open_shard(tmp_path / "f.bin")


# ------------------------------------------------------------------------------------------------
# prepare


def test_prepare_counts_and_shards(tmp_path: Path, tok_dir: Path, shared_data: Path) -> None:
    corpus = shared_data / "corpus" / "austen"
    cfg = DataConfig(separator="\n\n", workers=1, filters=books(),
                     shard_tokens=100_000, val_fraction=0.05)
    cfg.filters.gopher_quality.min_doc_words = 20
    m = prepare([corpus, corpus / "emma.txt"], tok_dir, tmp_path / "d", cfg, progress=False)
    removed = sum(r["documents"] for r in m["removed"].values())
    assert m["documents_in"] == m["documents_kept"] + removed
    # emma.txt is read twice: every one of its kept paragraphs is an exact duplicate the 2nd time
    assert m["removed"]["exact_duplicate"]["documents"] >= 1000
    assert m["removed"]["gopher_short_doc"]["documents"] > 0
    assert sum(s["tokens"] for s in m["shards"]) == m["tokens"] == m["tokens_train"] + m[
        "tokens_val"]
    assert 0.02 < m["tokens_val"] / m["tokens"] < 0.09
    eot = m["tokenizer"]["eot_id"]
    tok = BPETokenizer.load(tok_dir)
    first = open_shard(tmp_path / "d" / m["shards"][0]["file"])
    assert first[0] == eot and (first == eot).sum() > 10
    doc = first[1:int(np.flatnonzero(first[1:] == eot)[0]) + 1]
    assert len(tok.decode(doc.tolist()).split()) >= 20
    with pytest.raises(ScratchError, match="already holds prepared data"):
        prepare([corpus], tok_dir, tmp_path / "d", cfg, progress=False)


@pytest.mark.parametrize("when", ["before", "after"])
def test_prepare_resumes_after_a_crash(tmp_path: Path, tok_dir: Path, shared_data: Path,
                                       monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """Killed as the fourth shard is finished: before its rename, or after it but before the
    state that records it is saved (the state then counts it as partial)."""
    corpus = [shared_data / "corpus" / "austen" / f for f in ("persuasion.txt",
                                                             "northangerabbey.txt")]
    cfg = DataConfig(separator="\n\n", workers=1, filters=books(),
                     shard_tokens=25_000, val_fraction=0.05)
    whole = prepare(corpus, tok_dir, tmp_path / "whole", cfg, progress=False)
    real_finish, calls = prepare_mod.finish_shard, []

    def crash_after_three(shard):
        if len(calls) == 3:
            if when == "after":
                real_finish(shard)
            raise KeyboardInterrupt  # as if the process died here
        calls.append(shard.path)
        return real_finish(shard)

    monkeypatch.setattr(prepare_mod, "finish_shard", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, tok_dir, tmp_path / "again", cfg, progress=False)
    assert not (tmp_path / "again" / "manifest.json").exists()
    # What a kill inside the state's atomic write leaves: its temporary, never renamed (a
    # name written by hand here once matched the clean-up's pattern and not the real one).
    with monkeypatch.context() as m:
        m.setattr(os, "replace", lambda src, dst: None)  # killed before the rename
        atomic_write_text(tmp_path / "again" / prepare_mod.STATE, '{"key": ')
    assert len(stale_temporaries(tmp_path / "again" / prepare_mod.STATE)) == 1
    monkeypatch.setattr(prepare_mod, "finish_shard", real_finish)
    resumed = prepare(corpus, tok_dir, tmp_path / "again", cfg, progress=False)
    assert not list((tmp_path / "again").glob(".*"))  # no partial, state or temporary left
    assert [s["file"] for s in resumed["shards"]] == [s["file"] for s in whole["shards"]]
    for s in whole["shards"]:
        assert (tmp_path / "whole" / s["file"]).read_bytes() == (
            tmp_path / "again" / s["file"]).read_bytes()
    for key in ["documents_in", "documents_kept", "tokens", "removed"]:
        assert resumed[key] == whole[key]


def _austen_jsonl(shared_data: Path, path: Path, files: tuple[str, ...]) -> Path:
    paras = [p for f in files for p in (shared_data / "corpus" / "austen" / f)
             .read_text(encoding="utf-8").split("\n\n")]
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paras), encoding="utf-8")
    return path


def _same_shards(a: Path, b: Path) -> None:
    ma = json.loads((a / "manifest.json").read_text())
    mb = json.loads((b / "manifest.json").read_text())
    for key in ("documents_in", "documents_kept", "tokens", "removed", "shards"):
        assert ma[key] == mb[key], key
    for s in ma["shards"]:
        assert (a / s["file"]).read_bytes() == (b / s["file"]).read_bytes()
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


def test_failed_prepare_leaves_its_resume_state_or_nothing(tmp_path: Path, tok_dir: Path,
                                                           shared_data: Path) -> None:
    """A damaged input met before any shard is done: the run's directory is gone again. Met
    after some: the error says the progress is kept, and once the input is whole the same
    command resumes to the shards of an undisturbed run."""
    good = _austen_jsonl(shared_data, tmp_path / "b.jsonl.gz.src", ("persuasion.txt",))
    whole = gzip.compress(good.read_bytes())
    first = _austen_jsonl(shared_data, tmp_path / "a.jsonl", ("northangerabbey.txt",))
    damaged = tmp_path / "b.jsonl.gz"
    damaged.write_bytes(whole[:2000])  # a few thousand tokens: less than a shard
    cfg = DataConfig(workers=1, filters=books(), shard_tokens=20_000)
    with pytest.raises(ScratchError, match=r"b.jsonl.gz: the gz stream is truncated") as e:
        prepare([damaged], tok_dir, tmp_path / "early", cfg, progress=False)
    assert "resume" not in str(e.value) and not (tmp_path / "early").exists()
    with pytest.raises(ScratchError, match=r"truncated or damaged .*progress so far is kept in "
                                           ".*run the same command again to resume"):
        prepare([first, damaged], tok_dir, tmp_path / "late", cfg, progress=False)
    assert (tmp_path / "late" / prepare_mod.STATE).is_file()
    assert not (tmp_path / "late" / "manifest.json").exists()
    damaged.write_bytes(whole)
    prepare([first, damaged], tok_dir, tmp_path / "late", cfg, progress=False)
    prepare([first, damaged], tok_dir, tmp_path / "undisturbed", cfg, progress=False)
    _same_shards(tmp_path / "undisturbed", tmp_path / "late")


@pytest.mark.slow
def test_sigkill_during_prepare_ends_resumable(tmp_path: Path, tok_dir: Path,
                                               shared_data: Path) -> None:
    """`scratchlm data prepare` killed (SIGKILL: no clean-up runs) while a shard is partly
    written, and again once it has saved progress: each time the same command then finishes
    with the shards of an undisturbed run and no leftover file."""
    import signal
    import subprocess
    import sys
    import time

    from scratchlm.cli import main

    # Three novels in shards of 20k tokens: a run long enough (dozens of shards) that the
    # kill lands mid-run however fast or busy the machine is.
    src = _austen_jsonl(shared_data, tmp_path / "austen.jsonl",
                        ("persuasion.txt", "emma.txt", "northangerabbey.txt"))
    args = ["data", "prepare", "--input", str(src), "--tokenizer", str(tok_dir), "--quiet",
            "--data.workers=1", "--data.shard_tokens=20000", "--data.filters.preset=books"]
    assert main([*args, "--out", str(tmp_path / "undisturbed")]) == 0
    # Killed while a shard is partly written (one always is, from the first document on: the
    # first shard's partial file alone lives too briefly for a busy machine to catch it),
    # then once progress is saved.
    for when in (".train_*.bin.partial", prepare_mod.STATE):
        out = tmp_path / f"killed{when.replace('*', 'N')}"
        proc = subprocess.Popen([sys.executable, "-m", "scratchlm.cli", *args, "--out", str(out)])
        deadline = time.monotonic() + 120
        while not any(out.glob(when)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL  # it was killed mid-run, not finished
        assert not (out / "manifest.json").exists()
        assert main([*args, "--out", str(out)]) == 0
        _same_shards(tmp_path / "undisturbed", out)

def test_prepare_bad_input(tmp_path: Path, tok_dir: Path) -> None:
    (tmp_path / "tiny.txt").write_text("too short\n")
    with pytest.raises(ScratchError, match="no text left"):
        prepare([tmp_path / "tiny.txt"], tok_dir, tmp_path / "out",
                DataConfig(workers=1), progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob("*.bin")) and not list((tmp_path / "out").glob(".*"))
    with pytest.raises(ScratchError, match="no tokenizer here"):
        prepare([tmp_path / "tiny.txt"], tmp_path, tmp_path / "o2", progress=False)


def test_prepare_with_worker_processes_matches_one_process(tmp_path: Path, tok_dir: Path,
                                                           shared_data: Path) -> None:
    files = [shared_data / "corpus" / "austen" / "persuasion.txt"]
    cfg = DataConfig(separator="\n\n", workers=1, filters=books(), shard_tokens=1_000_000)
    one = prepare(files, tok_dir, tmp_path / "one", cfg, progress=False)
    cfg.workers = 2
    two = prepare(files, tok_dir, tmp_path / "two", cfg, progress=False)
    assert one["tokens"] == two["tokens"] and one["removed"] == two["removed"]
    for s in one["shards"]:
        assert (tmp_path / "one" / s["file"]).read_bytes() == (
            tmp_path / "two" / s["file"]).read_bytes()


# ------------------------------------------------------------------------------------------------
# the loader


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tok_dir: Path, shared_data: Path) -> Path:
    out = tmp_path_factory.mktemp("shards")
    cfg = DataConfig(separator="\n\n", workers=1, filters=books(),
                     shard_tokens=50_000, val_fraction=0.05)
    prepare([shared_data / "corpus" / "austen" / "emma.txt"], tok_dir, out, cfg, progress=False)
    return out


def test_loader_windows_are_shifted_slices(shards: Path) -> None:
    loader = TokenLoader(shards, "train", 64, 4, seed=1)
    batch = loader.next_batch()
    x, y = batch["idx"], batch["targets"]
    assert x.shape == y.shape == (4, 64) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_loader_ranks_split_the_single_process_batch(shards: Path) -> None:
    single = TokenLoader(shards, "train", 32, 8, seed=3)
    ranks = [TokenLoader(shards, "train", 32, 4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(50):  # across an epoch boundary too
        x = single.next_batch()["idx"]
        parts = [r.next_batch()["idx"] for r in ranks]
        assert torch.equal(torch.cat(parts), x)


def test_loader_resumes_exactly(shards: Path) -> None:
    a = TokenLoader(shards, "train", 64, 8, seed=0)
    for _ in range(7):
        a.next_batch()
    b = TokenLoader(shards, "train", 64, 8, seed=0)
    b.load_state_dict(a.state_dict())
    for _ in range(a.n_windows // 8 + 5):  # through the next epoch's reshuffle
        assert torch.equal(a.next_batch()["idx"], b.next_batch()["idx"])
    with pytest.raises(ScratchError, match="belongs to other data"):
        TokenLoader(shards, "train", 32, 8, seed=0).load_state_dict(a.state_dict())


def test_loader_refuses_other_tokenizer_and_tiny_splits(shards: Path) -> None:
    with pytest.raises(ScratchError, match="tokenized with another tokenizer"):
        TokenLoader(shards, "train", 64, 8, tokenizer_fingerprint="0" * 16)
    with pytest.raises(ScratchError, match="fewer than one global batch"):
        TokenLoader(shards, "val", 512, 10_000)
    with pytest.raises(ScratchError, match="no manifest.json"):
        TokenLoader(shards.parent, "train", 64, 8)


def test_eval_windows_cover_the_split_in_order(shards: Path) -> None:
    batches = list(iter_eval_windows(shards, 64, 16))
    manifest = json.loads((shards / "manifest.json").read_text())
    n_val = sum(s["tokens"] for s in manifest["shards"] if s["split"] == "val")
    windows = sum(len(x) for x, _ in batches)
    assert windows == sum((s["tokens"] - 1) // 64 for s in manifest["shards"]
                          if s["split"] == "val") and n_val > 0


def test_val_inputs_hold_out_whole_files(tmp_path: Path, tok_dir: Path,
                                         shared_data: Path) -> None:
    train, val = (shared_data / "corpus" / "austen" / f for f in ("persuasion.txt",
                                                                  "northangerabbey.txt"))
    cfg = DataConfig(separator="\n\n", workers=1, filters=books(), val_inputs=[str(val)])
    cfg.dedup.exact = cfg.dedup.near = False
    both = prepare([train], tok_dir, tmp_path / "both", cfg, progress=False)
    alone = DataConfig(separator="\n\n", workers=1, filters=books(), val_fraction=0.0)
    alone.dedup.exact = alone.dedup.near = False
    only_val = prepare([val], tok_dir, tmp_path / "val", alone, progress=False)
    only_train = prepare([train], tok_dir, tmp_path / "train", alone, progress=False)
    assert both["tokens_val"] == only_val["tokens_train"]
    assert both["tokens_train"] == only_train["tokens_train"]
