"""Shared fixtures: the reference data in ../shared/data, and small tokenizers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scratchlm.utils import data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $SCRATCHLM_DATA). Absent on a user's machine: skip. In CI it must be
    there, so its absence fails instead of silently skipping the tests that need it."""
    path = data_dir()
    if not (path / "corpus" / "tinyshakespeare.txt").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"reference data not found at {path}; CI must have ../shared/data")
        pytest.skip(f"reference data not found at {path} (set SCRATCHLM_DATA)")
    return path


@pytest.fixture(scope="session")
def shakespeare(shared_data: Path) -> str:
    return (shared_data / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def gpt2_dir(shared_data: Path) -> Path:
    return shared_data / "gpt2"


@pytest.fixture(scope="session")
def trained(shakespeare: str):
    """A 1,024-token GPT-4-pattern tokenizer trained on Tiny Shakespeare."""
    from scratchlm.tokenizer import BPETokenizer

    return BPETokenizer.train(shakespeare, 1024, "gpt4", progress=False)


@pytest.fixture(scope="session")
def gpt2_tok(gpt2_dir: Path):
    from scratchlm.tokenizer import from_gpt2

    return from_gpt2(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """Tokenizer and shards of the tiny-cpu recipe (built-in corpus), built once per session."""
    from scratchlm.config import Config, load_config
    from scratchlm.train.pretrain import ensure_data, ensure_tokenizer

    out = tmp_path_factory.mktemp("prepared")
    cfg = load_config(Config, Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml")
    tok_dir = ensure_tokenizer(cfg, out, progress=False)
    return tok_dir, ensure_data(cfg, out, tok_dir, progress=False)


@pytest.fixture(scope="session")
def tiny_run(prepared, tmp_path_factory) -> Path:
    """A finished tiny-cpu pretraining run (60 steps on the built-in corpus): the base model
    the fine-tuning and alignment tests start from."""
    from scratchlm.config import Config, load_config
    from scratchlm.train.pretrain import run_pretraining

    tok_dir, data_dir = prepared
    out = tmp_path_factory.mktemp("tiny-run")
    cfg = load_config(Config, Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml",
                      [f"--tokenizer.path={tok_dir}", f"--data.shards={data_dir}",
                       "--train.checkpoint_every=0", "--train.sample_tokens=0"])
    run_pretraining(cfg, out, progress=False)
    return out


@pytest.fixture(scope="session")
def chat_model(tiny_run, tmp_path_factory) -> Path:
    """The tiny run's model with the chat template's special tokens added (embedding grown) and
    the template saved beside it: a stand-in for an SFT model, for chat, serve and the chat
    page tests."""
    from scratchlm.model.checkpoint import save_model
    from scratchlm.model.load import load_pretrained
    from scratchlm.model.resize import add_special_tokens
    from scratchlm.templates import get_template, save_template

    model, tok, _ = load_pretrained(tiny_run)
    template = get_template("chat")
    model, tok, _ = add_special_tokens(model, tok, list(template.special_tokens))
    out = tmp_path_factory.mktemp("chat-model")
    save_model(model, out, tok)
    save_template(template, out)
    return out


@pytest.fixture(scope="session")
def sft_model(tiny_run, tmp_path_factory) -> Path:
    """The tiny run fine-tuned for 30 steps on builtin:continue with the chat template (its
    short prompts fit the tiny context; answers end with <|end|>): the policy and
    reward-model base of the alignment tests."""
    from scratchlm.config import SFTConfig, load_config
    from scratchlm.finetune.sft import run_sft

    out = tmp_path_factory.mktemp("sft-model")
    cfg = load_config(SFTConfig, None, [
        f"--sft.model={tiny_run}", "--sft.data=builtin:continue", "--sft.template=chat",
        "--train.max_steps=30", "--train.epochs=0", "--train.lr=2e-3", "--train.eval_every=0",
        "--sft.eval_examples=1", "--sft.max_new_tokens=4"])
    run_sft(cfg, out, progress=False)
    return out / "final"
