"""The from-scratch BPE against real references: a naive trainer, tiktoken, Hugging Face."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scratchlm.errors import ScratchError
from scratchlm.tokenizer import GPT2_PATTERN, GPT4_PATTERN, BPETokenizer, from_gpt2, save_gpt2
from scratchlm.tokenizer import sources as sources_mod
from scratchlm.tokenizer.fast import to_hf_tokenizer, to_tiktoken
from scratchlm.tokenizer.gpt2 import tiktoken_gpt2
from scratchlm.tokenizer.sources import iter_file_text

# Text that stresses byte-level BPE: multi-byte scripts, emoji (with ZWJ sequences and skin
# tones), combining marks, control characters, and long runs that regexes split oddly.
PIECES = ["hello", " world", "Hello", "  ", "\n", "\r\n", "\t", "1234567890", "'s", "'LL",
          "é", "e\u0301", "日本語", "한국어", "😀", "👩‍👩‍👧", "👍🏽", "\x00", "\x7f", "\u200b",
          "ﬁ", "∑", "<|endoftext|>", "<|end", "       ", "00000000000", "!!!?", "ÿ"]
fuzz_text = st.one_of(
    st.text(),  # any unicode scalar values (hypothesis leaves out surrogates)
    st.lists(st.sampled_from(PIECES), max_size=40).map("".join),
    st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=5)), max_size=30).map("".join),
)
fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def naive_train(text: str, vocab_size: int, pattern: str) -> list[tuple[int, int]]:
    """Textbook BPE: recount every pair from scratch before each merge (slow, obviously right)."""
    words = Counter(regex.findall(pattern, text))
    seqs = {w: list(w.encode()) for w in words}
    merges = []
    for new_id in range(256, vocab_size):
        counts: Counter[tuple[int, int]] = Counter()
        for w, f in words.items():
            for p in zip(seqs[w], seqs[w][1:]):
                counts[p] += f
        if not counts:
            break
        top = max(counts.values())
        pair = min(p for p, c in counts.items() if c == top)  # same tie-break as the trainer
        merges.append(pair)
        for w in seqs:
            s, out, i = seqs[w], [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == pair:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


# ------------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN], ids=["gpt2", "gpt4"])
def test_training_matches_naive_bpe(shakespeare: str, pattern: str) -> None:
    text = shakespeare[:60_000]
    tok = BPETokenizer.train(text, 256 + 300, pattern, special_tokens=(), progress=False)
    assert tok.merges == naive_train(text, 256 + 300, pattern)


def test_training_is_deterministic_and_sized(shakespeare: str, trained: BPETokenizer) -> None:
    again = BPETokenizer.train(shakespeare, 1024, "gpt4", progress=False)
    assert again.merges == trained.merges
    assert trained.vocab_size == 1024
    assert trained.special_tokens == {"<|endoftext|>": 1023}
    assert len(set(trained.vocab)) == len(trained.vocab)  # every token is a distinct byte string


def test_training_streams_files_the_same_as_text(tmp_path: Path, shakespeare: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny blocks force many reads; the learned merges must not depend on how text arrives."""
    text = shakespeare[:50_000]
    monkeypatch.setattr(sources_mod, "BLOCK_BYTES", 1000)
    # The two files are split at a line start, so they hold the same chunks as the whole text.
    cut = text.index("\n\n", 20_000) + 2
    (tmp_path / "a.txt").write_text(text[:cut], encoding="utf-8")
    (tmp_path / "b.txt").write_text(text[cut:], encoding="utf-8")
    from_files = BPETokenizer.train([tmp_path / "a.txt", tmp_path / "b.txt"], 400, progress=False)
    from_text = BPETokenizer.train(text, 400, progress=False)
    assert from_files.merges == from_text.merges


def test_special_tokens_in_training_text_are_not_learned() -> None:
    text = "<|endoftext|>abc<|endoftext|>" * 50
    tok = BPETokenizer.train(text, 300, progress=False)
    assert all(b"<|" not in t and b"|>" not in t for t in tok.vocab)


def test_training_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ScratchError, match="too small"):
        BPETokenizer.train("abc", 256, special_tokens=["<|endoftext|>"], progress=False)
    with pytest.raises(ScratchError, match="empty"):
        BPETokenizer.train("", 300, progress=False)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ScratchError, match="empty"):
        BPETokenizer.train(tmp_path / "empty.txt", 300, progress=False)
    with pytest.raises(ScratchError, match="no such file"):
        BPETokenizer.train(tmp_path / "missing.txt", 300, progress=False)
    with pytest.raises(ScratchError, match="not a valid regex"):
        BPETokenizer.train("abc", 300, pattern="(unclosed", progress=False)


def test_non_utf8_file_names_the_byte_offset(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sources_mod, "BLOCK_BYTES", 7)  # the bad byte lies in a later block
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"line one\nna" + b"\xefve caf\xe9\n")
    with pytest.raises(ScratchError, match=r"latin1.txt: not valid UTF-8 at byte offset 11"):
        list(iter_file_text(path))
    replaced = "".join(iter_file_text(path, errors="replace"))
    assert replaced == "line one\nna\ufffdve caf\ufffd\n"
    assert BPETokenizer.train(path, 260, errors="replace", progress=False).vocab_size == 260


def test_file_blocks_reassemble_exactly(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sources_mod, "BLOCK_BYTES", 5)
    text = "ab\ncdéfgh 😀\n\nlast line without newline"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    blocks = list(iter_file_text(tmp_path / "t.txt"))
    assert "".join(blocks) == text
    assert all(b.endswith("\n") for b in blocks[:-1])


# ------------------------------------------------------------------------------------------------
# encoding and decoding


@fuzz
@given(text=fuzz_text)
def test_round_trip_is_lossless(trained: BPETokenizer, gpt2_tok: BPETokenizer, text: str) -> None:
    for tok in (trained, gpt2_tok):
        ids = tok.encode(text, disallowed_special=())
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_round_trip_on_hard_strings(trained: BPETokenizer) -> None:
    for text in ["", " " * 1000, "9" * 1000, "\n" * 50, "".join(PIECES) * 3, "a\u0300" * 100]:
        assert trained.decode(trained.encode(text, disallowed_special=())) == text


def test_special_tokens_refused_unless_allowed(trained: BPETokenizer) -> None:
    text = "To be<|endoftext|>or not"
    with pytest.raises(ScratchError, match="special token '<\\|endoftext\\|>'"):
        trained.encode(text)
    ids = trained.encode(text, allowed_special={"<|endoftext|>"})
    assert ids.count(1023) == 1 and trained.decode(ids) == text
    assert trained.encode(text, allowed_special="all") == ids
    as_text = trained.encode(text, disallowed_special=())
    assert 1023 not in as_text and trained.decode(as_text) == text
    with pytest.raises(ScratchError, match="does not have"):
        trained.encode("x", allowed_special={"<|im_start|>"})


def test_lone_surrogate_is_a_clear_error(trained: BPETokenizer) -> None:
    with pytest.raises(ScratchError, match="surrogate"):
        trained.encode("abc\ud800")


def test_decode_unknown_id_and_partial_utf8(trained: BPETokenizer) -> None:
    with pytest.raises(ScratchError, match="outside this tokenizer's vocabulary"):
        trained.decode([5000])
    ids = trained.encode("😀")
    assert trained.decode(ids[:1]).endswith("\ufffd")  # a cut-off character is replaced


def test_encode_batch_fast_equals_reference(trained: BPETokenizer, shakespeare: str) -> None:
    texts = [shakespeare[i:i + 3000] for i in range(0, 60_000, 3000)] + ["", "<|endoftext|> x"]
    assert trained.encode_batch(texts, fast=True, allowed_special="all") == trained.encode_batch(
        texts, fast=False, allowed_special="all")
    with pytest.raises(ScratchError, match="special token"):
        trained.encode_batch(["<|endoftext|>"], fast=True)


# ------------------------------------------------------------------------------------------------
# GPT-2 compatibility: identical ids to tiktoken's gpt2 encoding


def test_gpt2_matches_tiktoken_on_corpora(gpt2_tok: BPETokenizer, gpt2_dir: Path,
                                          shared_data: Path) -> None:
    ref = tiktoken_gpt2(gpt2_dir)
    assert gpt2_tok.vocab_size == ref.n_vocab == 50257
    texts = [(shared_data / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")]
    texts += [p.read_text(encoding="utf-8")[:300_000]
              for p in sorted((shared_data / "corpus" / "austen").glob("*.txt"))]
    texts.append((shared_data / "instruct" / "instruction-data.json").read_text(encoding="utf-8"))
    for text in texts:
        assert gpt2_tok.encode_ordinary(text) == ref.encode_ordinary(text)
    assert gpt2_tok.encode("a<|endoftext|>b", allowed_special="all") == ref.encode(
        "a<|endoftext|>b", allowed_special="all")


@fuzz
@given(text=fuzz_text)
def test_gpt2_matches_tiktoken_fuzzed(gpt2_tok: BPETokenizer, gpt2_dir: Path, text: str) -> None:
    ref = _tiktoken_gpt2_cached(gpt2_dir)
    assert gpt2_tok.encode_ordinary(text) == ref.encode_ordinary(text)


_REF: dict = {}


def _tiktoken_gpt2_cached(gpt2_dir: Path):
    if "gpt2" not in _REF:
        _REF["gpt2"] = tiktoken_gpt2(gpt2_dir)
    return _REF["gpt2"]


def test_gpt2_files_round_trip(gpt2_tok: BPETokenizer, gpt2_dir: Path, tmp_path: Path) -> None:
    save_gpt2(gpt2_tok, tmp_path)
    again = from_gpt2(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    assert again.merges == gpt2_tok.merges and again.byte_ids == gpt2_tok.byte_ids
    assert again.special_tokens == gpt2_tok.special_tokens
    assert (tmp_path / "vocab.bpe").read_text().split("\n")[1:50001] == (
        gpt2_dir / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:50001]


def test_gpt2_bad_files(tmp_path: Path, gpt2_dir: Path) -> None:
    with pytest.raises(ScratchError, match="not found"):
        from_gpt2(tmp_path / "encoder.json", gpt2_dir / "vocab.bpe")
    (tmp_path / "vocab.bpe").write_text("Ġ t\n")
    with pytest.raises(ScratchError, match="#version"):
        from_gpt2(gpt2_dir / "encoder.json", tmp_path / "vocab.bpe")


# ------------------------------------------------------------------------------------------------
# fast backends: same merges, same ids


@pytest.fixture(scope="module")
def trained_gpt2_pattern(shakespeare: str) -> BPETokenizer:
    return BPETokenizer.train(shakespeare, 2000, "gpt2", progress=False)


def test_fast_backends_match_reference_on_corpora(trained, trained_gpt2_pattern, gpt2_tok,
                                                  shared_data: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    emma = (shared_data / "corpus" / "austen" / "emma.txt").read_text(encoding="utf-8")[:400_000]
    for k, tok in enumerate([trained, trained_gpt2_pattern, gpt2_tok]):
        tok.save(tmp_path / str(k))
        hf = Tokenizer.from_file(str(tmp_path / str(k) / "tokenizer.json"))
        ref = tok.encode_ordinary(emma)
        assert to_tiktoken(tok).encode_ordinary(emma) == ref
        assert hf.encode(emma).ids == ref
        assert hf.decode(ref) == emma


@fuzz
@given(text=fuzz_text)
def test_fast_backends_match_reference_fuzzed(trained, trained_gpt2_pattern, text) -> None:
    for tok in (trained, trained_gpt2_pattern):
        hf = _hf_cached(tok)
        ref = tok.encode(text, allowed_special="all")
        assert to_tiktoken(tok).encode(text, allowed_special="all") == ref
        assert hf.encode(text).ids == ref


_HF: dict = {}


def _hf_cached(tok: BPETokenizer):
    if id(tok) not in _HF:
        _HF[id(tok)] = to_hf_tokenizer(tok)
    return _HF[id(tok)]


# ------------------------------------------------------------------------------------------------
# persistence


def test_save_load_round_trip(trained: BPETokenizer, tmp_path: Path) -> None:
    path = trained.save(tmp_path / "tok")
    assert path.name == "bpe.json" and (tmp_path / "tok" / "tokenizer.json").is_file()
    loaded = BPETokenizer.load(tmp_path / "tok")
    assert loaded.merges == trained.merges and loaded.pattern == trained.pattern
    assert loaded.special_tokens == trained.special_tokens
    assert not list((tmp_path / "tok").glob(".*tmp"))  # atomic writes leave no temporaries


def test_load_bad_directories(tmp_path: Path, trained: BPETokenizer) -> None:
    with pytest.raises(ScratchError, match="no tokenizer here"):
        BPETokenizer.load(tmp_path)
    (tmp_path / "bpe.json").write_text("{not json")
    with pytest.raises(ScratchError, match="not a readable tokenizer"):
        BPETokenizer.load(tmp_path)
    (tmp_path / "bpe.json").write_text('{"format": "other"}')
    with pytest.raises(ScratchError, match="not a scratchlm tokenizer"):
        BPETokenizer.load(tmp_path)
    data = trained.to_dict()
    data["merges"][5] = [9999, 1]
    (tmp_path / "bpe.json").write_text(json.dumps(data))
    with pytest.raises(ScratchError, match="corrupt"):
        BPETokenizer.load(tmp_path)


def test_training_learns_the_same_merges_as_hf_bpe_trainer(shakespeare: str) -> None:
    """Hugging Face's BpeTrainer on the same chunks learns the same merge set (the order may
    differ only between pairs of equal count, which the two break differently)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from scratchlm.tokenizer.gpt2 import token_to_str

    ours = BPETokenizer.train(shakespeare, 2000, GPT4_PATTERN, progress=False)
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.train_from_iterator([shakespeare], trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_merges = [tuple(m) for m in json.loads(hf.to_str())["model"]["merges"]]
    our_merges = [(token_to_str(ours.vocab[a]), token_to_str(ours.vocab[b]))
                  for a, b in ours.merges]
    assert len(our_merges) == len(hf_merges) == 2000 - 256 - 1
    assert set(our_merges) == set(hf_merges)
