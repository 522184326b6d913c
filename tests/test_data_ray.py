"""The Ray engine against the local one: same kept documents, same shards, byte for byte; a
worker killed mid-run loses and duplicates nothing. One local Ray instance (2 CPUs) serves the
whole module: Ray takes seconds to start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scratchlm.data.builtin import split_inputs
from scratchlm.data.config import DataConfig, FilterConfig
from scratchlm.data.prepare import prepare
from scratchlm.errors import ScratchError
from scratchlm.tokenizer import BPETokenizer

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, shakespeare: str) -> Path:
    out = tmp_path_factory.mktemp("tok")
    BPETokenizer.train(shakespeare[:30_000], 300, progress=False).save(out)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_data: Path) -> list[Path]:
    """Three files with exact and near copies of each other's paragraphs, across files, and a
    run of documents too short to pass."""
    out = tmp_path_factory.mktemp("inputs")
    austen = shared_data / "corpus" / "austen"
    paras = [p for p in (austen / "persuasion.txt").read_text(encoding="utf-8").split("\n\n")
             if len(p.split()) > 40][:600]
    edited = [p.replace(" the ", " a ", 1) for p in paras[:200]]  # near copies
    files = []
    junk = [f"too short {i}" for i in range(70)]  # a whole batch that no document passes
    for k, docs in enumerate([paras[:300], junk + paras[250:600] + edited[:100],
                              edited[100:] + paras[:50]]):
        path = out / f"part{k}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        files.append(path)
    return files


def _same_output(a: Path, b: Path, ma: dict, mb: dict) -> None:
    for key in ("documents_in", "documents_kept", "bytes_in", "bytes_kept", "tokens",
                "tokens_train", "tokens_val", "removed", "shards"):
        assert ma[key] == mb[key], key
    for s in ma["shards"]:
        assert (a / s["file"]).read_bytes() == (b / s["file"]).read_bytes()


@pytest.mark.slow
def test_ray_engine_keeps_what_the_local_engine_keeps(cluster, tmp_path: Path, tok_dir: Path,
                                                      inputs: list[Path]) -> None:
    cfg = DataConfig(workers=1, shard_tokens=20_000, val_fraction=0.05)
    cfg.filters.preset = "books"
    here = prepare(inputs, tok_dir, tmp_path / "local", cfg, progress=False)
    there = prepare(inputs, tok_dir, tmp_path / "ray", cfg, progress=False, engine="ray")
    assert here["removed"]["exact_duplicate"]["documents"] >= 80
    assert here["removed"]["near_duplicate"]["documents"] >= 80
    assert there["engine"] == "ray" and len(there["shards"]) > 2
    _same_output(tmp_path / "local", tmp_path / "ray", here, there)


def test_ray_engine_with_held_out_files(cluster, tmp_path: Path, tok_dir: Path,
                                        inputs: list[Path]) -> None:
    cfg = DataConfig(workers=1, val_inputs=[str(inputs[2])], filters=FilterConfig("books"))
    here = prepare(inputs[:2], tok_dir, tmp_path / "local", cfg, progress=False)
    there = prepare(inputs[:2], tok_dir, tmp_path / "ray", cfg, progress=False, engine="ray")
    assert there["tokens_val"] > 0
    _same_output(tmp_path / "local", tmp_path / "ray", here, there)


def test_builtin_parts_cover_the_scenes_in_order() -> None:
    from scratchlm.data.builtin import iter_scenes
    from scratchlm.data.ray_engine import _texts, plan_parts

    cfg = DataConfig()
    parts = plan_parts([], cfg, builtin=True)
    assert len(parts) > 5 and all(p.path is None for p in parts)
    texts = [t for p in parts for t in _texts(p, cfg)]
    assert texts == [s.text for s in iter_scenes()]
    _, scenes = split_inputs(["builtin"])
    assert texts == list(scenes)


@pytest.mark.slow
def test_a_killed_worker_loses_and_duplicates_nothing(cluster, tmp_path: Path, tok_dir: Path,
                                                      inputs: list[Path]) -> None:
    """A map task's worker dies (SIGKILL) half-way through its part; Ray runs the part again
    on a fresh worker, and the output is the one of an undisturbed run."""
    from scratchlm.data.ray_engine import prepare_ray

    cfg = DataConfig(workers=1, batch_docs=64, shard_tokens=20_000)
    cfg.filters.preset = "books"
    whole = prepare(inputs, tok_dir, tmp_path / "whole", cfg, progress=False, engine="ray")
    marker = tmp_path / "killed"
    killed = prepare_ray([str(p) for p in inputs], tok_dir, tmp_path / "killed_run", cfg,
                         builtin=False, builtin_only=False, progress=False, fault=str(marker))
    assert marker.exists()  # a worker did die
    _same_output(tmp_path / "whole", tmp_path / "killed_run", whole, killed)


def test_ray_engine_refuses_before_writing(tmp_path: Path, tok_dir: Path,
                                           inputs: list[Path]) -> None:
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "manifest.json").write_text("{}")
    with pytest.raises(ScratchError, match="already holds prepared data"):
        prepare(inputs, tok_dir, tmp_path / "done", DataConfig(), engine="ray")
    with pytest.raises(ScratchError, match="--engine must be one of"):
        prepare(inputs, tok_dir, tmp_path / "x", DataConfig(), engine="spark")
    assert not (tmp_path / "x").exists()
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / ".prepare_state.json").write_text("{}")
    with pytest.raises(ScratchError, match="holds an unfinished local run.*--engine local"):
        prepare(inputs, tok_dir, tmp_path / "unfinished", DataConfig(), engine="ray")
    with pytest.raises(ScratchError, match="not texts in memory"):
        prepare([], tok_dir, tmp_path / "y", DataConfig(), documents=["a text"], engine="ray")


def test_cli_engine_flags(tmp_path: Path, tok_dir: Path, inputs: list[Path],
                          capsys: pytest.CaptureFixture) -> None:
    from scratchlm.cli import main

    base = ["data", "prepare", "--input", str(inputs[0]), "--tokenizer", str(tok_dir)]
    assert main([*base, "--out", str(tmp_path / "a"), "--address", "auto"]) == 2
    assert "--address is for --engine ray" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b"), "--data.filters.preset=fineweb"]) == 2
    assert "data.filters.preset: 'fineweb' is not one of" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_ray_engine_damaged_input_is_one_line_and_leaves_nothing(
        cluster, tmp_path: Path, tok_dir: Path, inputs: list[Path]) -> None:
    """A task's error (a cut .gz) reaches the user as its own one line, not a remote traceback;
    the run's directory is removed (this engine keeps no resume state)."""
    import gzip

    whole = gzip.compress(inputs[1].read_bytes())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[:len(whole) // 2])
    cfg = DataConfig(workers=1, filters=FilterConfig("books"))
    with pytest.raises(ScratchError) as e:
        prepare([inputs[0], cut], tok_dir, tmp_path / "out", cfg, progress=False, engine="ray")
    assert str(e.value).startswith(f"{cut}: the gz stream is truncated or damaged")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
