"""The `scratchlm` command end to end: verbs, stdin/stdout, one-line errors."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from scratchlm.cli import main


def run(argv: list[str], monkeypatch, capsys, stdin: bytes = b"") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, shared_data: Path) -> Path:
    out = tmp_path_factory.mktemp("tok")
    corpus = shared_data / "corpus" / "tinyshakespeare.txt"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "600",
                 "--out", str(out), "--quiet"]) == 0
    return out


def test_console_script_lists_verbs() -> None:
    out = subprocess.run([sys.executable, "-m", "scratchlm", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "tokenizer" in out and "demo" in out


def test_encode_decode_round_trip(tok_dir: Path, monkeypatch, capsys) -> None:
    text = "Wherefore art thou Romeo? 😀\n"
    code, out, _ = run(["tokenizer", "encode", "--tokenizer", str(tok_dir)], monkeypatch,
                       capsys, text.encode())
    assert code == 0
    ids = out.split()
    _, ref, _ = run(["tokenizer", "encode", "--tokenizer", str(tok_dir), "--reference"],
                    monkeypatch, capsys, text.encode())
    assert ref.split() == ids
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="utf-8"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(" ".join(ids)))
    assert main(["tokenizer", "decode", "--tokenizer", str(tok_dir)]) == 0
    sys.stdout.flush()
    assert sys.stdout.buffer.getvalue().decode() == text


def test_stats(tok_dir: Path, shared_data: Path, monkeypatch, capsys) -> None:
    code, out, _ = run(["tokenizer", "stats", "--tokenizer", str(tok_dir), "--input",
                        str(shared_data / "corpus" / "austen" / "emma.txt")], monkeypatch, capsys)
    assert code == 0 and "bytes per token" in out and "of 600" in out


@pytest.mark.parametrize("argv, stdin, message", [
    (["tokenizer", "train", "--input", "nope.txt", "--vocab-size", "300", "--out", "x"], b"",
     "nope.txt: no such file or directory"),
    (["tokenizer", "encode", "--tokenizer", "no-such-dir"], b"hi", "no tokenizer here"),
    (["tokenizer", "encode", "--tokenizer", "TOK"], b"caf\xe9", "byte offset 3"),
    (["tokenizer", "encode", "--tokenizer", "TOK"], b"a<|endoftext|>", "special token"),
    (["tokenizer", "decode", "--tokenizer", "TOK"], b"1 2 x", "found 'x'"),
    (["tokenizer", "decode", "--tokenizer", "TOK"], b"1 99999", "outside this tokenizer"),
    (["demo", "--out", "OUT", "--tokenizer.vocab_sise=300"], b"",
     "did you mean 'tokenizer.vocab_size'"),
])
def test_bad_input_is_one_line(argv, stdin, message, tok_dir, tmp_path, monkeypatch, capsys):
    argv = [str(tok_dir) if a == "TOK" else str(tmp_path) if a == "OUT" else a for a in argv]
    code, _, err = run(argv, monkeypatch, capsys, stdin)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_train_error_leaves_no_partial_output(tmp_path: Path, monkeypatch, capsys) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff")
    code, _, err = run(["tokenizer", "train", "--input", str(bad), "--vocab-size", "300",
                        "--out", str(tmp_path / "tok")], monkeypatch, capsys)
    assert code == 2 and "byte offset 3" in err and "--errors replace" in err
    assert not (tmp_path / "tok").exists()


def test_gpt2_import_export(gpt2_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    assert main(["tokenizer", "import-gpt2", "--gpt2-dir", str(gpt2_dir), "--out",
                 str(tmp_path / "tok")]) == 0
    assert main(["tokenizer", "export-gpt2", "--tokenizer", str(tmp_path / "tok"), "--out",
                 str(tmp_path / "files")]) == 0
    assert (tmp_path / "files" / "encoder.json").is_file()


def test_demo_builds_then_reuses(tmp_path: Path, monkeypatch, capsys) -> None:
    argv = ["demo", "--out", str(tmp_path), "--quiet", "--tokenizer.vocab_size=512"]
    code, out, _ = run(argv, monkeypatch, capsys)
    assert code == 0 and "training" in out
    report = (tmp_path / "report.md").read_text()
    assert "bytes/token" in report and "vocab_size=512" in report
    code, out, _ = run(argv, monkeypatch, capsys)
    assert code == 0 and "reusing" in out
