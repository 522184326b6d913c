"""Parallel layouts against a single process on the same global batch (CPU, gloo)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scratchlm.config import Config, load_config
from scratchlm.errors import ScratchError
from scratchlm.train.pretrain import ensure_data, ensure_tokenizer, run_pretraining

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("prepared")
    cfg = load_config(Config, ROOT / "configs" / "tiny-cpu.yaml")
    tok_dir = ensure_tokenizer(cfg, out, progress=False)
    return tok_dir, ensure_data(cfg, out, tok_dir, progress=False)


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


@pytest.mark.distributed
def test_ddp_two_processes_equal_one(prepared, tmp_path: Path) -> None:
    """torchrun with 2 DDP processes trains on the very batches one process draws: the same
    losses step for step and the same final weights, within fp32 tolerance."""
    if shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("torchrun not installed beside this Python")
    tok_dir, data_dir = prepared
    common = ["pretrain", "--config", "tiny-cpu", "--quiet", f"--tokenizer.path={tok_dir}",
              f"--data.shards={data_dir}", "--train.max_steps=12", "--train.eval_every=6",
              "--train.global_batch_tokens=4096",  # 4 micro-steps alone, 2 per process
              "--train.checkpoint_every=6"]
    subprocess.run([sys.executable, "-m", "scratchlm", *common, "--out", str(tmp_path / "one")],
                   check=True, capture_output=True)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "scratchlm",
                           *common, "--out", str(tmp_path / "two"), "--parallel.dp=2"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-5)
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=5e-4, rtol=1e-3)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == [
        "step-000006", "step-000012"]


def test_layout_must_fit_the_processes(prepared, tmp_path: Path) -> None:
    tok_dir, data_dir = prepared
    cfg = load_config(Config, ROOT / "configs" / "tiny-cpu.yaml",
                      [f"--tokenizer.path={tok_dir}", f"--data.shards={data_dir}",
                       "--parallel.dp=2"])
    with pytest.raises(ScratchError, match="parallel.dp is 2 but 1 process"):
        run_pretraining(cfg, tmp_path, progress=False)
    cfg.parallel.dp, cfg.parallel.zero = 1, 3
    with pytest.raises(ScratchError, match="not available yet"):
        run_pretraining(cfg, tmp_path, progress=False)
