"""The quality filters against datatrove's, word splitting against spaCy's (through datatrove),
and MinHash estimates against datasketch's, on real documents and generated hard cases."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import numpy as np
import pytest

from scratchlm.data.clean import QualityFilters, resolve
from scratchlm.data.config import FilterConfig
from scratchlm.data.dedup import DedupConfig, Words, minhash_batch, permutations, shingles
from scratchlm.data.words import SYMBOLS, WordSplitter
from scratchlm.errors import ScratchError

datatrove = pytest.importorskip("datatrove")


def _chunks(items: list[str], size: int, sep: str) -> list[str]:
    return [sep.join(items[i:i + size]) for i in range(0, len(items), size)]


def _generated(base: list[str], rng: np.random.Generator, rounds: int) -> list[str]:
    """Documents built to sit on every rule's edge: repeated lines, paragraphs and n-grams at a
    spread of rates, bullets, ellipses, hashes, few stop words, citations, C4's document and
    line rules, odd whitespace and symbols. 21 a round, from texts of 80+ words."""
    docs = []
    for k in range(rounds):
        a, b = base[k % len(base)], base[(7 * k + 3) % len(base)]
        words = a.split()
        lines = [" ".join(words[i:i + 9]) for i in range(0, len(words), 9)]
        reps = int(rng.integers(1, 6))
        cut = int(rng.integers(5, 40))
        docs += [
            a + "\n\n" + "\n\n".join([b] * reps),  # repeated paragraphs
            "\n".join(lines + lines[: int(rng.integers(0, len(lines) + 1))]),  # repeated lines
            " ".join(words + words[:cut] * reps),  # repeated n-grams
            " ".join(words[:cut] + ["of the"] * int(rng.integers(1, 40)) + words[cut:]),
            "\n".join(f"{'•-'[k % 2]} {ln}" for ln in lines[: int(rng.integers(1, 30))]) + "\n"
            + "\n".join(lines[:3]),
            "\n".join(ln + ("..." if rng.random() < 0.4 else ".") for ln in lines),
            " ".join(w + (" #tag" if rng.random() < 0.12 else "") for w in words),
            " ".join(w.upper() if rng.random() < 0.5 else w for w in words),  # no stop words
            " ".join(w for w in words if w.lower() not in {"the", "of", "and", "to"}),
            "\n".join(f"{ln} [{i}] [edit]." for i, ln in enumerate(lines)),
            "\n".join(lines[:6] + ["Lorem ipsum dolor sit amet, consectetur."] + lines[6:]),
            "\n".join(lines + ["function f() { return 1; } is code."]),
            "\n".join(ln + (" We use cookies here." if i % 3 == 0 else ".")
                      for i, ln in enumerate(lines)),
            "\n".join(ln + ". Enable JavaScript now." for ln in lines[:8]),
            "\t".join(words[:60]) + "  \u00a0 " + " ".join(words[60:]) + "\n\n\n",
            " ".join(words[:30]) + " " + "x" * 1200 + ".\n" + "\n".join(lines),
            "ROMEO:\n" + "\nJULIET:\n".join(lines) + "\n[Exeunt]",
            " ".join(words[:20]) + " 1,234 5.6% $7 (8) -- 'tis don't can't U.S. e.g. ... …",
            "",
            "   ",
            " ".join(words[: int(rng.integers(1, 60))]),
        ]
    return docs


@pytest.fixture(scope="module")
def documents(shared_data: Path) -> list[str]:
    """About 2,200 documents: Austen cut into runs of 1-2 paragraphs, Tiny Shakespeare into runs
    of 8-30 lines, SMS messages in groups, and generated ones."""
    rng = np.random.default_rng(0)
    corpus = shared_data / "corpus"
    paragraphs = [p for f in ("emma.txt", "persuasion.txt")
                  for p in (corpus / "austen" / f).read_text(encoding="utf-8").split("\n\n")
                  if p.strip()]
    docs = []
    i = 0
    while i < len(paragraphs) and len(docs) < 700:
        k = int(rng.integers(1, 3))
        docs.append("\n\n".join(paragraphs[i:i + k]))
        i += k
    lines = (corpus / "tinyshakespeare.txt").read_text(encoding="utf-8").split("\n")
    i = 0
    while i < len(lines) and len(docs) < 1200:
        k = int(rng.integers(8, 30))
        docs.append("\n".join(lines[i:i + k]))
        i += k * 3
    sms = [ln.split("\t", 1)[1] for ln in (shared_data / "sms_spam" / "SMSSpamCollection")
           .read_text(encoding="utf-8").splitlines()[:1200]]
    docs += _chunks(sms, 6, "\n")
    docs += _generated([p for p in paragraphs if len(p.split()) > 80], rng, 40)
    return docs


@pytest.fixture(scope="module")
def builtin_documents() -> list[str]:
    """About 1,000 documents from the built-in corpus alone (no ../shared needed): every third
    scene cut into runs of 8-40 lines (every fourth run kept), and generated ones from its longer
    speeches."""
    from scratchlm.data.builtin import iter_scenes

    rng = np.random.default_rng(2)
    docs = []
    for scene in list(iter_scenes())[::3]:
        lines = scene.text.split("\n")
        i = 0
        while i < len(lines):
            k = int(rng.integers(8, 40))
            docs.append("\n".join(lines[i:i + k]))
            i += k
    docs = docs[::4]
    speeches = [" ".join(p.split("\n")[1:]) for d in docs for p in d.split("\n\n")]
    docs += _generated([s for s in speeches if len(s.split()) > 80], rng, 20)
    return docs


class _FastSpacy:
    """datatrove's word splitter without its spaCy memory zone: the zone only frees the strings
    and caches spaCy made during one call (so every call tokenizes each chunk afresh); the
    tokens are the same, and datatrove's side of an agreement test runs six times faster.
    test_word_splitting_matches_datatrove checks datatrove untouched."""

    def __enter__(self) -> None:
        from datatrove.utils.word_tokenizers import load_word_tokenizer

        self.nlp = load_word_tokenizer("en").tokenizer
        self.nlp.memory_zone = contextlib.nullcontext

    def __exit__(self, *exc) -> None:
        del self.nlp.memory_zone  # the class's method again


def _datatrove_verdicts(docs: list[str], steps: list) -> list[tuple[str | None, str]]:
    from datatrove.data import Document

    out = []
    with _FastSpacy():
        for i, text in enumerate(docs):
            doc = Document(text=text, id=str(i))
            reason = None
            for step in steps:
                result = step.filter(doc)
                if result is not True:
                    reason = result[1]
                    break
            out.append((reason, doc.text))
    return out


def _web_steps() -> list:
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    return [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter()]


def _assert_agree(docs: list[str], cfg: FilterConfig, steps: list) -> set[str | None]:
    """Our verdict, failing rule and text (C4 drops lines) equal datatrove's for every document;
    returns the rules seen."""
    want = _datatrove_verdicts(docs, steps)
    failures, texts = QualityFilters(cfg)(docs)
    got = list(zip(failures, texts))
    wrong = [(i, want[i][0], got[i][0]) for i in range(len(docs)) if want[i] != got[i]]
    assert not wrong, f"{len(wrong)} disagreements, first: {wrong[:5]}"
    return {r for r, _ in want}


@pytest.mark.slow
def test_web_preset_agrees_with_datatrove(documents: list[str]) -> None:
    """FineWeb's three filters in FineWeb's order: the same verdict, the same failing rule and
    the same text for every document."""
    docs = [d for d in documents if d.strip()]  # datatrove divides by zero on blank text
    assert len(docs) >= 2000
    reasons = _assert_agree(docs, FilterConfig(preset="web", normalize=False), _web_steps())
    # the documents reach most rules, so the agreement says something about each
    assert len(reasons) >= 15 and None in reasons, reasons


@pytest.mark.slow
def test_web_preset_agrees_with_datatrove_on_the_builtin_corpus(
        builtin_documents: list[str]) -> None:
    """The same without ../shared: the built-in plays cut into documents, and generated ones."""
    docs = [d for d in builtin_documents if d.strip()]
    assert len(docs) >= 800
    reasons = _assert_agree(docs, FilterConfig(preset="web", normalize=False), _web_steps())
    assert len(reasons) >= 12 and None in reasons, reasons


def test_books_preset_agrees_with_datatrove_configured_alike(
        builtin_documents: list[str]) -> None:
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

    docs = [d for d in builtin_documents if d.strip()][::2]
    steps = [GopherRepetitionFilter(dup_line_frac=None),
             GopherQualityFilter(max_non_alpha_words_ratio=0.6)]
    reasons = _assert_agree(docs, FilterConfig(preset="books", normalize=False), steps)
    assert len(reasons) >= 8 and None in reasons, reasons


def _check_words(documents: list[str], min_chunks: int) -> None:
    """Our words against spaCy's on every distinct whitespace-free chunk, against datatrove's
    split_into_words (untouched, memory zone and all) on whole documents, and our sentence
    counts against its split_into_sentences on lines."""
    from datatrove.utils.text import split_into_sentences, split_into_words

    splitter = WordSplitter("spacy")
    spacy = pytest.importorskip("spacy")
    tokenizer = spacy.blank("en").tokenizer
    odd = ":) (:) :-) ''Tis id. o.O (8) ^_^ (^_^) 10a.m. 'em Emma--cannot 6pm..:-) k...i'm"
    chunks = sorted({c for d in [*documents, odd] for c in d.split()})
    assert len(chunks) > min_chunks
    ids, bounds = splitter.split(chunks)  # every distinct chunk, each once, as one text each
    ours = [splitter.strings[i] for i in ids.tolist()]
    for k, chunk in enumerate(chunks):
        assert ours[bounds[k]:bounds[k + 1]] == [t.text for t in tokenizer(chunk)], chunk
    docs = documents[::15]
    for text in docs:
        assert splitter.words(text) == split_into_words(text)
    lines = [ln.strip() for d in documents[::3] for ln in d.splitlines() if ln.strip()][:2000]
    lines += ["Hi.  There\t you. Ok", "A. . B", "x.\u00a0y z", "One! Two? three... Four"]
    for line in lines:
        assert splitter.sentences(line) == len(split_into_sentences(line)), line


@pytest.mark.slow
def test_word_splitting_matches_datatrove(documents: list[str]) -> None:
    _check_words(documents, 20_000)


def test_word_splitting_matches_datatrove_on_the_builtin_corpus(
        builtin_documents: list[str]) -> None:
    _check_words(builtin_documents, 10_000)


def test_symbols_are_datatrove_punctuation() -> None:
    from datatrove.utils.text import PUNCTUATION_SET

    assert SYMBOLS == PUNCTUATION_SET


def test_batch_verdicts_are_each_documents(documents: list[str]) -> None:
    """A batch shares one word cache and one numpy pass; no n-gram reaches across documents."""
    filters = QualityFilters(FilterConfig(preset="web"))
    docs = documents[-400:]
    together = filters(docs)
    alone = [filters([d]) for d in docs]
    assert together[0] == [a[0][0] for a in alone]
    assert together[1] == [a[1][0] for a in alone]
    words = "alpha bravo charlie delta echo foxtrot golf hotel".split()
    pair = [" ".join(words + words[:3]), " ".join(words[3:] + ["india"] * 3)]
    only_dup = FilterConfig(preset="web", steps=["gopher_repetition"])
    only_dup.gopher_repetition.top_n_grams = []
    assert QualityFilters(only_dup)(pair)[0] == [None, None]
    assert QualityFilters(only_dup)([" ".join(pair)])[0] == ["duplicated_5_n_grams"]


def test_presets_resolve() -> None:
    web = resolve(FilterConfig(preset="auto"))
    books = resolve(FilterConfig(preset="auto"), builtin_only=True)
    assert web.steps == ("gopher_repetition", "gopher_quality", "c4")
    assert books.steps == ("gopher_repetition", "gopher_quality")
    assert web.gopher_repetition.dup_line_frac == 0.3 and books.gopher_repetition.dup_line_frac == 0
    mine = FilterConfig(preset="books")
    mine.gopher_quality.max_non_alpha_words_ratio = 0.7
    assert resolve(mine).gopher_quality.max_non_alpha_words_ratio == 0.7
    assert resolve(mine).gopher_quality.min_doc_words == 50
    with pytest.raises(ScratchError, match="not one of"):
        FilterConfig(preset="fineweb")
    with pytest.raises(ScratchError, match="unknown filter 'gopher'"):
        FilterConfig(steps=["gopher"])


def test_builtin_plays_keep_their_speakers_under_books() -> None:
    """The books preset never edits a text; C4 (web) would delete every speaker line."""
    from scratchlm.data.builtin import iter_scenes

    scenes = [s.text.strip() for s, _ in zip(iter_scenes(), range(40))]
    failures, texts = QualityFilters(FilterConfig(preset="books"))(scenes)
    assert texts == scenes and sum(f is None for f in failures) >= 35
    web_failures, web_texts = QualityFilters(FilterConfig(preset="web"))(scenes)
    web_kept = [t for f, t in zip(web_failures, web_texts) if f is None]
    speaker = re.compile(r"^[A-Z][A-Z ]+:$", re.M)
    assert all(speaker.search(t) for t in scenes)
    assert web_kept and not any(speaker.search(t) for t in web_kept)


# ------------------------------------------------------------------------------------------------
# MinHash against datasketch


def test_minhash_estimates_agree_with_datasketch(documents: list[str]) -> None:
    """Edited copies of real paragraphs at a spread of similarities: our estimate and
    datasketch's (same shingles, 128 permutations each) both lie within sampling error of the
    true Jaccard similarity, and within the error of their difference of each other."""
    datasketch = pytest.importorskip("datasketch")
    rng = np.random.default_rng(1)
    cfg = DedupConfig()
    perms = permutations(cfg)
    bases = [d for d in documents[:900] if 150 <= len(d.split()) <= 600][:120]
    vocab = sorted({w for d in bases for w in d.split()})
    pairs = []
    for base in bases:
        words = base.split()
        for pos in rng.choice(len(words), size=int(rng.choice([2, 5, 10, 20, 40])),
                              replace=False):
            words[pos] = vocab[rng.integers(len(vocab))]
        pairs.append((base, " ".join(words)))
    batch = Words.of([t for p in pairs for t in p])
    ours = minhash_batch(batch, cfg, perms)
    x, bounds = shingles(batch, cfg.shingle)
    sets = [set(x[bounds[i]:bounds[i + 1]].tolist()) for i in range(len(bounds) - 1)]
    misses = 0
    for k in range(len(pairs)):
        a, b = sets[2 * k], sets[2 * k + 1]
        truth = len(a & b) / len(a | b)
        ma = datasketch.MinHash(num_perm=cfg.num_perm, seed=1)
        mb = datasketch.MinHash(num_perm=cfg.num_perm, seed=1)
        ma.update_batch([v.to_bytes(4, "little") for v in a])
        mb.update_batch([v.to_bytes(4, "little") for v in b])
        theirs = ma.jaccard(mb)
        mine = float(np.mean(ours[2 * k] == ours[2 * k + 1]))
        sigma = max(np.sqrt(truth * (1 - truth) / cfg.num_perm), 1 / cfg.num_perm)
        misses += abs(mine - truth) > 3 * sigma
        assert abs(theirs - truth) <= 4 * sigma + 1e-9
        assert abs(mine - theirs) <= 4 * np.sqrt(2) * sigma + 1e-9
    assert misses <= 2  # 3 sigma: about 1 in 370 by chance
    truths = [len(sets[2 * k] & sets[2 * k + 1]) / len(sets[2 * k] | sets[2 * k + 1])
              for k in range(len(pairs))]
    assert min(truths) < 0.5 < 0.9 < max(truths)  # a spread of similarities was tested
