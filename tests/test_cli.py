"""The `scratchlm` command end to end: verbs, stdin/stdout, one-line errors."""

from __future__ import annotations

import io
import json
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
     "nope.txt: no such file"),
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


def test_inputs_refused_before_the_tokenizer_trains(tmp_path: Path, monkeypatch,
                                                     capsys) -> None:
    """The built-in corpus and files together cannot be prepared: said before any work."""
    text = tmp_path / "more.txt"
    text.write_text("Some modern prose to add.\n")
    code, _, err = run(["pretrain", "--config", "tiny-cpu", "--out", str(tmp_path / "run"),
                        f"--data.inputs=[builtin,{text}]"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "either 'builtin' or paths" in err
    assert not (tmp_path / "run" / "tokenizer").exists()


def test_gpt2_import_export(gpt2_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    assert main(["tokenizer", "import-gpt2", "--gpt2-dir", str(gpt2_dir), "--out",
                 str(tmp_path / "tok")]) == 0
    assert main(["tokenizer", "export-gpt2", "--tokenizer", str(tmp_path / "tok"), "--out",
                 str(tmp_path / "files")]) == 0
    assert (tmp_path / "files" / "encoder.json").is_file()


def test_demo_builds_then_reuses(tmp_path: Path, monkeypatch, capsys) -> None:
    """The whole pipeline with the tiny recipe (`make demo` runs configs/demo.yaml); the
    --train.* overrides cap the fine-tuning stages too."""
    argv = ["demo", "--config", "tiny-cpu", "--out", str(tmp_path), "--quiet",
            "--train.max_steps=8", "--train.epochs=0", "--model.block_size=256"]
    code, out, _ = run(argv, monkeypatch, capsys)
    assert code == 0 and "training a 2,048-token" in out and "preparing shards" in out
    report = (tmp_path / "report.md").read_text()
    for part in ["## Tokenizer", "## Data", "## Pretraining", "bits per byte", "loss.png",
                 "## Samples", "ROMEO:", "## Evaluation", "builtin:speaker", "## Fine-tuning",
                 "majority class", "exact match", "## Alignment", "DPO"]:
        assert part in report
    assert (tmp_path / "loss.png").is_file()
    for stage in ("genre", "sft", "align/sft", "align/reward", "align/ppo", "align/dpo"):
        assert json.loads((tmp_path / stage / "summary.json").read_text())["steps"] == 8
    code, out, _ = run(argv, monkeypatch, capsys)
    assert code == 0 and "reusing the finished run" in out and "training a" not in out
    assert out.count("reusing the finished run") == 7  # pretraining and every later stage
    code, _, err = run(argv + ["--train.max_steps=61"], monkeypatch, capsys)
    assert code == 2 and "finished run of another config" in err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tok_dir: Path) -> Path:
    import torch

    from scratchlm.model import GPT, ModelConfig
    from scratchlm.model.checkpoint import save_model
    from scratchlm.tokenizer import BPETokenizer

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt")
    model = GPT(ModelConfig.from_preset("llama-tiny", vocab_size=600))
    save_model(model, out, BPETokenizer.load(tok_dir))
    return out


def test_generate_streams_a_continuation(checkpoint: Path, monkeypatch, capsys) -> None:
    argv = ["generate", "--checkpoint", str(checkpoint), "--prompt", "ROMEO:", "--seed", "1",
            "--max-new-tokens", "20"]
    code, out, _ = run(argv, monkeypatch, capsys)
    assert code == 0 and out.startswith("ROMEO:") and len(out) > 10
    assert run(argv, monkeypatch, capsys)[1] == out  # same seed, same text
    code, greedy, _ = run(argv + ["--temperature", "0", "--no-cache"], monkeypatch, capsys)
    assert run(argv + ["--temperature", "0"], monkeypatch, capsys)[1] == greedy
    code, _, err = run(argv[:-1] + ["500"], monkeypatch, capsys)
    assert code == 2 and "exceeds the model's context" in err


def test_chat_loop(checkpoint: Path, monkeypatch, capsys) -> None:
    code, out, _ = run(["chat", "--checkpoint", str(checkpoint), "--max-new-tokens", "10",
                        "--seed", "0"], monkeypatch, capsys, b"Hello there\nHow are you\n\n")
    assert code == 0 and out.count("> ") == 3


def test_convert_both_ways(checkpoint: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import torch
    import transformers

    from scratchlm.model.checkpoint import load_model

    assert main(["convert", "--to-hf", str(checkpoint), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out",
                 str(tmp_path / "back")]) == 0
    idx = torch.randint(0, 600, (1, 12))
    ours, back = load_model(checkpoint).eval(), load_model(tmp_path / "back").eval()
    assert (ours(idx)[0] - hf(idx).logits).abs().max() < 1e-4
    assert torch.equal(ours(idx)[0], back(idx)[0])
    code, _, err = run(["convert", "--to-hf", str(tmp_path), "--out", "x"], monkeypatch, capsys)
    assert code == 2 and "not a model directory" in err


def test_memory_table(monkeypatch, capsys) -> None:
    code, out, _ = run(["memory", "--preset", "llama-7b", "--dtype", "bf16", "--seq", "4096"],
                       monkeypatch, capsys)
    assert code == 0 and "6.738B parameters" in out
    assert "weights               13.477 GB" in out
    code, out, _ = run(["memory", "--preset", "llama-7b", "--zero", "3", "--gpus", "8",
                        "--model.n_layer=16"], monkeypatch, capsys)
    assert code == 0 and "ZeRO-3 over 8" in out and "3.500B" in out
    code, _, err = run(["memory", "--preset", "llama-7b", "--model.n_layr=3"], monkeypatch,
                       capsys)
    assert code == 2 and "did you mean 'model.n_layer'" in err


def test_pretrain_bad_config(tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, err = run(["pretrain", "--config", "no-such-recipe", "--out", str(tmp_path)],
                       monkeypatch, capsys)
    assert code == 2 and "no recipe of that name; recipes: demo" in err
    code, _, err = run(["pretrain", "--config", "tiny-cpu", "--out", str(tmp_path),
                        "--train.lrr=1"], monkeypatch, capsys)
    assert code == 2 and "did you mean 'train.lr'" in err
    code, _, err = run(["pretrain", "--config", "tiny-cpu", "--out", str(tmp_path),
                        "--train.precision=fp8"], monkeypatch, capsys)
    assert code == 2 and "'fp8' is not one of" in err


def test_pretrain_help_lists_config_keys_with_their_docstrings(monkeypatch, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "--train.lr=0.0006" in out and "Peak learning rate, reached after warmup." in out
    assert "--parallel.zero=0" in out and "--data.dedup.threshold=0.8" in out
