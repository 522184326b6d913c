"""Typed config: YAML + overrides, with did-you-mean errors for typos and type checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from scratchlm.config import (
    Config,
    describe,
    field_docs,
    from_dict,
    load_config,
    resolve_recipe,
    save_config,
)
from scratchlm.errors import ScratchError


@dataclass
class Optim:
    lr: float = 3e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    kind: Literal["adamw", "sgd"] = "adamw"
    warmup: int | None = None


@dataclass
class Run:
    name: str = "run"
    """Name of the run."""
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)
    compile: bool = False


def test_defaults_yaml_then_overrides(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 1e-3\n  betas: [0.8, 0.9]\nname: base\n")
    cfg = load_config(Run, tmp_path / "c.yaml", ["--optim.warmup=100", "--name=2024",
                                                 "--tags=[a, b]", "--compile=true"])
    assert cfg.optim.lr == 1e-3  # YAML reads 1e-3 as a string; the float field converts it
    assert cfg.optim.betas == (0.8, 0.9) and cfg.optim.warmup == 100
    assert cfg.name == "2024"  # string fields take the text as is
    assert cfg.tags == ["a", "b"] and cfg.compile is True
    assert load_config(Run).optim.lr == 3e-4


def test_unknown_keys_suggest_the_nearest(tmp_path: Path) -> None:
    with pytest.raises(ScratchError, match=r"key 'optim.lrr'; did you mean 'optim.lr'"):
        load_config(Run, None, ["--optim.lrr=1"])
    with pytest.raises(ScratchError, match=r"'optimm'; did you mean 'optim'"):
        load_config(Run, None, ["--optimm.lr=1"])
    (tmp_path / "c.yaml").write_text("optim:\n  warmpu: 3\n")
    with pytest.raises(ScratchError, match=r"'optim.warmpu'; did you mean 'optim.warmup'"):
        load_config(Run, tmp_path / "c.yaml")


@pytest.mark.parametrize("override, message", [
    ("--optim.lr=fast", r"optim.lr: expected float, got 'fast'"),
    ("--optim.warmup=1.5", r"optim.warmup"),
    ("--optim.kind=adam", r"'adam' is not one of \['adamw', 'sgd'\]"),
    ("--compile=1", r"compile: expected bool"),
    ("--optim=3", r"optim: expected a mapping"),
    ("--optim.lr", r"must look like --section.key=value"),
])
def test_wrong_types_are_errors(override: str, message: str) -> None:
    with pytest.raises(ScratchError, match=message):
        load_config(Run, None, [override])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ScratchError, match="not found"):
        load_config(Run, tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("optim: [1,\n")
    with pytest.raises(ScratchError, match="not valid YAML at line"):
        load_config(Run, tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ScratchError, match="must be a mapping"):
        load_config(Run, tmp_path / "list.yaml")


def test_a_stage_lists_its_own_defaults_and_given_steps_beat_its_epochs(tmp_path: Path
                                                                       ) -> None:
    from scratchlm.config import ClassifyConfig

    rows = {key: default for key, default, _ in describe(ClassifyConfig)}
    assert rows["train.epochs"] == "5" and rows["train.lr"] == "5.0e-05"  # not pretraining's
    # --train.max_steps alone: the run is that long (the stage's default epochs set aside);
    # with epochs given too, or epochs alone, epochs set the length.
    assert load_config(ClassifyConfig, None, ["--train.max_steps=5"]).train.epochs == 0
    both = load_config(ClassifyConfig, None, ["--train.max_steps=5", "--train.epochs=2"])
    assert both.train.epochs == 2
    assert load_config(ClassifyConfig, None, []).train.epochs == 5
    # A saved run's config keeps what it ran with.
    save_config(both, tmp_path / "run.yaml")
    assert load_config(ClassifyConfig, tmp_path / "run.yaml").train.epochs == 2


def test_save_and_reload_round_trip(tmp_path: Path) -> None:
    cfg = load_config(Config, None, ["--tokenizer.vocab_size=4096", "--tokenizer.pattern=gpt2"])
    save_config(cfg, tmp_path / "cfg.yaml")
    assert load_config(Config, tmp_path / "cfg.yaml") == cfg


def test_docstrings_are_help_text() -> None:
    assert field_docs(Optim)["lr"] == "Peak learning rate."
    rows = {key: (default, doc) for key, default, doc in describe(Config)}
    assert rows["tokenizer.vocab_size"][0] == "8192"
    assert "merges" in rows["tokenizer.vocab_size"][1]
    assert from_dict(Run, {"optim": {"kind": "sgd"}}).optim.kind == "sgd"


@pytest.mark.parametrize("recipe", ["demo", "tiny-cpu", "shakespeare-10min", "scaling-cpu"])
def test_shipped_pretraining_recipes_load_and_their_batches_divide(recipe: str) -> None:
    """Each pretraining recipe in configs/ loads by name, and its tokens a step fill whole
    micro-batches of whole windows (else the loop refuses it at start-up)."""
    cfg = load_config(Config, resolve_recipe(recipe))
    rows, rest = divmod(cfg.train.global_batch_tokens, cfg.model.block_size)
    assert rest == 0 and rows % cfg.train.micro_batch == 0
