"""Helpers shared by test modules: launching runs (plain, under torchrun, killed and
resumed) and snapshotting directories."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRATCHLM = [sys.executable, "-m", "scratchlm"]

# Once in about 30 runs on this 2-core machine a gloo process aborted with this C++ message
# (no Python error): a teardown race between the two processes, not a wrong result. Such a run
# is tried once more; any other failure fails the test.
GLOO_ABORT = "terminate called without an active exception"


def torchrun(*args: str, procs: int = 2, script: Path | None = None
             ) -> subprocess.CompletedProcess:
    """`torchrun ... -m scratchlm ARGS` (or `torchrun ... SCRIPT ARGS`), tried once more on
    the gloo teardown abort above."""
    exe = Path(sys.executable).parent / "torchrun"
    if not exe.is_file():
        pytest.skip("torchrun not installed beside this Python")
    target = [str(script)] if script else ["-m", "scratchlm"]
    for attempt in range(2):
        done = subprocess.run([str(exe), "--standalone", f"--nproc_per_node={procs}", *target,
                               *args], capture_output=True, text=True)
        if done.returncode == 0 or GLOO_ABORT not in done.stderr or attempt:
            break
        if "--out" in args:  # start the run again from nothing
            shutil.rmtree(Path(args[args.index("--out") + 1]), ignore_errors=True)
        if script is not None and script.name == "run_plan.py":  # every run of the plan
            for run in json.loads(Path(args[0]).read_text()):
                if not run.get("resume"):
                    shutil.rmtree(run["out"], ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def run_plan(runs: list[dict], root: Path, procs: int = 1) -> None:
    """The runs ({"argv": flags, "out": dir, "resume": bool}) one after another in one launch
    (tests/run_plan.py): in this process's interpreter when procs is 1, else under torchrun."""
    plan = root / f"plan-{len(list(root.glob('plan-*.json')))}.json"
    plan.write_text(json.dumps(runs))
    script = Path(__file__).parent / "run_plan.py"
    if procs == 1:
        done = subprocess.run([sys.executable, str(script), str(plan)], capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        return
    torchrun(str(plan), procs=procs, script=script)


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under `root`: (size, sha256), to show that nothing changed."""
    return {str(p.relative_to(root)): (p.stat().st_size,
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def sigkill_then_resume(argv: list[str], root: Path, kill_after_step: int,
                        tensor_files: list[str]) -> tuple[Path, Path]:
    """Run `scratchlm ARGV --out ROOT/whole`; run it again into ROOT/killed, SIGKILL it once
    the checkpoint of `kill_after_step` is written, resume it: the final tensors must be
    bitwise those of the run left alone. Returns the two run directories."""
    whole, killed = root / "whole", root / "killed"
    subprocess.run(SCRATCHLM + argv + ["--out", str(whole)], check=True, capture_output=True)
    proc = subprocess.Popen(SCRATCHLM + argv + ["--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / f"step-{kill_after_step:06d}").is_dir():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "final").exists()
    subprocess.run(SCRATCHLM + argv + ["--out", str(killed), "--resume"], check=True,
                   capture_output=True)
    for name in tensor_files:
        a = load_file(str(whole / "final" / name))
        b = load_file(str(killed / "final" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    return whole, killed
