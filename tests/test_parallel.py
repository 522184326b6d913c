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
from scratchlm.train.pretrain import run_pretraining

from helpers import losses, run_plan, torchrun

ROOT = Path(__file__).resolve().parents[1]


def common(prepared, steps: int) -> list[str]:
    tok_dir, data_dir = prepared
    return ["pretrain", "--config", "tiny-cpu", "--quiet", f"--tokenizer.path={tok_dir}",
            f"--data.shards={data_dir}", f"--train.max_steps={steps}", "--train.eval_every=6",
            "--train.checkpoint_every=6", "--train.keep_last=5",
            "--train.global_batch_tokens=4096"]  # 4 micro-steps alone, 2 per process


# Model variants beside tiny-cpu's own (Llama-style: RoPE, RMSNorm, SwiGLU, tied head).
VARIANTS = {
    "llama": [],
    "gpt2": ["--model.pos_emb=learned", "--model.norm=layernorm", "--model.mlp=gelu",
             "--model.bias=true"],
    "gqa": ["--model.n_kv_head=2", "--model.tie_embeddings=false"],
}


def assert_same_run(a: Path, b: Path) -> None:
    assert losses(a) == pytest.approx(losses(b), abs=1e-5)
    wa = load_file(str(a / "final" / "model.safetensors"))
    wb = load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:  # AdamW amplifies float summation order a little
        torch.testing.assert_close(wa[name], wb[name], atol=5e-4, rtol=1e-3)


# Every layout on 2 processes (and the 2-D ones on 4), each against one process on the same
# global batch: (model variant, processes, layout flags).
LAYOUTS = {
    "ddp": ("llama", 2, ["--parallel.dp=2"]),
    "zero1": ("llama", 2, ["--parallel.dp=2", "--parallel.zero=1"]),
    "zero2": ("llama", 2, ["--parallel.dp=2", "--parallel.zero=2"]),
    "zero3": ("llama", 2, ["--parallel.dp=2", "--parallel.zero=3"]),
    "tp-sp": ("llama", 2, ["--parallel.tp=2"]),
    "tp-sp-gpt2": ("gpt2", 2, ["--parallel.tp=2"]),
    "tp-gqa": ("gqa", 2, ["--parallel.tp=2", "--parallel.sequence_parallel=false"]),
    "pp-1f1b": ("llama", 2, ["--parallel.pp=2"]),
    "pp-gpipe-gqa": ("gqa", 2, ["--parallel.pp=2", "--parallel.pp_schedule=gpipe"]),
    "dp-x-tp": ("llama", 4, ["--parallel.dp=2", "--parallel.tp=2"]),
    "fsdp-x-tp": ("gpt2", 4, ["--parallel.dp=2", "--parallel.tp=2", "--parallel.zero=3"]),
    "dp-x-pp": ("llama", 4, ["--parallel.dp=2", "--parallel.pp=2"]),
}

# Saved under one layout at step 6, resumed under another to step 12.
RESUMES = {
    "zero3-to-1": (["--parallel.dp=2", "--parallel.zero=3"], []),
    "pp-to-tp": (["--parallel.pp=2"], ["--parallel.tp=2"]),
    "1-to-pp": ([], ["--parallel.pp=2"]),
    "tp-to-zero1": (["--parallel.tp=2"], ["--parallel.dp=2", "--parallel.zero=1"]),
}


def procs(flags: list[str]) -> int:
    n = 1
    for flag in flags:
        if flag.split("=")[0] in ("--parallel.dp", "--parallel.tp", "--parallel.pp"):
            n *= int(flag.split("=")[1])
    return n


@pytest.fixture(scope="module")
def runs(prepared, tmp_path_factory) -> Path:
    """Every run the tests below compare, made once: the single-process references, every
    layout, and the layout-to-layout resumes, each group of runs with the same number of
    processes in one launch (tests/run_plan.py), so that torch's start-up is paid once per
    group rather than once per run."""
    root = tmp_path_factory.mktemp("layouts")
    plans: dict[int, list[dict]] = {1: [], 2: [], 4: []}
    for variant, flags in VARIANTS.items():
        plans[1].append({"argv": common(prepared, 12) + flags,
                         "out": str(root / f"single-{variant}")})
    for name, (variant, n, flags) in LAYOUTS.items():
        plans[n].append({"argv": common(prepared, 12) + VARIANTS[variant] + flags,
                         "out": str(root / name)})
    for name, (first, _) in RESUMES.items():
        plans[procs(first)].append({"argv": common(prepared, 6) + first,
                                    "out": str(root / f"resume-{name}")})
    for n, plan in plans.items():
        run_plan(plan, root, n)
    second: dict[int, list[dict]] = {1: [], 2: []}
    for name, (_, flags) in RESUMES.items():
        shutil.rmtree(root / f"resume-{name}" / "final")
        second[procs(flags)].append({"argv": common(prepared, 12) + flags, "resume": True,
                                     "out": str(root / f"resume-{name}")})
    for n, plan in second.items():
        run_plan(plan, root, n)
    return root


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_equals_one_process(runs: Path, layout: str) -> None:
    """torchrun over 2 (or 4) processes trains on the very batches one process draws: the
    same losses step for step and the same final weights, whatever the layout."""
    variant = LAYOUTS[layout][0]
    run = runs / layout
    assert_same_run(runs / f"single-{variant}", run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-000006", "step-000012"]
    # What the fullest rank holds, against `scratchlm memory` for the same layout (ZeRO-2 keeps
    # weights sharded at rest, as ZeRO-3 does).
    from scratchlm.memory import estimate_memory

    cfg = load_config(Config, run / "config.yaml")
    p = cfg.parallel
    est = estimate_memory(cfg.model, "fp32", zero=3 if p.zero >= 2 else p.zero, gpus=p.dp,
                          tp=p.tp, pp=p.pp)
    held = json.loads((run / "summary.json").read_text())["per_rank_bytes"]
    for key, predicted in [("weights", est.weights), ("gradients", est.gradients),
                           ("optimizer", est.optimizer)]:
        assert held[key] == pytest.approx(predicted, rel=0.02), key


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(RESUMES))
def test_checkpoint_resumes_under_another_layout(runs: Path, name: str) -> None:
    """Saved under one layout at step 6, resumed under another to step 12: the same run as a
    single process alone (checkpoints hold the whole state, by name, so any layout reads
    them)."""
    assert_same_run(runs / "single-llama", runs / f"resume-{name}")


def test_layout_must_fit_the_processes(prepared, tmp_path: Path) -> None:
    tok_dir, data_dir = prepared
    cfg = load_config(Config, ROOT / "configs" / "tiny-cpu.yaml",
                      [f"--tokenizer.path={tok_dir}", f"--data.shards={data_dir}",
                       "--parallel.dp=2"])
    with pytest.raises(ScratchError, match=r"dp x tp x pp = 2 x 1 x 1 = 2 but 1 process"):
        run_pretraining(cfg, tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # refused before any work


@pytest.mark.parametrize("flags,message", [
    (["--parallel.tp=3"], r"n_head \(4\) is not divisible by parallel.tp \(3\)"),
    (["--parallel.tp=2", "--model.n_kv_head=1"], r"n_kv_head \(1\) is not divisible"),
    (["--parallel.pp=4", "--model.n_layer=6"], r"n_layer \(6\) is not divisible by parallel.pp"),
    (["--parallel.tp=2", "--model.block_size=127"], r"block_size \(127\).*sequence_parallel"),
    (["--parallel.zero=4"], r"zero must be 0, 1, 2 or 3"),
    (["--parallel.zero=1", "--parallel.dp=2", "--parallel.tp=2"], r"zero=1 works with data"),
    (["--parallel.zero=3", "--parallel.dp=2", "--parallel.pp=2"], r"not combined with pipeline"),
])
def test_impossible_layouts_are_refused(flags: list[str], message: str) -> None:
    from scratchlm.parallel import check_layout

    with pytest.raises(ScratchError, match=message):  # where the config is built, or after
        cfg = load_config(Config, ROOT / "configs" / "tiny-cpu.yaml", flags)
        p = cfg.parallel
        check_layout(p, cfg.model, p.dp * p.tp * p.pp)


@pytest.mark.distributed
def test_two_nodes_on_loopback_equal_one_process(prepared, runs: Path, tmp_path: Path) -> None:
    """Two torchrun launches, one per "node" (rendezvous on 127.0.0.1), train as one job."""
    import socket

    exe = Path(sys.executable).parent / "torchrun"
    if not exe.is_file():
        pytest.skip("torchrun not installed beside this Python")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen(
        [str(exe), "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
         "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=scratchlm-test",
         "-m", "scratchlm", *common(prepared, 12), "--out", str(tmp_path), "--parallel.dp=2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    assert_same_run(runs / "single-llama", tmp_path)


MEMORY_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from scratchlm.memory import held_bytes
from scratchlm.model import GPT, ModelConfig
from scratchlm.model.logprobs import cross_entropy_sum
from scratchlm.parallel.ddp import apply_ddp
from scratchlm.parallel.fsdp import apply_fsdp
from scratchlm.parallel.zero1 import ZeroOneOptimizer
from torch.distributed.device_mesh import init_device_mesh
from scratchlm.train.optim import build_optimizer, param_groups
dist.init_process_group("gloo")
out = sys.argv[1]
mesh = init_device_mesh("cpu", (2,))
for zero in range(4):
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("llama-tiny", n_layer=4, n_embd=128, vocab_size=1024))
    forward = apply_fsdp(model, model, mesh, zero) if zero >= 2 else apply_ddp(model, "cpu")
    opt = build_optimizer(param_groups(model, 0.1), 1e-3, (0.9, 0.95))
    if zero == 1:
        opt = ZeroOneOptimizer(opt)
    x = torch.randint(0, 1024, (2, 32))
    cross_entropy_sum(forward(x)[0], x)[0].backward()
    opt.step()
    json.dump(held_bytes(model, opt), open(f"{out}/zero{zero}-rank{dist.get_rank()}.json", "w"))
dist.barrier()  # no rank leaves while another still talks to it
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def held(tmp_path_factory) -> Path:
    """What each rank holds after one step under ZeRO 0 to 3 (one launch for the four)."""
    root = tmp_path_factory.mktemp("held")
    (root / "mem.py").write_text(MEMORY_SCRIPT)
    torchrun(str(root), script=root / "mem.py")
    return root


@pytest.mark.distributed
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_per_rank_state_matches_the_memory_estimator(held: Path, zero: int) -> None:
    """What a rank holds after a step: weights, gradients and AdamW state are whole under DDP;
    on 2 ranks the AdamW state is about half under ZeRO-1, and all three are about half under
    ZeRO-2/3 at rest, as `scratchlm memory` predicts (ZeRO-2 gathers whole weights only while
    a step runs, which is what its peak counts)."""
    from scratchlm.memory import estimate_memory
    from scratchlm.model import ModelConfig

    rows = [json.loads((held / f"zero{zero}-rank{r}.json").read_text()) for r in (0, 1)]
    cfg = ModelConfig.from_preset("llama-tiny", n_layer=4, n_embd=128, vocab_size=1024)
    est = estimate_memory(cfg, "fp32", zero=3 if zero >= 2 else zero, gpus=2)
    for row in rows:
        for key, predicted in [("weights", est.weights), ("gradients", est.gradients),
                               ("optimizer", est.optimizer)]:
            assert abs(row[key] / predicted - 1) < 0.05, (key, row[key], predicted)
    whole = estimate_memory(cfg, "fp32", zero=0, gpus=1)
    key, total = ("optimizer", whole.optimizer) if zero == 1 else ("weights", whole.weights)
    if zero:  # the two shards make up the whole
        assert abs(sum(r[key] for r in rows) / total - 1) < 0.02
