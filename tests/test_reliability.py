"""Bad input and faults: every case gets one clear line and the right exit code, and leaves
what the user already has exactly as it was (a snapshot of the directory before and after:
file names, sizes and hashes). Faults (a process killed mid-write, a disk that fills) end in
the old state or one that --resume continues."""

from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from scratchlm.cli import main
from scratchlm.config import Config, load_config, save_config
from scratchlm.errors import ScratchError

from helpers import SCRATCHLM, snapshot

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A finished tiny-cpu run of one's own (60 steps, checkpoints at 30 and 60)."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    return out


def tiny_args(prepared, *extra: str) -> list[str]:
    tok_dir, data_dir = prepared
    return ["--config", "tiny-cpu", "--quiet", f"--tokenizer.path={tok_dir}",
            f"--data.shards={data_dir}", *extra]


# Each case: (id, argv with RUN = a finished run of one's own, OUT = a path under tmp, TOK = a
# tokenizer directory, FILE = an existing file; the exit code; what the one line says).
CASES = [
    ("resume-other-shape", ["pretrain", "PRE", "--out", "RUN", "--resume",
                            "--model.n_embd=32", "--train.max_steps=80"],
     2, "no checkpoint loads"),
    ("resume-damaged", ["pretrain", "PRE", "--out", "RUN", "--resume",
                        "--train.max_steps=80"], 2, "damaged checkpoint"),
    ("resume-finished", ["pretrain", "PRE", "--out", "RUN", "--resume"], 0, None),
    ("new-run-over-a-run", ["pretrain", "PRE", "--out", "RUN"], 2, "already holds a run"),
    ("max-steps-0", ["pretrain", "PRE", "--out", "OUT", "--train.max_steps=0"], 2,
     "train.max_steps must be > 0"),
    ("negative-lr", ["pretrain", "PRE", "--out", "OUT", "--train.lr=-1"], 2,
     "train.lr must be > 0"),
    ("lr-0", ["pretrain", "PRE", "--out", "OUT", "--train.lr=0"], 2, "train.lr must be > 0"),
    ("micro-batch-0", ["pretrain", "PRE", "--out", "OUT", "--train.micro_batch=0"], 2,
     "train.micro_batch must be > 0"),
    ("eval-every-negative", ["pretrain", "PRE", "--out", "OUT", "--train.eval_every=-1"], 2,
     "train.eval_every must be >= 0"),
    ("zero-4", ["pretrain", "PRE", "--out", "OUT", "--parallel.zero=4"], 2,
     "parallel.zero must be 0, 1, 2 or 3"),
    ("out-is-a-file", ["pretrain", "PRE", "--out", "FILE"], 2, "is a file"),
    ("convert-onto-a-model", ["convert", "--to-hf", "RUN", "--out", "RUN/final"], 2,
     "already holds files"),
    ("convert-from-hf-onto-final", ["convert", "--from-hf", "HF", "--out", "RUN/final"], 2,
     "already holds files"),
    ("memory-negative-seq", ["memory", "--seq", "-100"], 2, "seq must be at least 1"),
    ("memory-tp-3", ["memory", "--preset", "llama-7b", "--tp", "3"], 2,
     "n_head (32) is not divisible by tp (3)"),
    ("temperature-nan", ["generate", "--model", "RUN", "--prompt", "Hi", "--temperature",
                         "nan"], 2, "temperature must be a finite number >= 0"),
    ("special-token-empty", ["tokenizer", "train", "--builtin", "--vocab-size", "300",
                             "--out", "OUT", "--special-tokens", ""], 2,
     "a special token cannot be empty"),
    ("pattern-matches-empty", ["tokenizer", "train", "--builtin", "--vocab-size", "300",
                               "--out", "OUT", "--pattern", "x*"], 2,
     "matches the empty string"),
    ("pattern-loses-text", ["tokenizer", "train", "--builtin", "--vocab-size", "300", "--out",
                            "OUT", "--pattern", r"\p{L}+"], 2, "does not cover"),
    ("tokenizer-over-a-tokenizer", ["tokenizer", "train", "--builtin", "--vocab-size", "300",
                                    "--out", "TOK"], 2, "already holds files"),
    ("classify-not-a-classifier", ["classify", "--model", "RUN", "hello"], 2,
     "is not a classifier"),
    ("generate-no-model", ["generate", "--model", "OUT", "--prompt", "Hi"], 2,
     "no such model directory"),
    ("gz-truncated", ["data", "prepare", "--input", "GZ", "--tokenizer", "TOK", "--out",
                      "OUT"], 2, "truncated"),
]


@pytest.mark.parametrize("name, argv, code, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_changes_nothing(name: str, argv: list[str], code: int, message: str | None,
                                   run_copy: Path, prepared, tmp_path: Path, capsys) -> None:
    tok_dir = tmp_path / "tok"
    shutil.copytree(run_copy / "final", tok_dir, ignore=shutil.ignore_patterns("model*",
                                                                            "config.json"))
    (tmp_path / "file.txt").write_text("not a directory")
    if name == "resume-damaged":
        for ckpt in (run_copy / "checkpoints").iterdir():
            (ckpt / "model.safetensors").write_bytes(b"junk")
    gz = tmp_path / "text.gz"
    whole = gzip.compress(("To be, or not to be. " * 2000).encode())
    gz.write_bytes(whole[:len(whole) // 2])  # cut in the middle of the stream
    hf = tmp_path / "hf"
    if name == "convert-from-hf-onto-final":
        assert main(["convert", "--to-hf", str(run_copy), "--out", str(hf)]) == 0
        capsys.readouterr()
    subs = {"RUN": str(run_copy), "OUT": str(tmp_path / "out"), "TOK": str(tok_dir),
            "FILE": str(tmp_path / "file.txt"), "GZ": str(gz), "HF": str(hf),
            "RUN/final": str(run_copy / "final")}
    args = []
    for a in argv:
        args += tiny_args(prepared) if a == "PRE" else [subs.get(a, a)]
    before = snapshot(tmp_path)
    assert main(args) == code
    err = capsys.readouterr().err
    if message is None:
        assert not err
    else:
        # a progress bar may come first; then the one line, and no traceback
        line = err[err.find("error: "):]
        assert "error: " in err and "Traceback" not in err, err
        assert line.count("\n") == 1 and message in line, err
    assert snapshot(tmp_path) == before  # nothing written, nothing lost
    assert not (tmp_path / "out").exists()


def test_a_changed_demo_config_is_refused_before_anything_is_written(tmp_path: Path,
                                                                      capsys) -> None:
    """`make demo` again after its tokenizer settings changed: refused, and the run's
    tokenizer and config.yaml stay those of the run."""
    out = tmp_path / "demo"
    cfg = load_config(Config, ROOT / "configs" / "tiny-cpu.yaml")
    save_config(cfg, out / "config.yaml")
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "trained_with.json").write_text('{"other": "settings"}')
    before = snapshot(out)
    assert main(["demo", "--config", "tiny-cpu", "--out", str(out), "--quiet"]) == 2
    assert "trained with other tokenizer settings" in capsys.readouterr().err
    assert snapshot(out) == before


def test_python_api_raises_the_projects_error() -> None:
    from scratchlm.generate import generate
    from scratchlm.model import GPT, ModelConfig

    model = GPT(ModelConfig.from_preset("gpt2-tiny"))
    with pytest.raises(ScratchError, match="token id 600 is outside the model's vocabulary"):
        model(torch.tensor([[1, 600]]))
    with pytest.raises(ScratchError, match="token id 600 is outside"):
        generate(model, torch.tensor([[1, 600]]), 3)
    with pytest.raises(ScratchError, match="temperature must be a finite number"):
        generate(model, torch.tensor([[1, 2]]), 3, temperature=float("nan"))
    with pytest.raises(ScratchError, match="train.lr must be > 0"):
        load_config(Config, None, ["--train.lr=-0.1"])


STRING_OR_NULL = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12)


@settings(max_examples=200, deadline=None)
@given(STRING_OR_NULL, st.integers(-5, 10**6), st.floats(1e-9, 10.0))
def test_overrides_keep_what_was_typed(text: str, steps: int, lr: float) -> None:
    """A string-or-null field takes the text as typed ("\\n\\n", "---", "1e3", "null" is
    None); numbers round-trip, and an out-of-range one is refused where the config is built."""
    cfg = load_config(Config, None, [f"--data.separator={text}", f"--train.lr={lr!r}"])
    assert cfg.data.separator == (None if text == "null" else text)
    assert cfg.train.lr == lr
    if steps > 0:
        assert load_config(Config, None, [f"--train.max_steps={steps}"]).train.max_steps == steps
    else:
        with pytest.raises(ScratchError, match="train.max_steps must be > 0"):
            load_config(Config, None, [f"--train.max_steps={steps}"])


# ------------------------------------------------------------------------------------------------
# faults


KILL_IN_CHECKPOINT = """
import os, signal, sys
import scratchlm.train.checkpoint as ckpt
from scratchlm.cli import main
real = ckpt.save_tensors

def dying(tensors, path):  # the second checkpoint dies half-written
    if "step-000004" in str(path) and str(path).endswith("optimizer.safetensors"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, path)

ckpt.save_tensors = dying
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_while_writing_a_checkpoint(prepared, tmp_path: Path) -> None:
    """SIGKILL in the middle of writing a checkpoint: the half-written one is ignored, the one
    before it intact, and --resume ends with the weights of a run never killed."""
    argv = ["pretrain", *tiny_args(prepared, "--train.max_steps=6",
                                   "--train.checkpoint_every=2", "--train.eval_every=0")]
    subprocess.run(SCRATCHLM + argv + ["--out", str(tmp_path / "whole")], check=True,
                   capture_output=True)
    script = tmp_path / "die.py"
    script.write_text(KILL_IN_CHECKPOINT)
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, str(script), *argv, "--out", str(killed)],
                          capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert names == [".step-000004.tmp", "step-000002"]  # the torn one never got its name
    subprocess.run(SCRATCHLM + argv + ["--out", str(killed), "--resume"], check=True,
                   capture_output=True)
    a = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


KILL_IN_CONVERT = """
import os, signal, sys
import safetensors.torch
from scratchlm.cli import main

def dying(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

safetensors.torch.save_file = dying
sys.exit(main(sys.argv[1:]))
"""


def test_killed_during_convert_leaves_no_output(tiny_run: Path, tmp_path: Path) -> None:
    script = tmp_path / "die.py"
    script.write_text(KILL_IN_CONVERT)
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, str(script), "convert", "--to-hf", str(tiny_run),
                           "--out", str(out)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # never a directory that looks complete and is not
    assert main(["convert", "--to-hf", str(tiny_run), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".hf.*"))  # the torn temporary was cleaned up


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write fails (EFBIG) instead
    return apply


@pytest.mark.slow
def test_a_disk_that_fills_ends_in_a_resumable_state(prepared, tmp_path: Path) -> None:
    """A file-size limit makes every file over 200 KB fail to write, as a full disk would: the
    run stops with one line at its first checkpoint, nothing half-written is left, and the
    same command with --resume (the disk freed) completes."""
    argv = ["pretrain", *tiny_args(prepared, "--train.max_steps=4",
                                   "--train.checkpoint_every=2", "--train.eval_every=0")]
    out = tmp_path / "run"
    full = subprocess.run(SCRATCHLM + argv + ["--out", str(out)], capture_output=True,
                          text=True, preexec_fn=_limit_file_size(200_000))
    assert full.returncode == 2, full.stderr[-2000:]
    assert full.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "File too large" in full.stderr
    assert not any(p.name.startswith("step-") for p in (out / "checkpoints").glob("*"))
    done = subprocess.run(SCRATCHLM + argv + ["--out", str(out), "--resume"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert os.stat(out / "summary.json").st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
