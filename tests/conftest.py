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
